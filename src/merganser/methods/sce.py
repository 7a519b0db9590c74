"""SCE (FuseChat): select high-variance entries, calculate per-model coefficients, erase
minority signs."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register
from merganser.methods.task_vectors import consensus_mask


@register(
    "sce",
    params=(
        Param(
            "select_topk",
            "global",
            1.0,
            low=0.0,
            high=1.0,
            doc="fraction of entries with the highest variance across models kept",
        ),
    ),
    needs_base=True,
    workspace=2.0,
    reference="Wan et al., FuseChat (SCE), arXiv 2408.07990; mergekit sce",
)
def sce(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """Keep the ``select_topk`` highest-variance entries, weight each model by its mean squared
    delta, drop entries against the elected sign, and take the weighted mean.
    """
    deltas = torch.stack([t - base for t in tensors])
    if select_topk < 1:
        var = deltas.var(dim=0, unbiased=False)
        k = int(select_topk * int(torch.count_nonzero(var)))
        mask = torch.zeros(var.numel(), dtype=deltas.dtype, device=deltas.device)
        if k > 0:
            mask[torch.topk(var.abs().reshape(-1), k).indices] = 1
        deltas = deltas * mask.view(var.shape)
    energy = [float((d**2).sum()) / d.numel() for d in deltas]
    total = sum(energy)
    coeffs = [1 / len(energy)] * len(energy) if total == 0 else [e / total for e in energy]
    w = torch.tensor(coeffs, dtype=deltas.dtype, device=deltas.device)
    w = w.view(-1, *([1] * base.dim()))
    erased = w * consensus_mask(deltas, "mass")
    divisor = erased.sum(dim=0)
    divisor[divisor == 0] = 1
    return base + (deltas * erased).sum(dim=0) / divisor
