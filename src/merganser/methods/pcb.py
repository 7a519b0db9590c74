"""PCB-merging: parameter competition balancing (Du et al., NeurIPS 2024, arXiv 2410.02396),
per tensor.
"""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


def _clamp_rows(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Each row clipped to its sorted values at int(d·low) and int(d·(1−high) − 1), as the
    reference ``clamp`` indexes them.
    """
    d = x.shape[1]
    s = x.sort(dim=1).values
    lo = s[:, int(d * low)].unsqueeze(1)
    hi = s[:, max(int(d * (1 - high) - 1), 0)].unsqueeze(1)
    return torch.minimum(torch.maximum(x, lo), hi)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1]; a constant row (a task that left the tensor alone) is 0
    where the reference divides 0 by 0.
    """
    lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


@register(
    "pcb",
    params=(
        Param("pcb_ratio", "global", 0.1, low=0.0, high=1.0, doc="share of entries kept per task"),
        Param("lambda", "global", 1.2, doc="scale of the merged task vector (reference: 1.2)"),
        Param(
            "clamp",
            "global",
            1e-4,
            low=0.0,
            high=0.5,
            doc="share of the smallest and largest magnitudes clipped first (vision script: 0.01)",
        ),
    ),
    needs_base=True,
    workspace=6.0,
    reference="Du et al., Parameter Competition Balancing for Model Merging, NeurIPS 2024, "
    "arXiv 2410.02396",
)
def pcb(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    pcb_ratio: float = 0.1,
    lambda_: float = 1.2,
    clamp: float = 1e-4,
) -> torch.Tensor:
    """θ₀ + λ·Σᵢ T̃ᵢ⊙scaleᵢ / Σᵢ scaleᵢ, scale the min-max of β = exp(n·minmax(A)²) ⊙
    tanh(T ⊙ ΣT) above its (1 − ratio) quantile, T̃ = sign(T)⊙A, A the clipped |T| (spec
    §6.1, the reference PCB_merge, per tensor). Where the quantile is the row's largest β
    (too few entries for the ratio), the entries at that maximum are kept.
    """
    t = torch.stack([(x - base).reshape(-1) for x in tensors])
    n, d = t.shape
    a = _clamp_rows(t.abs(), clamp, clamp)
    signed = torch.sign(t) * a
    beta = torch.exp(n * _minmax(a) ** 2) * torch.tanh(t * t.sum(dim=0))
    s = beta.sort(dim=1).values
    cut = int(d * (1 - pcb_ratio))
    if cut >= d - 1:  # the reference's 0/0: keep the row's largest β (spec §6.2, pitfall 3)
        scale = (beta >= s[:, -1:]).to(beta.dtype)
    else:
        scale = _minmax(torch.maximum(beta, s[:, cut].unsqueeze(1)))
    merged = (signed * scale).sum(dim=0) / scale.sum(dim=0).clamp_min(1e-12)
    return base + lambda_ * merged.reshape(base.shape)
