"""DELLA-Merging: magnitude-ranked stochastic drop (MAGPRUNE), then TIES-style fusion."""

from __future__ import annotations

from typing import Any

import torch

from merganser.methods.dare import model_seed
from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import bernoulli_mask, generator, rank_keep_probs
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import Sparsifier, generalized_task_arithmetic

EPSILON = Param(
    "epsilon",
    "model",
    0.15,
    low=0.0,
    high=0.5,
    doc="half-width of the keep-probability window (official window_size / 2)",
)
REFERENCE = "Deep et al., DELLA-Merging, arXiv 2406.11617"


def _validate(params: dict[str, Any]) -> str | None:
    for d, e in zip(params["density"], params["epsilon"], strict=True):
        if d < 1 and not (d - e > 0 and d + e < 1):
            return f"density ± epsilon must lie in (0, 1), got density {d} and epsilon {e}"
    return None


def _sparsifier(density: list[float], epsilon: list[float], seed: int, how: str) -> Sparsifier:
    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        if density[i] >= 1:
            return d
        probs = rank_keep_probs(d, density[i], epsilon[i])
        mask = bernoulli_mask(d.shape, probs, generator(model_seed(seed, i)))
        return apply_rescale(d, mask, how, probs)

    return sparsify


PARAMS = (WEIGHT, DENSITY, EPSILON, LAMBDA)


@register(
    "della",
    params=(*PARAMS, normalize(True), rescale("l1", paper="inverse")),
    needs_base=True,
    stochastic=True,
    workspace=3.0,
    validate=_validate,
    reference=REFERENCE,
)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: str = "l1",
) -> torch.Tensor:
    """MAGPRUNE each τᵢ (keep prob. density ± ε by magnitude rank per row), elect signs, disjoint
    mean, scale by λ (Deep et al. 2024). ``rescale: inverse`` is the official per-entry 1/p.
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, epsilon, seed, rescale),
        consensus="mass",
        normalize=normalize,
        lambda_=lambda_,
    )


@register(
    "della_linear",
    params=(*PARAMS, normalize(False), rescale("l1", paper="inverse")),
    needs_base=True,
    stochastic=True,
    workspace=3.0,
    validate=_validate,
    reference=REFERENCE,
)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DELLA's MAGPRUNE followed by a plain weighted sum, without sign election."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, epsilon, seed, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )
