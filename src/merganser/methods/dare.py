"""DARE: randomly drop delta entries and rescale, then merge linearly or with TIES consensus."""

from __future__ import annotations

import torch

from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import register
from merganser.methods.sparsify import bernoulli_mask, generator
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import Sparsifier, generalized_task_arithmetic

REFERENCE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv 2311.03099"


def model_seed(seed: int, i: int) -> int:
    """Decorrelated per-model seeds from one per-tensor seed."""
    return (seed ^ ((i + 1) * 0x9E3779B97F4A7C15)) & 0x7FFF_FFFF_FFFF_FFFF


def dare_sparsify(density: list[float], seed: int, how: str) -> Sparsifier:
    """DARE's drop: keep each entry with probability ``density``, then rescale."""

    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        keep = density[i]
        if keep >= 1:
            return d
        if keep <= 0:
            return torch.zeros_like(d)
        mask = bernoulli_mask(d.shape, keep, generator(model_seed(seed, i))).to(d.device)
        return apply_rescale(d, mask, how, keep)

    return sparsify


@register(
    "dare_linear",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(False), rescale("l1")),
    needs_base=True,
    stochastic=True,
    workspace=1.5,
    reference=REFERENCE,
)
def dare_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DARE then task arithmetic: θ₀ + λ Σ wᵢ·rescale(mᵢ⊙τᵢ), mᵢ ~ Bernoulli(density) (Yu et al.
    2024). ``rescale: inverse`` is the paper's 1/(1−p); ``l1`` is mergekit's default.
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=dare_sparsify(density, seed, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )


@register(
    "dare_ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(False), rescale("l1")),
    needs_base=True,
    stochastic=True,
    workspace=1.5,
    reference=REFERENCE,
)
def dare_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DARE then TIES sign consensus on the weighted deltas (Yu et al. 2024; mergekit convention:
    no magnitude trim, ``normalize`` off by default).
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=dare_sparsify(density, seed, rescale),
        consensus="mass",
        normalize=normalize,
        lambda_=lambda_,
    )
