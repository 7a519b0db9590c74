"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081)."""

from __future__ import annotations

import torch

from merganser.methods._subspace import MATRIX, polar
from merganser.methods.registry import Param, register


@register(
    "tsv_m",
    params=(
        Param("alpha", "global", 1.0, doc="scale of the merged task vector (FusionBench: 1.0)"),
        MATRIX,
    ),
    needs_base=True,
    workspace=4.0,
    reference="Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model "
    "Merging, CVPR 2025, arXiv 2412.00081",
)
def tsv_m(
    tensors: list[torch.Tensor], base: torch.Tensor, alpha: float = 1.0, matrix: bool = True
) -> torch.Tensor:
    """θ₀ + α·τ, τ = polar(U)·diag(s)·polar(Vᵀ) from each task vector's top ⌊r/T⌋ singular
    triplets side by side (2-D tensors); other tensors: the mean task vector (spec §1.1).
    """
    taus = [t - base for t in tensors]
    if base.dim() != 2 or not matrix:
        return base + alpha * torch.stack(taus).mean(dim=0)
    r, n = min(base.shape), len(taus)
    k = r // n
    if k == 0:
        raise ValueError(
            f"TSV-M keeps r/T = {r}/{n} < 1 singular vectors per task of this {list(base.shape)} "
            "matrix, so its merged change would be zero; give it matrix: false (a filter) to "
            "average it"
        )
    us, ss, vs = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    u_cat, s_cat, v_cat = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    return base + alpha * (polar(u_cat) @ torch.diag(s_cat) @ polar(v_cat))
