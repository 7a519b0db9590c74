"""MagMax: per entry, the task vector of largest magnitude (Marczak et al., ECCV 2024)."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "magmax",
    params=(
        Param(
            "lambda",
            "global",
            0.5,
            doc="scale of the selected task vector (official code and FusionBench: 0.5)",
        ),
    ),
    needs_base=True,
    elementwise=True,
    workspace=1.0,
    reference="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual "
    "Learning, ECCV 2024, arXiv 2407.06322",
)
def magmax(tensors: list[torch.Tensor], base: torch.Tensor, lambda_: float = 0.5) -> torch.Tensor:
    """θ₀ + λ·τ_max, τ_max taking at each entry the τᵢ = θᵢ − θ₀ of largest |τᵢ|; a tie goes to
    the later model, as the official ``merge_max_abs`` (Marczak et al. 2024).
    """
    best = tensors[0] - base
    for t in tensors[1:]:
        tau = t - base
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return base + lambda_ * best
