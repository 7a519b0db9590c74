"""Arcee Fusion: keep the changes whose importance is an upper outlier (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from merganser.methods.registry import register


def _quantile(values: torch.Tensor, q: float) -> float:
    """The sorted value at index floor(q·(n−1)), with no interpolation, as mergekit takes it."""
    k = int(q * (values.numel() - 1))
    return float(torch.kthvalue(values, k + 1).values)


@register(
    "arcee_fusion",
    needs_base=True,
    max_models=1,
    workspace=4.0,
    reference="mergekit 0.1.5 merge_methods/arcee_fusion.py (Arcee; no paper)",
)
def arcee_fusion(tensors: list[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """θ₀ + Δ ⊙ [I ≥ q₂ + 1.5(q₃ − q₁)], I = |Δ| · KL(softmax θ ‖ softmax θ₀) per row (last
    dimension), quartiles of I taken exactly; mergekit samples 10⁶ entries without a seed
    for larger tensors, so there its result varies from run to run.
    """
    other = tensors[0]
    delta = other - base
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (delta.abs() * kl).flatten()
    q1, med, q3 = (_quantile(importance, x) for x in (0.25, 0.5, 0.75))
    keep = (importance >= med + 1.5 * (q3 - q1)).reshape(delta.shape)
    return base + delta * keep
