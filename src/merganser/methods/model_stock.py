"""Model Stock: interpolate between the average of fine-tuned models and the base by angle."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register

# Up to this many models the cosines are mergekit's, pair by pair (its bits); past it, in one
# pass over the models (the pairwise loop took minutes for a recipe of 900 models).
PAIRWISE_MAX = 16
NORM_FLOOR = 1e-6  # mergekit's floor on the product of two offsets' norms


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
    cosine of the task vectors (Jang et al. 2024; pairwise mean for N > 2 as in mergekit). Where
    1 + (N−1) cosθ vanishes (opposed task vectors) there is no finite estimate: θ₀, as mergekit.
    """
    shape = base.shape
    if filter_wise:
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        b, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - b for w in ws]
    n = len(ws)
    pairwise = n <= PAIRWISE_MAX
    cos = (mean_pairwise_cosine(offsets) if pairwise else mean_cosine_linear(offsets)).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * b).reshape(shape)


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """The mean over pairs of cos(oᵢ, oⱼ) along the last axis, norm products floored at 1e-6
    and each cosine clamped to [−1, 1] (mergekit's order of operations and bits)."""
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def mean_cosine_linear(offsets: list[torch.Tensor]) -> torch.Tensor:
    """The same mean in one pass: Σ_{i<j} uᵢ·uⱼ = (‖Σ uᵢ‖² − Σ ‖uᵢ‖²) / 2 with uᵢ = oᵢ / max(‖oᵢ‖,
    10⁻³), in float64. It equals the pairwise mean where both norms are at least 10⁻³ or both
    below (there the floor is mergekit's 10⁻⁶ on the product); only a pair with one norm on each
    side is floored differently."""
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    floor = NORM_FLOOR**0.5
    for o in offsets:
        o64 = o.double()
        u = o64 / o64.norm(dim=-1, keepdim=True).clamp(min=floor)
        sq = u.square().sum(dim=-1)
        total = u if total is None else total.add_(u)
        squares = sq if squares is None else squares.add_(sq)
    assert total is not None and squares is not None
    n = len(offsets)
    pairs = n * (n - 1) / 2
    return ((total.square().sum(dim=-1) - squares) / 2 / pairs).clamp(-1, 1).float()
