"""Iso-C and Iso-CTS: isotropic merging in common and task-specific subspaces (Marczak et al.,
ICML 2025, arXiv 2502.04959).
"""

from __future__ import annotations

import torch

from merganser.methods._subspace import MATRIX, polar
from merganser.methods.registry import Param, register

REFERENCE = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, ICML 2025, arXiv 2502.04959"
)
ALPHA = Param(
    "alpha", "global", 1.0, doc="scale of the merged task vector (FusionBench 1.0; 1.5 for ViT)"
)


@register("iso_c", params=(ALPHA, MATRIX), needs_base=True, workspace=3.0, reference=REFERENCE)
def iso_c(
    tensors: list[torch.Tensor], base: torch.Tensor, alpha: float = 1.0, matrix: bool = True
) -> torch.Tensor:
    """θ₀ + α·mean(s)·U·Vᵀ for Σᵢτᵢ = U·diag(s)·Vᵀ: the task-arithmetic directions with a
    flat spectrum (2-D tensors); other tensors: the mean task vector (spec §2.1).
    """
    taus = [t - base for t in tensors]
    if base.dim() != 2 or not matrix:
        return base + alpha * torch.stack(taus).mean(dim=0)
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    return base + alpha * s.mean() * (u @ vh)


@register(
    "iso_cts",
    params=(
        ALPHA,
        Param(
            "common_space_fraction",
            "global",
            0.8,
            low=0.0,
            high=1.0,
            doc="share of the rank given to the common subspace",
        ),
        MATRIX,
    ),
    needs_base=True,
    workspace=4.0,
    reference=REFERENCE,
)
def iso_cts(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    matrix: bool = True,
) -> torch.Tensor:
    """Iso-C on the top singular vectors of Σᵢτᵢ (the common subspace) joined by each task's
    own top singular vectors outside it, all with one flat spectrum (spec §2.2; sizes rounded
    as the official code, half to even). With no room for task-specific vectors it is Iso-C.
    """
    taus = [t - base for t in tensors]
    if base.dim() != 2 or not matrix:
        return base + alpha * torch.stack(taus).mean(dim=0)
    m, n = min(base.shape), len(taus)
    common = int(m * common_space_fraction)
    common = m - round((m - common) / n) * n
    per_task = (m - common) // n
    u, s, vh = torch.linalg.svd(torch.stack(taus).sum(dim=0), full_matrices=False)
    uc = u[:, :common]
    us, ss, vs = [], [], []
    for tau in taus:
        ut, st, vt = torch.linalg.svd(tau - uc @ (uc.T @ tau), full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vt[:per_task])
    cu = torch.cat([*us, uc], dim=1)
    cs = torch.cat([*ss, s[:common]])
    cv = torch.cat([*vs, vh[:common]], dim=0)
    return base + alpha * cs.mean() * (polar(cu) @ polar(cv))
