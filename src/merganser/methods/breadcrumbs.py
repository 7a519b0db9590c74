"""Model Breadcrumbs: drop both the smallest and the largest (outlier) delta entries."""

from __future__ import annotations

import torch

from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import outlier_mask
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import Sparsifier, generalized_task_arithmetic

GAMMA = Param(
    "gamma",
    "model",
    0.01,
    low=0.0,
    high=1.0,
    doc="fraction of largest-magnitude entries removed (the paper's beta)",
)
REFERENCE = "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024, arXiv 2312.06795"


def _sparsifier(density: list[float], gamma: list[float], how: str) -> Sparsifier:
    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        return apply_rescale(d, outlier_mask(d, density[i], gamma[i]), how, density[i])

    return sparsify


@register(
    "breadcrumbs",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), rescale("none")),
    needs_base=True,
    workspace=1.5,
    reference=REFERENCE,
)
def breadcrumbs(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "none",
) -> torch.Tensor:
    """Task arithmetic on masks that drop the top ``gamma`` and the bottom entries so ``density``
    remains (Davari & Belilovsky 2023).
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, gamma, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )


@register(
    "breadcrumbs_ties",
    params=(WEIGHT, DENSITY, GAMMA, LAMBDA, normalize(False), rescale("none")),
    needs_base=True,
    workspace=1.5,
    reference=REFERENCE,
)
def breadcrumbs_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    gamma: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "none",
) -> torch.Tensor:
    """Breadcrumbs masks followed by TIES sign consensus (mergekit's breadcrumbs_ties)."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, gamma, rescale),
        consensus="mass",
        normalize=normalize,
        lambda_=lambda_,
    )
