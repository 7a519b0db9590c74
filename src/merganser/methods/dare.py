"""DARE: randomly drop delta entries and rescale, then merge linearly or with TIES consensus."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from merganser.methods import fused
from merganser.methods.blockwise import BlockMerge, Load, sum64
from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import register
from merganser.methods.sparsify import BlockBernoulli, l1_scale, mask_, rescale_kept
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.task_vectors import Sparsifier, generalized_task_arithmetic

REFERENCE = "Yu et al., Language Models are Super Mario (DARE), ICML 2024, arXiv 2311.03099"
# Bytes of packed masks (a bit per entry and model) a tensor's fused merge keeps from its l1
# pass for the merge pass, which would otherwise draw them again.
MASK_CACHE = 32 << 20


def model_seed(seed: int, i: int) -> int:
    """Decorrelated per-model seeds from one per-tensor seed."""
    return (seed ^ ((i + 1) * 0x9E3779B97F4A7C15)) & 0x7FFF_FFFF_FFFF_FFFF


def dare_sparsify(density: list[float], seed: int, how: str) -> Sparsifier:
    """DARE's drop: keep each entry with probability ``density``, then rescale."""

    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        keep = density[i]
        if keep >= 1:
            return d
        if keep <= 0:
            return torch.zeros_like(d)
        mask = BlockBernoulli(model_seed(seed, i))(0, d.numel(), keep)
        return apply_rescale(d, mask.view(d.shape).to(d.device), how, keep)

    return sparsify


class DareBlocks(BlockMerge):
    """DARE block by block: the masks of any block can be drawn alone (BlockBernoulli); with
    ``rescale: l1`` one statistic pass first sums |τᵢ| and |mᵢ⊙τᵢ| over the whole tensor.
    """

    def __init__(self, params: dict[str, Any], consensus: str | None, numel: int):
        self.params, self.consensus = params, consensus
        n = len(params["density"])
        self.draw = [BlockBernoulli(model_seed(params["seed"], i)) for i in range(n)]
        self.before, self.after = [0.0] * n, [0.0] * n
        self.dropping = [0 < k < 1 for k in params["density"]]
        self._settings: fused.Settings | None = None
        # The fused l1 pass keeps each model's mask for the merge, packed, within MASK_CACHE
        # bytes: entries [0, covered) are drawn once, any others again in the merge.
        dropping = max(sum(self.dropping), 1)
        fits = numel * dropping <= MASK_CACHE * 8
        self._covered = numel if fits else MASK_CACHE * 8 // dropping // 8 * 8
        self._packed: list[np.ndarray | None] = [None] * n

    def wants_pass(self, p: int) -> bool:
        return p == 0 and self.params["rescale"] == "l1" and any(self.dropping)

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        tensors, base = load(None)
        for i, t in enumerate(tensors):
            if self.dropping[i]:
                mag = (t - base).abs_()
                self.before[i] += sum64(mag)
                mask_(mag, self.draw[i](start, count, self.params["density"][i]))
                self.after[i] += sum64(mag)

    def fused(self) -> bool:
        return fused.supports(len(self.draw), self.consensus)

    def observe_raw(self, p: int, start: int, tensors: list[torch.Tensor], base: Any) -> None:
        n = base.numel()
        for i, t in enumerate(tensors):
            if self.dropping[i]:
                limit = BlockBernoulli.limit(self.params["density"][i])
                if limit is None:  # a keep probability within 2⁻²⁴ of 1 keeps every entry
                    whole = sum64((t.float() - base.float()).abs_())
                    self.before[i] += whole
                    self.after[i] += whole
                    continue
                packed = None
                if self._kept_here(start, n):
                    if self._packed[i] is None:
                        self._packed[i] = np.empty((self._covered + 7) // 8, np.uint8)
                    packed = self._packed[i][start // 8 : (start + n + 7) // 8]
                draws = self.draw[i].words(start, n)
                before, after = fused.l1_sums(t, base, draws, limit, packed)
                self.before[i] += before
                self.after[i] += after

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: Any, out: torch.Tensor
    ) -> bool:
        prm = self.params
        if self._settings is None:
            st = self._settings = fused.Settings(len(tensors))
            for i, keep in enumerate(prm["density"]):
                limit = BlockBernoulli.limit(keep)
                if keep >= 1 or keep <= 0:
                    st.mode[i] = fused.KEEP if keep >= 1 else fused.ZERO
                    continue  # the torch path does not rescale these
                if limit is not None:
                    st.mode[i], st.limit[i] = fused.DROP, limit
                if prm["rescale"] == "inverse":
                    st.scale_op[i], st.scale[i] = fused.SCALE_DIV, keep
                elif prm["rescale"] == "l1":
                    st.scale_op[i] = fused.SCALE_MUL
                    st.scale[i] = l1_scale(self.before[i], self.after[i])
            st.set_mix(prm["weight"], self.consensus, prm["normalize"], prm["lambda_"])
        n = base.numel()
        masks = [self._mask(i, start, n) if m == fused.DROP else None
                 for i, m in enumerate(self._settings.mode)]  # fmt: skip
        return fused.merge(self._settings, tensors, base, masks, out)

    def _mask(self, i: int, start: int, n: int) -> np.ndarray:
        """Model i's mask of a block: packed as the l1 pass kept it, or its draws."""
        packed = self._packed[i]
        if packed is not None and self._kept_here(start, n):
            return packed[start // 8 :]
        return self.draw[i].words(start, n)

    def _kept_here(self, start: int, n: int) -> bool:
        """Whether a block's masks have their place among those kept between the passes."""
        return start % 8 == 0 and start + n <= self._covered

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        prm = self.params

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            keep = prm["density"][i]
            if keep >= 1:
                return d
            if keep <= 0:
                return d.zero_()
            kept = mask_(d, self.draw[i](start, d.numel(), keep))
            l1 = l1_scale(self.before[i], self.after[i])
            return rescale_kept(kept, prm["rescale"], keep, l1)

        return generalized_task_arithmetic(
            tensors,
            base,
            prm["weight"],
            sparsify=sparsify,
            consensus=self.consensus,
            normalize=prm["normalize"],
            lambda_=prm["lambda_"],
        )


@register(
    "dare_linear",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(False), rescale("l1", paper="inverse")),
    needs_base=True,
    stochastic=True,
    workspace=1.5,
    blockwise=lambda params, shape: DareBlocks(params, None, math.prod(shape)),
    reference=REFERENCE,
)
def dare_linear(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DARE then task arithmetic: θ₀ + λ Σ wᵢ·rescale(mᵢ⊙τᵢ), mᵢ ~ Bernoulli(density) (Yu et al.
    2024). ``rescale: inverse`` is the paper's 1/(1−p); ``l1`` is mergekit's default.
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=dare_sparsify(density, seed, rescale),
        normalize=normalize,
        lambda_=lambda_,
    )


@register(
    "dare_ties",
    params=(
        WEIGHT,
        DENSITY,
        LAMBDA,
        normalize(False, paper=True),
        rescale("l1", paper="inverse"),
    ),
    needs_base=True,
    stochastic=True,
    workspace=1.5,
    blockwise=lambda params, shape: DareBlocks(params, "mass", math.prod(shape)),
    reference=REFERENCE,
)
def dare_ties(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    density: list[float],
    seed: int,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: str = "l1",
) -> torch.Tensor:
    """DARE then TIES sign consensus on the weighted deltas (Yu et al. 2024; mergekit convention:
    no magnitude trim, ``normalize`` off by default).
    """
    return generalized_task_arithmetic(
        tensors,
        base,
        weight,
        sparsify=dare_sparsify(density, seed, rescale),
        consensus="mass",
        normalize=normalize,
        lambda_=lambda_,
    )
