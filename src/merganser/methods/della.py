"""DELLA-Merging: magnitude-ranked stochastic drop (MAGPRUNE), then TIES-style fusion."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from merganser.methods import fused
from merganser.methods.blockwise import BLOCK, BlockMerge, Load, sum64
from merganser.methods.dare import model_seed
from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import (
    BlockBernoulli,
    keep_where_below,
    l1_scale,
    mask_,
    rank_keep_probs,
    rescale_kept,
    row_keep_probs,
)
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import Sparsifier, generalized_task_arithmetic

EPSILON = Param(
    "epsilon",
    "model",
    0.15,
    low=0.0,
    high=0.5,
    doc="half-width of the keep-probability window (official window_size / 2)",
)
REFERENCE = "Deep et al., DELLA-Merging, arXiv 2406.11617"
# Bytes of packed masks (a bit per entry and model) a tensor's block merge keeps from its l1
# pass for the merge pass: the ranks behind a mask cost ten times the rest of the merge.
MASK_CACHE = 32 << 20


def _validate(params: dict[str, Any]) -> str | None:
    for d, e in zip(params["density"], params["epsilon"], strict=True):
        if d < 1 and not (d - e > 0 and d + e < 1):
            return f"density ± epsilon must lie in (0, 1), got density {d} and epsilon {e}"
    return None


def row_width(shape: tuple[int, ...]) -> int:
    """Entries in one of DELLA's rows: the tensor reshaped to (shape[0], -1); 1-D is one row."""
    return math.prod(shape) // shape[0] if len(shape) >= 2 and shape[0] else math.prod(shape)


def row_block(shape: tuple[int, ...]) -> int:
    """Entries per block of whole rows, as close to BLOCK as rows allow (one row where a row is
    longer): the L1 norms of ``rescale: l1`` are summed per such block on every path."""
    width = max(row_width(shape), 1)
    return max(1, BLOCK // width) * width


def _sparsifier(density: list[float], epsilon: list[float], seed: int, how: str) -> Sparsifier:
    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        if density[i] >= 1:
            return d
        probs = rank_keep_probs(d, density[i], epsilon[i])
        words = BlockBernoulli(model_seed(seed, i)).words(0, d.numel())
        mask = keep_where_below(words, probs).view(d.shape)
        return apply_rescale(d, mask, how, probs, block=row_block(tuple(d.shape)))

    return sparsify


class DellaBlocks(BlockMerge):
    """DELLA block by block: each block holds whole rows, so its keep probabilities come from
    the block alone, and entry j's draw is word j of the model's seeded stream. With ``rescale:
    l1`` a statistic pass first sums |τᵢ| and |mᵢ⊙τᵢ| and keeps the masks, packed, for the merge.
    """

    def __init__(self, params: dict[str, Any], consensus: str | None, shape: tuple[int, ...]):
        self.params, self.consensus = params, consensus
        self.width, self.block = row_width(shape), row_block(shape)
        n = len(params["density"])
        self.draw = [BlockBernoulli(model_seed(params["seed"], i)) for i in range(n)]
        self.dropping = [d < 1 for d in params["density"]]
        self.before, self.after = [0.0] * n, [0.0] * n
        # Packed masks kept from the l1 pass, per model and block, within MASK_CACHE bytes, in
        # one buffer: thousands of small arrays among each block's temporaries fragmented the
        # heap (0.98 GB peak RSS at 8 models of 1B against 0.85 with one buffer).
        self._packed: list[dict[int, np.ndarray]] = [{} for _ in range(n)]
        numel = math.prod(shape)
        full, rest = divmod(numel, self.block)
        whole = full * ((self.block + 7) // 8) + (rest + 7) // 8  # one model's packed masks
        self._room = min(MASK_CACHE, whole * sum(self.dropping))
        self._cache = np.empty(0, np.uint8)
        self._cached = 0
        self._settings: fused.Settings | None = None

    def wants_pass(self, p: int) -> bool:
        return p == 0 and self.params["rescale"] == "l1" and any(self.dropping)

    def _probs(self, i: int, mag: torch.Tensor) -> torch.Tensor:
        """Model i's keep probabilities of a block's magnitudes (whole rows)."""
        prm = self.params
        rows = mag.view(-1, self.width)
        return row_keep_probs(rows, prm["density"][i], prm["epsilon"][i]).view(-1)

    def _kept(self, i: int, start: int, mag: torch.Tensor) -> torch.Tensor:
        return keep_where_below(self.draw[i].words(start, mag.numel()), self._probs(i, mag))

    def _observe(self, start: int, deltas: Iterator[torch.Tensor]) -> None:
        for i, d in enumerate(deltas):  # one model's block at a time
            if not self.dropping[i]:
                continue
            mag = d.abs_()
            kept = self._kept(i, start, mag)
            self.before[i] += sum64(mag)
            self.after[i] += sum64(mask_(mag, kept))  # |τ|·m is |m⊙τ|
            packed = np.packbits(kept.numpy(), bitorder="little")
            if self._cached + packed.nbytes <= self._room:
                if self._cache.size == 0:
                    self._cache = np.empty(self._room, np.uint8)
                slot = self._cache[self._cached : self._cached + packed.nbytes]
                slot[:] = packed
                self._packed[i][start] = slot
                self._cached += packed.nbytes

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        tensors, base = load(None)
        self._observe(start, (t - base for t in tensors))

    def fused(self) -> bool:
        return fused.available() and self.params["rescale"] != "inverse"

    def observe_raw(self, p: int, start: int, tensors: list[torch.Tensor], base: Any) -> None:
        b = base.float()
        self._observe(start, (t.float().sub_(b) for t in tensors))

    def _mask(self, i: int, start: int, delta: torch.Tensor) -> torch.Tensor:
        """Model i's mask of a block, as the l1 pass kept it or drawn again."""
        packed = self._packed[i].get(start)
        if packed is None:
            return self._kept(i, start, delta.abs())
        bits = np.unpackbits(packed, count=delta.numel(), bitorder="little")
        return torch.from_numpy(bits.view(np.bool_))

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: Any, out: torch.Tensor
    ) -> bool:
        prm = self.params
        if self._settings is None:
            st = self._settings = fused.Settings(len(tensors))
            for i, keep in enumerate(prm["density"]):
                if keep >= 1:
                    st.mode[i] = fused.KEEP
                    continue  # the torch path does not rescale these
                st.mode[i] = fused.DROP
                if prm["rescale"] == "l1":
                    st.scale_op[i] = fused.SCALE_MUL
                    st.scale[i] = l1_scale(self.before[i], self.after[i])
            st.set_mix(prm["weight"], self.consensus, prm["normalize"], prm["lambda_"])
        masks: list[np.ndarray | None] = []
        b = None
        for i, t in enumerate(tensors):
            if not self.dropping[i]:
                masks.append(None)
                continue
            packed = self._packed[i].get(start)
            if packed is None:
                b = base.float() if b is None else b
                kept = self._kept(i, start, t.float().sub_(b).abs_())
                packed = np.packbits(kept.numpy(), bitorder="little")
            masks.append(packed)
        return fused.merge(self._settings, tensors, base, masks, out)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        prm = self.params

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            if not self.dropping[i]:
                return d
            if prm["rescale"] == "inverse":
                probs = self._probs(i, d.abs())
                kept = keep_where_below(self.draw[i].words(start, d.numel()), probs)
                return rescale_kept(mask_(d, kept), "inverse", probs, 1.0)
            l1 = l1_scale(self.before[i], self.after[i])
            return rescale_kept(mask_(d, self._mask(i, start, d)), prm["rescale"], 1.0, l1)

        return generalized_task_arithmetic(
            tensors,
            base,
            prm["weight"],
            sparsify=sparsify,
            consensus=self.consensus,
            normalize=prm["normalize"],
            lambda_=prm["lambda_"],
        )


def _blocks(consensus: str | None) -> Any:
    def factory(params: dict[str, Any], shape: tuple[int, ...]) -> DellaBlocks | None:
        # A row longer than a block would make a block of the whole row: merged whole instead.
        return DellaBlocks(params, consensus, shape) if row_width(shape) <= BLOCK else None

    return factory


PARAMS = (WEIGHT, DENSITY, EPSILON, LAMBDA)


@register(
    "della",
    params=(*PARAMS, normalize(True), rescale("l1", paper="inverse")),
    needs_base=True,
    stochastic=True,
    workspace=3.0,
    validate=_validate,
    blockwise=_blocks("mass"),
    reference=REFERENCE,
)
def della(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: str = "l1",
) -> torch.Tensor:
    """MAGPRUNE each τᵢ (keep prob. density ± ε by magnitude rank per row), elect signs, disjoint
    mean, scale by λ (Deep et al. 2024). ``rescale: inverse`` is the official per-entry 1/p.
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, epsilon, seed, rescale),
        consensus="mass",
        normalize=normalize,
        lambda_=lambda_,
    )


@register(
    "della_linear",
    params=(*PARAMS, normalize(False), rescale("l1", paper="inverse")),
    needs_base=True,
    stochastic=True,
    workspace=3.0,
    validate=_validate,
    blockwise=_blocks(None),
    reference=REFERENCE,
)
def della_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    epsilon: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DELLA's MAGPRUNE followed by a plain weighted sum, without sign election."""
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=_sparsifier(density, epsilon, seed, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )
