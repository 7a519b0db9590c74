"""Consensus merging with TALL masks (Wang et al., Localizing Task Information for Improved
Model Merging and Compression, ICML 2024, arXiv 2405.07813).
"""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "consensus",
    params=(
        Param("alpha", "global", 1.0, doc="scale of the masked sum (official: tuned in 0.1-1.0)"),
        Param(
            "mask_lambda",
            "global",
            0.4,
            low=0.0,
            doc="TALL mask threshold λ: task t keeps entry j where |τₜ| > λ·|τ_MTL − τₜ| "
            "(official: per task, from 0.2-0.6 on validation)",
        ),
        Param(
            "k",
            "global",
            2,
            kind=int,
            low=0,
            doc="keep entries at least k tasks' masks hold (2 drops 'selfish' weights)",
        ),
    ),
    needs_base=True,
    elementwise=True,
    workspace=2.0,
    reference="Wang et al., Localizing Task Information for Improved Model Merging and "
    "Compression, ICML 2024, arXiv 2405.07813",
)
def consensus(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    alpha: float = 1.0,
    mask_lambda: float = 0.4,
    k: int = 2,
) -> torch.Tensor:
    """θ₀ + α·(τ_MTL ⊙ [#{t : |τₜ| > λ|τ_MTL − τₜ|} ≥ k]), τ_MTL = Σₜτₜ (spec §4.1; entry by
    entry, so the official whole-model flattening gives the same result per tensor).
    """
    taus = [t - base for t in tensors]
    total = torch.stack(taus).sum(dim=0)
    count = torch.zeros_like(base)
    for tau in taus:
        count += tau.abs() > mask_lambda * (total - tau).abs()
    return base + alpha * torch.where(count >= k, total, 0.0)
