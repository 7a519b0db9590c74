"""The generalized task-arithmetic core: one parametrised function serves TA, TIES, DARE,
Breadcrumbs and DELLA (the structure of mergekit's ``generalized_task_arithmetic``).

    τᵢ = θᵢ − θ₀ → sparsify each τᵢ → weight → (optional) sign consensus → sum
       → (optional) divide by Σw of contributing entries → scale by λ → θ₀ + result
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]  # (model index, τᵢ) -> sparse τᵢ


def elect_positive(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES sign election over stacked weighted deltas: where +1 is elected. ``mass`` elects
    the sign of the sum, ``frequency`` the most common sign; a tie elects +1 (mergekit and PEFT
    convention).
    """
    if method == "mass":
        return weighted.sum(dim=0) >= 0
    return (weighted > 0).sum(dim=0) >= (weighted < 0).sum(dim=0)


def consensus_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """The entries that agree with the elected sign (zeros never do)."""
    return torch.where(elect_positive(weighted, method), weighted > 0, weighted < 0)


def generalized_task_arithmetic(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    *,
    sparsify: Sparsifier | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> torch.Tensor:
    """θ₀ + λ · mix(sparsify(θᵢ − θ₀)) (Ilharco et al. 2023; Yadav et al. 2023; Yu et al. 2024)."""
    if consensus is None:
        # No election: accumulate Σ wᵢτᵢ model by model (two working copies, not n).
        mixed: torch.Tensor | None = None
        for i, t in enumerate(tensors):
            d = t - base
            d = (sparsify(i, d) if sparsify is not None else d).mul_(weight[i])
            mixed = d if mixed is None else mixed.add_(d)
        assert mixed is not None
        if normalize:
            total = float(sum(weight))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    else:
        stacked = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
        for i, t in enumerate(tensors):
            d = t - base
            stacked[i] = sparsify(i, d) if sparsify is not None else d
            del d
        w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
        w = w.view(-1, *([1] * base.dim()))
        stacked.mul_(w)  # weighted deltas in place: n copies of the tensor is the peak
        # Σ of the entries that agree with the elected sign, as a select between the sums of
        # the positive and of the negative entries: vectorised, where a per-model boolean
        # mask is not (the same numbers as consensus_mask, up to the sign of zero sums).
        elect = elect_positive(stacked, consensus)
        mixed = torch.where(elect, stacked.clamp(min=0).sum(dim=0), stacked.clamp(max=0).sum(dim=0))
        if normalize:
            pos = ((stacked > 0).to(stacked.dtype) * w).sum(dim=0)
            neg = ((stacked < 0).to(stacked.dtype) * w).sum(dim=0)
            divisor = torch.where(elect, pos, neg)
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
        del stacked
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)
