"""Task arithmetic: add (or, with negative weights, subtract) task vectors."""

from __future__ import annotations

import torch

from merganser.methods.params import LAMBDA, WEIGHT, normalize
from merganser.methods.registry import register
from merganser.methods.task_vectors import generalized_task_arithmetic


@register(
    "task_arithmetic",
    params=(WEIGHT, LAMBDA, normalize(False)),
    needs_base=True,
    elementwise=True,
    workspace=0.5,
    # mergekit accepts these on every generalized-task-arithmetic method; TA never sparsifies.
    ignored=frozenset({"density", "rescale"}),
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
    return generalized_task_arithmetic(tensors, base, weight, normalize=normalize, lambda_=lambda_)
