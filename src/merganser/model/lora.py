"""LoRA arithmetic (Hu et al., LoRA, ICLR 2022, arXiv 2106.09685; rsLoRA: Kalajdzievski 2023,
arXiv 2312.03732; DoRA: Liu et al., ICML 2024, arXiv 2402.09353), as PEFT 0.21 merges an adapter
into its base: spec algorithms-2.md §11.1. Pure functions over float32 tensors.
"""

from __future__ import annotations

import math

import torch


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = α/r, or α/√r for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def delta_rows(
    a: torch.Tensor, b: torch.Tensor, scale: float, rows: slice, transposed: bool = False
) -> torch.Tensor:
    """Rows ``rows`` of ΔW = s·B·A ([out, in]); ``transposed``: of ΔWᵀ, for weights stored
    [in, out] (GPT-2's Conv1D, ``fan_in_fan_out``) and embeddings (A [r, V], B [d, r]).
    """
    if transposed:
        return scale * (b @ a[:, rows]).T
    return scale * (b[rows] @ a)


def dora(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's merged rows: m / ‖W₀ + ΔW‖_row · (W₀ + ΔW), given W₀ + ΔW (rows [out, in])."""
    norm = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
    return (magnitude.reshape(-1, 1) / norm) * weight


def factorize(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B [out, k], A [k, in] with B·A the best rank-k approximation of ``delta`` (truncated
    SVD, the scale split as √s on each side, as mergekit-extract-lora's distribute_scale),
    k = ``rank``, or the fewest singular values keeping ``energy`` of ‖Δ‖²_F; and the
    relative error ‖Δ − B·A‖_F / ‖Δ‖_F (spec algorithms-2.md §11.3).
    """
    small = min(delta.shape)
    if rank is not None and energy is None and 4 * rank < small and delta.numel() > 1 << 22:
        # A big matrix and a low rank: randomized SVD (Halko et al. 2011) costs O(mnk).
        u, s, v = torch.svd_lowrank(delta, q=min(small, rank + 8), niter=4)
        vh = v.T
        total = float(torch.linalg.vector_norm(delta)) ** 2
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        total = float((s.double() ** 2).sum())
    if energy is not None:
        kept = torch.cumsum(s.double() ** 2, 0) / max(total, 1e-300)
        k = int(torch.searchsorted(kept, torch.tensor(energy, dtype=torch.float64)).item()) + 1
    else:
        k = rank if rank is not None else small
    k = max(1, min(k, len(s)))
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    rest = max(total - float((s[:k].double() ** 2).sum()), 0.0)
    return b.contiguous(), a.contiguous(), (rest / total) ** 0.5 if total > 0 else 0.0
