"""Whole-model statistics gathered in streaming passes before the merge pass.

Some methods need a number that depends on every tensor (TIES' paper-style global top-k, DPPA's
layer outlier ratios). They describe it as a ``WholeModelStats``: the engine feeds it each
tensor's float32 inputs once per pass, never holding more than the tensors in flight.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch

_HI_BINS = 1 << 15  # the high 16 bits of a non-negative float32 (sign bit is 0)
_LO_BINS = 1 << 16


class WholeModelStats(Protocol):
    passes: int

    def observe(
        self,
        pass_index: int,
        name: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
    ) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def params_for(self, name: str) -> dict[str, Any]: ...


def _bits(x: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 the int32 bit pattern orders exactly like the value.
    return x.float().contiguous().view(torch.int32).reshape(-1).to(torch.int64)


class GlobalTopK:
    """Exact per-model magnitude threshold keeping the top ``density`` of |τᵢ| over the whole
    model, found with two histogram passes over float32 bit patterns (high 16 bits, then the
    low 16 bits inside the crossing bin) instead of sorting a flattened model.
    """

    passes = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hi: list[torch.Tensor] = []
        self.lo: list[torch.Tensor] = []
        self.k: list[float] = []
        self.bin: list[int] = []
        self.rest: list[int] = []
        self.threshold: list[float] = []

    def observe(
        self,
        pass_index: int,
        name: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
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
                    self.k = [0.0] * len(counts)
            for i, c in enumerate(counts):
                target[i] += c
                if pass_index == 0:
                    self.k[i] += params["density"][i] * tensors[i].numel()

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            for hist, kf in zip(self.hi, self.k, strict=True):
                b, rest = _crossing(hist, int(kf))
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
