"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import torch

from merganser.methods import fused
from merganser.methods.blockwise import BlockMerge, Load
from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import (
    SAMPLE,
    StreamingTopK,
    l1_scale,
    observe_selectors,
    rescale_kept,
    threshold_mask,
    topk_mask,
)
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import generalized_task_arithmetic

SIGN = Param(
    "sign_method",
    "global",
    "mass",
    kind=str,
    choices=("mass", "frequency"),
    doc="elect the sign of the summed deltas (mass) or the most common sign",
)
SCOPE = Param(
    "scope",
    "global",
    "per_tensor",
    kind=str,
    choices=("per_tensor", "global"),
    paper="global",
    doc="trim each tensor (mergekit) or the whole model at once (paper)",
)


# scope: global (the paper's trim): exact whole-model thresholds from streaming histograms.
_HI_BINS = 1 << 15  # the high 16 bits of a non-negative float32 (sign bit is 0)
_LO_BINS = 1 << 16


def _bits(x: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 the int32 bit pattern orders exactly like the value.
    return x.float().contiguous().view(torch.int32).reshape(-1).to(torch.int64)


class GlobalTopK:
    """Exact per-model magnitude threshold keeping the top ``density`` of |τᵢ| over the whole
    model, found with two histogram passes over float32 bit patterns (high 16 bits, then the
    low 16 bits inside the crossing bin) instead of sorting a flattened model.
    """

    passes = 2
    # Histograms add up over any split of a tensor: the engine may feed pieces of it.
    chunked = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hi: list[torch.Tensor] = []
        self.lo: list[torch.Tensor] = []
        # per model, entries seen at each density: k = Σ density · entries, summed in one order
        # (sorted densities) whatever the order the pieces arrive in
        self.entries: list[dict[float, int]] = []
        self.bin: list[int] = []
        self.rest: list[int] = []
        self.threshold: list[float] = []

    @property
    def k(self) -> list[int]:
        """Each model's whole-model count of entries to keep."""
        return [int(sum(d * n for d, n in sorted(e.items()))) for e in self.entries]

    def observe(
        self,
        pass_index: int,
        name: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        start: int,
        shape: tuple[int, ...],
    ) -> None:
        assert base is not None
        counts = []  # on the CPU: a tensor too large for a GPU budget is observed there
        for t in tensors:
            bits = _bits((t - base).abs())
            if pass_index == 0:
                counts.append(torch.bincount(bits >> 16, minlength=_HI_BINS).cpu())
            else:
                i = len(counts)
                sel = bits[(bits >> 16) == self.bin[i]] & 0xFFFF
                counts.append(torch.bincount(sel, minlength=_LO_BINS).cpu())
        with self._lock:
            target = self.hi if pass_index == 0 else self.lo
            if not target:
                target.extend(torch.zeros_like(c) for c in counts)
                if pass_index == 0:
                    self.entries = [{} for _ in counts]
            for i, c in enumerate(counts):
                target[i] += c
                if pass_index == 0:
                    d = float(params["density"][i])
                    self.entries[i][d] = self.entries[i].get(d, 0) + tensors[i].numel()

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            for hist, k in zip(self.hi, self.k, strict=True):
                b, rest = _crossing(hist, k)
                self.bin.append(b)
                self.rest.append(rest)
            return
        for b, rest, hist in zip(self.bin, self.rest, self.lo, strict=True):
            if b < 0:  # k = 0: keep nothing
                self.threshold.append(float("inf"))
                continue
            low, _ = _crossing(hist, rest)
            bits = torch.tensor([(b << 16) | max(low, 0)], dtype=torch.int32)
            self.threshold.append(float(bits.view(torch.float32).item()))

    def params_for(self, name: str) -> dict[str, Any]:
        return {"threshold": list(self.threshold)}


def _crossing(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and how many values are still needed inside it."""
    if k <= 0:
        return -1, 0
    from_top = hist.flip(0).cumsum(0)
    idx = int(torch.searchsorted(from_top, torch.tensor(k)).clamp(max=len(hist) - 1))
    b = len(hist) - 1 - idx
    above = int(from_top[idx - 1]) if idx > 0 else 0
    return b, k - above


def _global_stats(params: dict[str, Any]) -> GlobalTopK | None:
    return GlobalTopK() if params.get("scope") == "global" else None


class TiesBlocks(BlockMerge):
    """``ties`` (per-tensor scope) block by block: each model's exact top-k threshold comes
    from statistic passes (StreamingTopK), then the trim, election and mean run per block.
    """

    def __init__(self, params: dict[str, Any], numel: int):
        self.params = params
        l1 = params["rescale"] == "l1"
        self.sel = [StreamingTopK(numel, d, l1) for d in params["density"]]
        self._band = np.empty(0, np.float32)
        self._settings: fused.Settings | None = None

    def wants_pass(self, p: int) -> bool:
        return any(s.wants_pass(p) for s in self.sel)

    def sampled(self, p: int) -> bool:
        return p == 0

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        observe_selectors(list(enumerate(self.sel)), p, start, count, load)

    def end_pass(self, p: int) -> None:
        for s in self.sel:
            if s.wants_pass(p):
                s.end_pass(p)

    def fused(self) -> bool:
        # rescale: l1 sums magnitudes in float64 in torch's order: it stays on the torch path.
        return self.params["rescale"] != "l1" and fused.supports(
            len(self.sel), self.params["sign_method"]
        )

    def observe_raw(self, p: int, start: int, tensors: list[torch.Tensor], base: Any) -> None:
        if p == 0:  # the sampled pass, over a whole segment: models of one density share it
            by_k: dict[int, list[int]] = {}
            for i, s in enumerate(self.sel):
                if s.wants_pass(0):
                    by_k.setdefault(s.k, []).append(i)
            for group in by_k.values():
                wants = [self.sel[i].want(start, base.numel()) for i in group]  # the same
                idx, slots = wants[0]
                if idx.numel():
                    picks = fused.sample([tensors[i] for i in group], base, idx)
                    for i, row in zip(group, picks, strict=True):
                        self.sel[i].take_sample(slots, row)
            return
        if p == 2:  # the bracket missed (vanishingly rare): the torch path keeps everything
            self.observe(
                p, start, base.numel(), lambda _: ([t.float() for t in tensors], base.float())
            )
            return
        if self._band.size < base.numel():
            self._band = np.empty(base.numel(), np.float32)
        for i, s in enumerate(self.sel):
            if s.wants_pass(p):
                nb, above = fused.band(tensors[i], base, float(s.lo), float(s.hi), self._band)
                s.add_band(above, torch.from_numpy(self._band[:nb]))

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: Any, out: torch.Tensor
    ) -> bool:
        if self._settings is None:
            prm = self.params
            st = self._settings = fused.Settings(len(self.sel))
            for i, s in enumerate(self.sel):
                if s.trivial:
                    st.mode[i] = fused.KEEP if s.k >= s.n else fused.ZERO
                else:
                    assert s.thr is not None
                    st.mode[i], st.thr[i], st.short[i] = fused.TRIM, s.thr, s.short
                if prm["rescale"] == "inverse":
                    st.scale_op[i], st.scale[i] = fused.SCALE_DIV, prm["density"][i]
            st.set_mix(prm["weight"], prm["sign_method"], prm["normalize"], prm["lambda_"])
        # The settings' ``short`` now counts the ties still to keep (self.sel's stays unused).
        return fused.merge(self._settings, tensors, base, [None] * len(tensors), out)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        prm = self.params
        how, density = prm["rescale"], prm["density"]

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            s = self.sel[i]
            l1 = l1_scale(s.total_l1, s.kept_l1) if s.l1 and not s.trivial else 1.0
            return rescale_kept(s.trim_(d), how, density[i], l1)

        return generalized_task_arithmetic(
            tensors,
            base,
            prm["weight"],
            sparsify=sparsify,
            consensus=prm["sign_method"],
            normalize=prm["normalize"],
            lambda_=prm["lambda_"],
        )


class TiesGlobalBlocks(BlockMerge):
    """``ties`` with ``scope: global``: the whole-model thresholds come from the statistic
    passes before the merge, so the trim (|τᵢ| ≥ thresholdᵢ), election and mean are
    elementwise, block by block, on the fused kernels where they serve."""

    def __init__(self, params: dict[str, Any]):
        self.params = params  # the thresholds arrive in it after the statistic passes
        self._settings: fused.Settings | None = None

    def fused(self) -> bool:
        return fused.supports(len(self.params["density"]), self.params["sign_method"])

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: Any, out: torch.Tensor
    ) -> bool:
        if self._settings is None:
            prm = self.params
            st = self._settings = fused.Settings(len(tensors))
            for i, thr in enumerate(prm["threshold"]):
                # The kernels keep |δ| > t: t just below the threshold keeps |δ| ≥ it (k = 0
                # gives an infinite threshold, which keeps only infinite deltas, as torch does).
                below = np.nextafter(np.float32(thr), np.float32(-np.inf))
                st.mode[i], st.thr[i], st.short[i] = fused.TRIM, below, 0
                if prm["rescale"] == "inverse":
                    st.scale_op[i], st.scale[i] = fused.SCALE_DIV, prm["density"][i]
            st.set_mix(prm["weight"], prm["sign_method"], prm["normalize"], prm["lambda_"])
        return fused.merge(self._settings, tensors, base, [None] * len(tensors), out)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        return ties(tensors, base, **self.params)


def _blocks(params: dict[str, Any], shape: tuple[int, ...]) -> BlockMerge | None:
    numel = math.prod(shape)
    if params.get("scope") == "global":
        # rescale: l1 needs each tensor's whole L1 norms: the whole-tensor path
        return None if params.get("rescale") == "l1" else TiesGlobalBlocks(params)
    return TiesBlocks(params, numel) if numel > 4 * SAMPLE else None


@register(
    "ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(True), SIGN, SCOPE, rescale("none")),
    needs_base=True,
    workspace=2.5,
    stats=_global_stats,
    blockwise=_blocks,
    reference="Yadav et al., TIES-Merging, NeurIPS 2023, arXiv 2306.01708",
)
def ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    lambda_: float = 1.0,
    normalize: bool = True,
    sign_method: str = "mass",
    scope: str = "per_tensor",
    rescale: str = "none",
    threshold: list[float] | None = None,
) -> torch.Tensor:
    """Trim each τᵢ to its top ``density`` by magnitude, elect signs, disjoint mean (Yadav et al.
    2023). ``scope: global`` trims against whole-model thresholds computed in a streaming pre-pass.
    """
    if scope == "global":
        if threshold is None:
            raise ValueError("ties scope=global needs the whole-model thresholds")
        thr = threshold

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            return apply_rescale(d, threshold_mask(d, thr[i]), rescale, density[i])
    else:

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            return apply_rescale(d, topk_mask(d, density[i]), rescale, density[i])

    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=sparsify,
        consensus=sign_method,
        normalize=normalize,
        lambda_=lambda_,
    )
