"""The generalized task-arithmetic core: one parametrised function serves TA, TIES, DARE,
Breadcrumbs and DELLA (the structure of mergekit's ``generalized_task_arithmetic``).

    τᵢ = θᵢ − θ₀ → sparsify each τᵢ → weight → (optional) sign consensus → sum
       → (optional) divide by Σw of contributing entries → scale by λ → θ₀ + result
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Sparsifier = Callable[[int, torch.Tensor], torch.Tensor]  # (model index, τᵢ) -> sparse τᵢ


def ordered_sum(stacked: torch.Tensor) -> torch.Tensor:
    """Σ over the models (dim 0), added one by one from +0 in recipe order: the one defined
    summation of the elected methods. The fused kernels repeat it bit for bit for any number
    of models; torch's own ``sum(dim=0)`` agrees with it up to four rows and reorders from
    five on, which had kept five or more models off the kernels.
    """
    out = torch.zeros_like(stacked[0])
    for row in stacked:
        out.add_(row)
    return out


def elect_positive(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES sign election over stacked weighted deltas: where +1 is elected. ``mass`` elects
    the sign of the sum, ``frequency`` the most common sign; a tie elects +1 (mergekit and PEFT
    convention).
    """
    if method == "mass":
        return ordered_sum(weighted) >= 0
    return (weighted > 0).sum(dim=0) >= (weighted < 0).sum(dim=0)  # counts: exact in any order


def consensus_mask(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """The entries that agree with the elected sign (zeros never do)."""
    return torch.where(elect_positive(weighted, method), weighted > 0, weighted < 0)


def disjoint_merge(
    stacked: torch.Tensor, weight: list[float], method: str, normalize: bool
) -> torch.Tensor:
    """TIES elect + disjoint merge of stacked deltas (Yadav et al. 2023): Σ of the weighted
    entries that agree with the elected sign, divided by Σ of their weights if ``normalize``.

    Consumes ``stacked``. The same numbers as ``consensus_mask`` (up to the sign of zeros), but
    in float arithmetic: boolean kernels (compare, where, bool→float) cost 3–10× as much on CPU.
    """
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    w = w.view(-1, *([1] * (stacked.dim() - 1)))
    unit = all(x == 1 for x in weight)
    if not unit:
        stacked.mul_(w)
    signs = torch.sign(stacked)
    total = ordered_sum(stacked) if method == "mass" else ordered_sum(signs)
    elected = torch.sign(total).add_(0.5).sign_()  # +1 where total >= 0 (ties elect +1), else -1
    agree = signs.mul_(elected).clamp_(min=0)  # 1 where the entry has the elected sign, else 0
    mixed = ordered_sum(stacked.mul_(agree))
    if normalize:
        divisor = ordered_sum(agree) if unit else ordered_sum(agree.mul_(w))
        if min(weight) > 0:
            # A sum of positive weights is 0 only where nothing agrees, and there mixed is 0:
            # any positive divisor gives the 0/1 = 0 of the rule below, without a boolean mask.
            divisor.clamp_(min=min(weight))
        else:
            divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


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
        # No election: accumulate Σ wᵢτᵢ model by model in two working copies, the second
        # reused for every model after the first (each fresh one costs its page faults).
        mixed: torch.Tensor | None = None
        spare: torch.Tensor | None = None
        for i, t in enumerate(tensors):
            if spare is not None and spare.dtype == torch.result_type(t, base):
                d = torch.sub(t, base, out=spare)
            else:
                d = t - base
            d = sparsify(i, d) if sparsify is not None else d
            if weight[i] != 1:
                d.mul_(weight[i])
            if mixed is None:
                mixed = d
            else:
                mixed.add_(d)
                spare = d
        assert mixed is not None
        if normalize:
            total = float(sum(weight))
            mixed.div_(total if abs(total) >= 1e-8 else 1.0)
    else:
        stacked = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
        for i, t in enumerate(tensors):
            d = torch.sub(t, base, out=stacked[i])
            if sparsify is not None:
                kept = sparsify(i, d)
                if kept.data_ptr() != d.data_ptr():
                    d.copy_(kept)
        mixed = disjoint_merge(stacked, weight, consensus, normalize)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)
