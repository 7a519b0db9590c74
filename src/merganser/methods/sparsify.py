"""Sparsifiers for task vectors: small pure tensor functions shared by TIES, DARE, Breadcrumbs,
DELLA and DPPA. Randomness always comes from a seeded PCG64 stream whose words can be drawn
from any position (``BlockBernoulli``): a mask is the same whole or block by block.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from merganser.methods import fused
from merganser.methods.blockwise import BLOCK, Load, sum_blocks


def topk_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly ``int(density·n)`` entries of largest magnitude (mergekit/PEFT rule, TIES trim).

    The threshold comes from ``kthvalue`` (selection, not a sort); entries tied at it are kept
    lowest index first, so the result is deterministic. ``k = 0`` keeps nothing (PEFT); the
    official TIES code would keep ``int(d·K)+1``.
    """
    return top_k_mask(delta, int(density * delta.numel()))


def top_k_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_mask`` for a count: the ``k`` entries of largest magnitude, ties lowest index
    first."""
    n = delta.numel()
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


SAMPLE = 1 << 16
KEEP_BUFFER = 1 << 20  # values StreamingTopK holds before folding them into (value, count)


def sample_positions(n: int, k: int, sample: int = SAMPLE) -> torch.Tensor:
    """The seeded positions whose values bracket the k-th largest of ``n`` (see kth_largest)."""
    gen = torch.Generator().manual_seed(n * 31 + k)
    return torch.randint(n, (sample,), generator=gen)


@functools.lru_cache(maxsize=4)
def _sorted_positions(n: int, k: int) -> torch.Tensor:
    """``sample_positions`` in ascending order, drawn once for all models of one density
    (callers must not modify it).
    """
    return sample_positions(n, k).sort().values


def bracket(picks: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds that hold the k-th largest of ``n`` values with near certainty, from the picks
    (in any order): two of their order statistics.
    """
    sample = picks.numel()
    q = (n - k) / n
    margin = 6 * math.sqrt(q * (1 - q) / sample) + 4 / sample
    at = [
        max(0, math.floor((q - margin) * sample)),
        min(sample - 1, math.ceil((q + margin) * sample)),
    ]
    p = _as_numpy(picks)
    # On the CPU both statistics come from one linear-time selection: a sort cost 4x as much.
    ranked = picks.sort().values[at] if p is None else torch.from_numpy(np.partition(p, at)[at])
    return ranked[0], ranked[1]


def kth_largest(values: torch.Tensor, k: int, sample: int = SAMPLE) -> torch.Tensor:
    """The exact k-th largest of a 1-D tensor in about two linear passes.

    A seeded sample brackets the answer; only the values inside the bracket are selected
    exactly. If the bracket misses (vanishingly rare), a full ``kthvalue`` decides.
    """
    n = values.numel()
    if n <= 4 * sample:
        return values.kthvalue(n - k + 1).values
    pos = sample_positions(n, k, sample).to(values.device)
    lo, hi = bracket(values[pos], n, k)
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


def _as_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a CPU float tensor: numpy's compare, count and compress kernels run
    4–8× faster than torch's boolean ones on CPU (and release the GIL). None elsewhere.
    """
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        return t.numpy()
    return None


def mask_(delta: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``delta *= keep`` in place for a boolean ``keep`` of as many entries."""
    d = _as_numpy(delta)
    if d is None or keep.device.type != "cpu":
        return delta.mul_(keep.view(delta.shape))
    np.multiply(d, keep.numpy().reshape(d.shape), out=d)  # 3× torch's bool × float kernel
    return delta


def _band(mag: torch.Tensor, lo: float, hi: float) -> tuple[torch.Tensor, int]:
    """The values of ``mag`` in [lo, hi], and how many values are >= lo."""
    m = _as_numpy(mag)
    if m is None:
        at_least_lo = mag >= lo
        return mag[at_least_lo & (mag <= hi)], int(torch.count_nonzero(at_least_lo))
    at_least = m >= m.dtype.type(lo)
    inside = np.logical_and(at_least, m <= m.dtype.type(hi))
    # np.compress: 2–6× faster than indexing with the boolean mask when many entries are kept.
    return torch.from_numpy(np.compress(inside, m)), int(np.count_nonzero(at_least))


def _count_equal(mag: torch.Tensor, value: float) -> int:
    m = _as_numpy(mag)
    if m is None:
        return int(torch.count_nonzero(mag == value))
    return int(np.count_nonzero(m == m.dtype.type(value)))


class StreamingTopK:
    """``topk_mask`` for a tensor seen block by block, in order: the same entries, exactly.

    Pass 0 reads the seeded sample (``want`` gives its positions in a block), pass 1 counts the
    magnitudes above the sample's bracket and keeps those inside it, and if the bracket missed,
    pass 2 keeps them all. ``trim_`` then keeps ``|δ| > thr`` plus the first entries equal to
    ``thr``, lowest index first, as ``topk_mask`` does. With ``l1`` it also sums the L1 norms
    ``rescale: l1`` needs. Only for ``n > 4 * SAMPLE`` (smaller tensors take the whole-tensor
    path).

    Kept values are folded into (distinct value, count) pairs once they pile up: deltas of bf16
    weights take few distinct values, so a bracket can hold a large share of a tensor.
    """

    def __init__(self, n: int, density: float, l1: bool = False, k: int | None = None):
        self.n, self.k, self.l1 = n, int(density * n) if k is None else k, l1
        self.trivial = self.k >= n or self.k <= 0
        # The sample is drawn when first needed: constructing one is cheap.
        self._pos: torch.Tensor | None = None
        self._picks = torch.empty(0)
        self.lo = self.hi = torch.tensor(0.0)
        self.above, self.above_l1, self.total_l1 = 0, 0.0, 0.0
        self._tied = 0  # values seen in a bracket of one value (lo == hi): counted, not kept
        # Kept values not yet folded, in one buffer: many small long-lived tensors interleaved
        # with each block's temporaries would fragment the heap (hundreds of MB of RSS).
        self._raw = torch.empty(0)
        self._used = 0
        self._folded = (torch.empty(0), torch.empty(0, dtype=torch.int64))  # ascending, counts
        self.thr: float | None = 0.0
        self.short, self.kept_l1 = 0, 0.0

    def wants_pass(self, p: int) -> bool:
        return not self.trivial and (p < 2 or (p == 2 and self.thr is None))

    def want(self, start: int, count: int) -> tuple[torch.Tensor, slice]:
        """Sample positions inside [start, start+count), relative to start, and their slots."""
        if self._pos is None:
            self._pos = _sorted_positions(self.n, self.k)
            self._picks = torch.empty(SAMPLE)
        a = int(torch.searchsorted(self._pos, start))
        b = int(torch.searchsorted(self._pos, start + count))
        return self._pos[a:b] - start, slice(a, b)

    def take_sample(self, slots: slice, mag: torch.Tensor) -> None:
        self._picks[slots] = mag.float().cpu()

    def observe(self, p: int, mag: torch.Tensor) -> None:
        """Pass 1 (bracketed) or 2 (everything): counts, kept values and L1 sums of one block."""
        if p == 2:
            self._keep(mag.clone())
            return
        band, at_least_lo = _band(mag, float(self.lo), float(self.hi))
        if self.l1:
            self.above_l1 += float(F.threshold(mag, float(self.hi), 0.0).sum(dtype=torch.float64))
            self.total_l1 += float(mag.sum(dtype=torch.float64))
        self.add_band(at_least_lo - band.numel(), band)

    def add_band(self, above: int, band: torch.Tensor) -> None:
        """Pass 1's findings for one block, however computed: how many magnitudes lie above
        the bracket, and the values inside it (copied).
        """
        self.above += above
        if band.numel() and bool(self.lo == self.hi):
            # A bracket of one value (all-zero deltas: a frozen or untouched tensor) holds
            # nothing to sort: counting its members, not keeping them, saved DPPA and TIES a
            # fold (a sort) of every entry of such tensors.
            self._tied += band.numel()
            return
        self._keep(band)

    def _keep(self, values: torch.Tensor) -> None:
        values = values.reshape(-1).cpu()
        if self._raw.numel() - self._used < values.numel() and self._raw.numel() < KEEP_BUFFER:
            # Grown as needed up to KEEP_BUFFER: most brackets hold far fewer values, and a
            # merge keeps a buffer per model and selector (DPPA: two) in each thread.
            size = min(KEEP_BUFFER, max(2 * self._raw.numel(), self._used + values.numel()))
            grown = torch.empty(size)
            grown[: self._used] = self._raw[: self._used]
            self._raw = grown
        while values.numel():
            take = min(values.numel(), KEEP_BUFFER - self._used)
            self._raw[self._used : self._used + take] = values[:take]
            self._used += take
            values = values[take:]
            if self._used == KEEP_BUFFER:
                self._fold()

    def _fold(self) -> None:
        # numpy's unique sorts 3x faster than torch's here; NaNs stay apart, as in torch's.
        vals, counts = (t.numpy() for t in self._folded)
        new, new_counts = np.unique(
            self._raw[: self._used].numpy(), return_counts=True, equal_nan=False
        )
        self._used = 0
        vals, inverse = np.unique(np.concatenate([vals, new]), return_inverse=True, equal_nan=False)
        total = np.zeros(vals.size, np.int64)
        np.add.at(total, inverse, np.concatenate([counts, new_counts]))
        self._folded = (torch.from_numpy(vals), torch.from_numpy(total))

    def end_pass(self, p: int) -> None:
        if p == 0:
            self.lo, self.hi = bracket(self._picks, self.n, self.k)
            return
        if p == 2:
            self.above, self.above_l1 = 0, 0.0
        rank = self.k - self.above
        if self._tied:
            vals, counts = self._folded
            one = torch.tensor([float(self.hi)], dtype=torch.float32)
            self._folded = (torch.cat([vals, one]), torch.cat([counts, torch.tensor([self._tied])]))
            self._tied = 0
        found = self._select(rank) if self._folded[0].numel() else self._select_raw(rank, p == 1)
        self._folded = (torch.empty(0), torch.empty(0, dtype=torch.int64))
        self._raw, self._used = torch.empty(0), 0
        if found is None:
            self.thr = None  # the bracket missed: pass 2 looks at everything
            return
        self.thr, over, band_l1 = found
        self.short = rank - over
        self.kept_l1 = self.above_l1 + band_l1 + self.short * self.thr

    def _select_raw(self, rank: int, band: bool) -> tuple[float, int, float] | None:
        """(thr, kept values above it, their L1) by a linear-time selection in the unfolded
        values: the usual case, and several times cheaper than folding them (a sort).
        """
        raw = self._raw[: self._used]
        if not 1 <= rank <= raw.numel():
            return None
        if band and not self.l1 and fused.available():  # a band holds no NaN, no -0
            thr, over = fused.kernels().kth_largest(raw.numpy(), rank)
            return float(thr), int(over), 0.0
        thr = raw.kthvalue(raw.numel() - rank + 1).values
        above = raw > thr
        if not self.l1:  # the L1 sum is wanted by `rescale: l1` alone
            return float(thr), int(torch.count_nonzero(above)), 0.0
        over = raw[above]
        return float(thr), over.numel(), float(over.sum(dtype=torch.float64))

    def _select(self, rank: int) -> tuple[float, int, float] | None:
        """``_select_raw`` over the folded (value, count) pairs."""
        self._fold()
        vals, counts = self._folded
        if not 1 <= rank <= int(counts.sum()):
            return None
        vals, counts = vals.flip(0), counts.flip(0)  # largest first
        at = int(torch.searchsorted(counts.cumsum(0), rank))  # first reaching the rank
        over = int(counts[:at].sum())
        return float(vals[at]), over, float((vals[:at].double() * counts[:at]).sum())

    def trim_(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero in place the entries of the next block that ``topk_mask`` drops (blocks must
        come in order). Float kernels only: a boolean mask and multiply cost ~3× as much on CPU.
        """
        if self.trivial:
            return delta if self.k >= self.n else delta.zero_()
        assert self.thr is not None
        mag = delta.abs()
        if self.short > 0:
            tied = _count_equal(mag, self.thr)
            if 0 < tied <= self.short:  # every tie in this block is kept: keep |δ| >= thr
                self.short -= tied
                below = torch.nextafter(mag.new_tensor(self.thr), mag.new_tensor(-math.inf))
                return torch.copysign(F.threshold(mag, float(below), 0.0), delta, out=delta)
            if tied:
                kept = F.threshold(mag, self.thr, 0.0)
                kept[torch.nonzero(mag == self.thr).reshape(-1)[: self.short]] = self.thr
                self.short = 0
                return torch.copysign(kept, delta, out=delta)
        return torch.copysign(F.threshold(mag, self.thr, 0.0), delta, out=delta)


def observe_selectors(
    selectors: list[tuple[int, StreamingTopK]], p: int, start: int, count: int, load: Load
) -> None:
    """One block (pass 0: one segment) of statistic pass ``p`` for several StreamingTopK, each
    over one model's |τ| (the model's index comes with it): pass 0 gathers each sample's
    positions once per (n, k), later passes take each model's magnitudes once."""
    if p == 0:
        loaded: dict[int, tuple[list[torch.Tensor], torch.Tensor | None]] = {}
        for i, s in selectors:
            if s.wants_pass(0):
                idx, slots = s.want(start, count)
                if idx.numel():
                    if s.k not in loaded:  # sample positions depend on (n, k) alone
                        loaded[s.k] = load(idx)
                    tensors, base = loaded[s.k]
                    s.take_sample(slots, (tensors[i] - base).abs_())
        return
    tensors, base = load(None)
    mags: dict[int, torch.Tensor] = {}
    for i, s in selectors:
        if s.wants_pass(p):
            if i not in mags:
                mags = {i: (tensors[i] - base).abs_()}  # selectors of one model come together
            s.observe(p, mags[i])


def l1_scale(before: float, after: float) -> float:
    """``rescale: l1``'s factor from whole-tensor L1 norms (1 where either is ~0)."""
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


class BlockBernoulli:
    """DARE's keep masks for one model's tensor: entry j is kept with probability ``keep`` (to
    2⁻²⁴, like a float32 uniform). Entry j's draw is the j-th 32-bit half of one seeded PCG64
    stream, so any range of entries can be drawn alone, the same however the tensor is split.
    """

    def __init__(self, seed: int):
        self._bits = np.random.PCG64(seed)
        self._state = self._bits.state
        inc = self._state["state"]["inc"]
        self._fast = fused.PCG64Words(inc) if fused.available() else None

    @staticmethod
    def limit(keep: float) -> int | None:
        """Entry j is kept where ``words()[j] < limit``; None where every entry is kept."""
        limit = math.ceil(keep * (1 << 24))  # kept when the draw's top 24 bits are below this
        return None if limit >= 1 << 24 else limit << 8

    def words(self, start: int, count: int) -> np.ndarray:
        """The 32-bit draws of entries [start, start + count), contiguous."""
        self._bits.state = self._state
        self._bits.advance(start // 2)  # numpy keeps PCG64's raw output and advance() stable
        off = start % 2
        words = (off + count + 1) // 2
        if self._fast is not None:
            raw = self._fast(self._bits.state["state"]["state"], words)
        else:
            raw = self._bits.random_raw(words)
        return np.ascontiguousarray(raw.astype("<u8", copy=False).view("<u4")[off : off + count])

    def __call__(self, start: int, count: int, keep: float) -> torch.Tensor:
        limit = self.limit(keep)
        if limit is None:
            return torch.ones(count, dtype=torch.bool)
        return torch.from_numpy(self.words(start, count) < np.uint32(limit))


def rank_keep_probs(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MAGPRUNE keep probabilities: per row, ``density − ε + 2ε·r̂`` with r̂ the magnitude
    rank scaled to [0, 1] (Deep et al. 2024). 1-D tensors are one row. Equal magnitudes rank
    in index order (a stable sort), so the ranks do not depend on the sort's implementation.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    return row_keep_probs(rows.abs(), density, epsilon).view(delta.shape)


def row_keep_probs(mag: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """``rank_keep_probs`` of magnitudes already laid out as rows (rows, width)."""
    if mag.device.type == "cpu" and mag.dtype == torch.float32 and fused.available():
        ranks = fused.row_ranks(mag)  # a radix sort: 5-10x faster than torch's argsort here
    else:
        # Ranks are the inverse permutation of one argsort: a scatter, not a second sort.
        order = mag.argsort(dim=1, stable=True)
        ranks = torch.empty(mag.shape, dtype=torch.float32, device=mag.device)
        pos = torch.arange(mag.shape[1], dtype=torch.float32, device=mag.device)
        ranks.scatter_(1, order, pos.expand_as(ranks))
        del order
    width = mag.shape[1] - 1
    rhat = ranks.div_(width) if width > 0 else ranks.zero_()
    return rhat.mul_(2 * epsilon).add_(density - epsilon)


def keep_where_below(words: np.ndarray, probs: torch.Tensor) -> torch.Tensor:
    """Entry j is kept where the uniform (``words[j]``'s top 24 bits)·2⁻²⁴ is below ``probs[j]``
    (float32 against float32, both exact: one rule on every path and device).
    """
    u = torch.from_numpy((words >> np.uint32(8)).astype(np.float32)).mul_(2.0**-24)
    return u.to(probs.device) < probs.reshape(-1)


def rescale(
    delta: torch.Tensor,
    mask: torch.Tensor,
    how: str,
    keep: float | torch.Tensor,
    block: int = BLOCK,
) -> torch.Tensor:
    """Apply ``mask`` and rescale: ``inverse`` divides by the keep probability (DARE/DELLA papers),
    ``l1`` matches the L1 norm of the unmasked tensor (mergekit), ``none`` only masks. The L1
    norms are summed per ``block`` entries, as the method's block-by-block merge sums them.
    """
    masked = delta * mask
    l1 = 1.0
    if how == "l1":
        l1 = l1_scale(sum_blocks(delta.abs(), block=block), sum_blocks(masked.abs(), block=block))
    return rescale_kept(masked, how, keep, l1)


def rescale_kept(
    kept: torch.Tensor, how: str, keep: float | torch.Tensor, l1: float
) -> torch.Tensor:
    """``rescale`` of already-masked deltas, in place, given the L1 factor (``l1_scale`` of the
    whole tensor's norms, which a block-by-block merge gathers in a statistic pass).
    """
    if how == "inverse":
        return kept.div_(keep)
    if how == "l1":
        return kept.mul_(l1)
    return kept
