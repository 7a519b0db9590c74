"""Sparsifiers for task vectors: small pure tensor functions shared by TIES, DARE, Breadcrumbs,
DELLA and DPPA. Randomness always comes from an explicit seeded ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed``; identical seeds give identical masks on any thread."""
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``int(density·n)`` entries of largest magnitude (mergekit/PEFT rule, TIES trim).

    The threshold comes from ``kthvalue`` (selection, not a sort); entries tied at it are kept
    lowest index first, so the result is deterministic. ``k = 0`` keeps nothing (PEFT); the
    official TIES code would keep ``int(d·K)+1``.
    """
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    mag = delta.abs().reshape(-1)
    thr = kth_largest(mag, k)
    mask = mag > thr
    short = k - int(mask.sum())
    if short > 0:
        ties = torch.nonzero(mag == thr).reshape(-1)[:short]
        mask[ties] = True
    return mask.view(delta.shape)


def kth_largest(values: torch.Tensor, k: int, sample: int = 1 << 16) -> torch.Tensor:
    """The exact k-th largest of a 1-D tensor in about two linear passes.

    A seeded sample brackets the answer; only the values inside the bracket are selected
    exactly. If the bracket misses (vanishingly rare), a full ``kthvalue`` decides.
    """
    n = values.numel()
    if n <= 4 * sample:
        return values.kthvalue(n - k + 1).values
    gen = torch.Generator().manual_seed(n * 31 + k)
    picks = values[torch.randint(n, (sample,), generator=gen).to(values.device)].sort().values
    q = (n - k) / n
    margin = 6 * math.sqrt(q * (1 - q) / sample) + 4 / sample
    lo = picks[max(0, math.floor((q - margin) * sample))]
    hi = picks[min(sample - 1, math.ceil((q + margin) * sample))]
    above = int((values > hi).sum())
    band = values[(values >= lo) & (values <= hi)]
    rank = k - above  # position of the answer inside the band, from the top
    if 1 <= rank <= band.numel():
        return band.kthvalue(band.numel() - rank + 1).values
    return values.kthvalue(n - k + 1).values


def threshold_mask(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with ``|δ| >= threshold`` (a global top-k threshold, ties kept)."""
    return delta.abs() >= threshold


def outlier_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction (outliers) and the smallest entries so
    that ``density`` remains (Davari & Belilovsky 2023). Uses ``[n_bot : n − n_top]``, avoiding
    mergekit's empty ``[n_bot:-0]`` slice when ``n_top`` is 0.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    order = torch.sort(delta.abs().reshape(-1), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bot : n - n_top]] = True
    return mask.view(delta.shape)


def bernoulli_mask(
    shape: torch.Size, keep: float | torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Keep each entry independently with probability ``keep`` (DARE's drop with p = 1 − keep)."""
    u = torch.rand(shape, generator=gen, dtype=torch.float32)  # CPU stream: same on any device
    if isinstance(keep, torch.Tensor):
        u = u.to(keep.device)
    return u < keep


def rank_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MAGPRUNE keep probabilities: per row, ``density − ε + 2ε·r̂`` with r̂ the magnitude
    rank scaled to [0, 1] (Deep et al. 2024). 1-D tensors are one row.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)
    width = rows.shape[1] - 1
    rhat = ranks / width if width > 0 else torch.zeros_like(ranks)
    return ((density - epsilon) + rhat * (2 * epsilon)).view(delta.shape)


def rescale(
    delta: torch.Tensor, mask: torch.Tensor, how: str, keep: float | torch.Tensor
) -> torch.Tensor:
    """Apply ``mask`` and rescale: ``inverse`` divides by the keep probability (DARE/DELLA papers),
    ``l1`` matches the L1 norm of the unmasked tensor (mergekit), ``none`` only masks.
    """
    masked = delta * mask
    if how == "none":
        return masked
    if how == "inverse":
        return masked / keep
    before, after = delta.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)
