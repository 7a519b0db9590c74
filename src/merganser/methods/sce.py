"""SCE (FuseChat): select high-variance entries, calculate per-model coefficients, erase
minority signs."""

from __future__ import annotations

import math
from typing import Any

import torch

from merganser.methods.blockwise import BLOCK, BlockMerge, Load, sum_blocks, sum_squares
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import SAMPLE, StreamingTopK, top_k_mask
from merganser.methods.task_vectors import consensus_mask, ordered_sum


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the models at each entry, in one defined order."""
    n = len(deltas)
    mean = torch.zeros_like(deltas[0])
    for d in deltas:
        mean.add_(d)
    mean.div_(n)
    var = torch.zeros_like(deltas[0])
    for d in deltas:
        var.add_((d - mean).square_())
    return var.div_(n)


def _energy(deltas: list[torch.Tensor]) -> list[float]:
    """Each model's Σ δ², in float64 sums per block of BLOCK entries (the block form's)."""
    return [sum_blocks(d, lambda block: sum_squares(block.double())) for d in deltas]


def _coefficients(energy: list[float], numel: int) -> list[float]:
    means = [e / numel for e in energy]
    total = sum(means)
    return [1 / len(means)] * len(means) if total == 0 else [e / total for e in means]


def _combine(deltas: list[torch.Tensor], base: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    """Erase entries against the elected sign, then the coefficient-weighted mean."""
    stacked = torch.stack(deltas)
    w = torch.tensor(coeffs, dtype=stacked.dtype, device=stacked.device)
    erased = w.view(-1, *([1] * base.dim())) * consensus_mask(stacked, "mass")
    divisor = ordered_sum(erased)
    divisor[divisor == 0] = 1
    return base + ordered_sum(stacked * erased) / divisor


def _blocks(params: dict[str, Any], shape: tuple[int, ...]) -> BlockMerge | None:
    numel = math.prod(shape)
    # a selection streams through StreamingTopK, which wants more entries than its sample
    return SceBlocks(params["select_topk"], numel) if numel > 4 * SAMPLE else None


@register(
    "sce",
    params=(
        Param(
            "select_topk",
            "global",
            1.0,
            low=0.0,
            high=1.0,
            doc="fraction of entries with the highest variance across models kept",
        ),
    ),
    needs_base=True,
    workspace=2.0,
    blockwise=_blocks,
    reference="Wan et al., FuseChat (SCE), arXiv 2408.07990; mergekit sce",
)
def sce(tensors: list[torch.Tensor], base: torch.Tensor, select_topk: float = 1.0) -> torch.Tensor:
    """Keep the ``select_topk`` highest-variance entries (of those whose variance is not 0; ties
    lowest index first), weight each model by its mean squared delta, drop entries against the
    elected sign, and take the weighted mean. The sums over models run in recipe order, the
    energies in float64 per block, so the engine's block form gives the same bits.
    """
    deltas = [t - base for t in tensors]
    if select_topk < 1:
        var = _variance(deltas)
        k = int(select_topk * int(torch.count_nonzero(var)))
        mask = top_k_mask(var, k).to(base.dtype)
        deltas = [d * mask for d in deltas]
    return _combine(deltas, base, _coefficients(_energy(deltas), base.numel()))


class SceBlocks(BlockMerge):
    """SCE block by block. With a selection: a pass counting the non-zero variances (k), then
    StreamingTopK's passes over the variances (the exact top-k), then a pass summing each
    model's selected δ²; without one, that last pass alone. The merge is then elementwise.
    Blocks must come at multiples of BLOCK (the energies are sums per block)."""

    def __init__(self, select_topk: float, numel: int) -> None:
        self.topk, self.numel = select_topk, numel
        self.stages = ["nonzero" if select_topk < 1 else "energy"]
        self.nonzero = 0
        self.sel: StreamingTopK | None = None
        self.short = 0
        self.energy: list[float] = []
        self.coeffs: list[float] = []

    def wants_pass(self, p: int) -> bool:
        return p < len(self.stages)

    def sampled(self, p: int) -> bool:
        return self.stages[p] == "select0"

    def _selected(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.sel is None:
            return deltas
        kept = self.sel.trim_(_variance(deltas))  # zero where dropped; kept variances are > 0
        mask = (kept != 0).to(deltas[0].dtype)
        return [d * mask for d in deltas]

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        stage = self.stages[p]
        if stage == "select0":  # the sample, over a whole segment
            assert self.sel is not None
            idx, slots = self.sel.want(start, count)
            if idx.numel():
                tensors, base = load(idx)
                assert base is not None
                self.sel.take_sample(slots, _variance([t - base for t in tensors]))
            return
        if start % BLOCK or count != min(BLOCK, self.numel - start):
            raise AssertionError(f"sce: block {start}+{count} is not a whole BLOCK")
        tensors, base = load(None)
        assert base is not None
        deltas = [t - base for t in tensors]
        if stage == "nonzero":
            self.nonzero += int(torch.count_nonzero(_variance(deltas)))
        elif stage in ("select1", "select2"):
            assert self.sel is not None
            self.sel.observe(int(stage[-1]), _variance(deltas))
        else:
            sums = [sum_squares(d.reshape(-1).double()) for d in self._selected(deltas)]
            self.energy = (
                sums if not self.energy else [a + b for a, b in zip(self.energy, sums, strict=True)]
            )

    def end_pass(self, p: int) -> None:
        stage = self.stages[p]
        nxt: str | None = None
        if stage == "nonzero":
            sel = StreamingTopK(self.numel, 0.0, k=int(self.topk * self.nonzero))
            if sel.trivial:  # k = 0 keeps nothing, k = n everything: no passes needed
                self.sel = sel if sel.k <= 0 else None
                nxt = "energy"
            else:
                self.sel, nxt = sel, "select0"
        elif stage.startswith("select"):
            assert self.sel is not None
            i = int(stage[-1])
            self.sel.end_pass(i)
            if i == 0 or (i == 1 and self.sel.thr is None):
                nxt = f"select{i + 1}"
            else:
                self.short, nxt = self.sel.short, "energy"
        else:
            self.coeffs = _coefficients(self.energy, self.numel)
            if self.sel is not None:
                self.sel.short = self.short  # the energy pass used up the ties' quota
        if nxt is not None:
            self.stages.append(nxt)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        return _combine(self._selected([t - base for t in tensors]), base, self.coeffs)
