"""Task arithmetic: add (or, with negative weights, subtract) task vectors."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "task_arithmetic",
    params=(
        Param("weight", "model", 1.0, doc="scale of each task vector (negative to negate)"),
        Param("lambda", "global", 1.0, doc="scale of the summed task vector"),
        Param("normalize", "global", False, kind=bool, doc="divide by the sum of weights"),
    ),
    needs_base=True,
    elementwise=True,
    reference="Ilharco et al., Editing models with task arithmetic, ICLR 2023, arXiv 2212.04089",
)
def task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢ(θᵢ − θ₀) (Ilharco et al. 2023); negative wᵢ negates a task."""
    delta = torch.zeros_like(base)
    for w, t in zip(weight, tensors, strict=True):
        delta.add_(t - base, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("weights sum to zero; cannot normalize")
        delta.div_(total)
    return base + lambda_ * delta
