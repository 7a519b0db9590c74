"""Weighted averaging: uniform and weighted model soups."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "linear",
    params=(
        Param("weight", "model", 1.0, doc="relative weight of each model"),
        Param("normalize", "global", True, kind=bool, doc="divide by the sum of weights"),
    ),
    elementwise=True,
    validate=lambda p: (
        "weights sum to zero with normalize: true"
        if p["normalize"] and sum(p["weight"]) == 0
        else None
    ),
    reference="Wortsman et al., Model soups, ICML 2022, arXiv 2203.05482",
)
def linear(
    tensors: list[torch.Tensor], weight: list[float], normalize: bool = True
) -> torch.Tensor:
    """Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize`` (Wortsman et al. 2022, uniform/weighted soup)."""
    out = torch.zeros_like(tensors[0])
    for w, t in zip(weight, tensors, strict=True):
        out.add_(t, alpha=w)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("weights sum to zero; cannot normalize")
        out.div_(total)
    return out
