"""The generalized task-arithmetic core: one parametrised function serves TA, TIES, DARE,
Breadcrumbs and DELLA (the structure of mergekit's ``generalized_task_arithmetic``).

    τᵢ = θᵢ − θ₀ → sparsify each τᵢ → weight → (optional) sign consensus → sum
       → (optional) divide by Σw of contributing entries → scale by λ → θ₀ + result
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]  # (model index, τᵢ) -> sparse τᵢ


def consensus_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES sign election over stacked weighted deltas: ``mass`` elects the sign of the sum,
    ``frequency`` the most common sign; a tie elects +1 (mergekit and PEFT convention).
    Entries whose own sign disagrees (or are zero) are excluded.
    """
    sign = weighted.sign()
    votes = weighted.sum(dim=0) if method == "mass" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)
    return sign == elected


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
    deltas = []
    for i, t in enumerate(tensors):
        d = t - base
        deltas.append(sparsify(i, d) if sparsify is not None else d)
    stacked = torch.stack(deltas)
    del deltas
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * base.dim()))
    weighted = stacked * w
    del stacked
    if consensus is not None:
        mask = consensus_mask(weighted, consensus)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed
