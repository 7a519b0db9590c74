"""NearSwap: take the other model's value where it is near the base (mergekit 0.1.5)."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "nearswap",
    params=(
        Param(
            "t",
            "global",
            None,
            low=0.0,
            doc="similarity threshold: entries within t of the base take the other model's "
            "value, the rest move at most t toward it (required, as in mergekit)",
        ),
    ),
    needs_base=True,
    max_models=1,
    elementwise=True,
    reference="mergekit 0.1.5 merge_methods/nearswap.py (Arcee; no paper)",
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, t: float) -> torch.Tensor:
    """w·θ + (1−w)·θ₀ with w = clamp(t / max(|θ₀ − θ|, 1e-6), 0, 1), mergekit's formula
    (≈ θ₀ + clip(θ − θ₀, −t, t)).
    """
    other = tensors[0]
    w = (t / (base - other).abs().clamp_min(1e-6)).clamp(0.0, 1.0)
    return w * other + (1 - w) * base
