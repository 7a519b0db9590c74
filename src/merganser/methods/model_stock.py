"""Model Stock: interpolate between the average of fine-tuned models and the base by angle."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "model_stock",
    params=(
        Param(
            "filter_wise", "global", False, kind=bool, doc="one ratio per row instead of per tensor"
        ),
    ),
    needs_base=True,
    min_models=2,
    workspace=1.0,
    reference="Jang, Yun & Han, Model Stock, ECCV 2024, arXiv 2403.19522",
)
def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False
) -> torch.Tensor:
    """θ_H = t·mean(θᵢ) + (1−t)·θ₀ with t = N cosθ / (1 + (N−1) cosθ), cosθ the mean pairwise
    cosine of the task vectors (Jang et al. 2024; pairwise mean for N > 2 as in mergekit).
    """
    shape = base.shape
    if filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        b, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - b for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos) / (1 + (n - 1) * cos)
    avg = sum(ws) / n
    return (t * avg + (1 - t) * b).reshape(shape)
