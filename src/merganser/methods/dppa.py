"""DPPA: Dynamic Pruning (outlier-driven per-layer and per-linear densities) and Dynamic
Partition Amplification (scale the most important partitions of each task vector).

Transcribed from the official code (spec §5) with its pitfalls guarded: densities are clamped
to [min_density, 1], divisions by zero give no adjustment, pruning keeps an exact top-k count
instead of ``<= threshold`` (which drops every tie), and embedding/norm/head deltas are only
amplified when ``amplify_non_linear`` is set (the official pipeline amplifies them).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.methods.blockwise import BLOCK, BlockMerge, Load, sum64
from merganser.methods.params import LAMBDA, WEIGHT, normalize
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import SAMPLE, StreamingTopK, observe_selectors, topk_mask
from merganser.methods.task_vectors import generalized_task_arithmetic
from merganser.model.naming import is_layer_linear, layer_index

MIN_DENSITY = 1e-3


def dppa_densities(
    layer_ratio: dict[int, float],
    linear_ratio: dict[str, float],
    linear_layer: dict[str, int],
    linear_numel: dict[str, int],
    sparsity: float,
    owl_lambda: float,
) -> dict[str, float]:
    """DP densities per linear from layer and linear outlier percentages (official
    ``prune_mag_outlier_layer_wei``): D_ℓ = (1−s) + λ·centred(O)/max|·|, then a size-weighted
    centred linear adjustment of the same amplitude.
    """
    layers = sorted(layer_ratio)
    o_layer = torch.tensor([layer_ratio[ell] for ell in layers], dtype=torch.float64)
    o_layer = o_layer - o_layer.mean()
    peak = float(o_layer.abs().max()) if len(layers) else 0.0
    o_layer = o_layer * owl_lambda / peak if peak > 0 else torch.zeros_like(o_layer)
    d_layer = {ell: (1 - sparsity) + float(v) for ell, v in zip(layers, o_layer, strict=True)}

    names = list(linear_ratio)
    o = torch.tensor([linear_ratio[n] for n in names], dtype=torch.float64)
    n = torch.tensor([linear_numel[k] for k in names], dtype=torch.float64)
    mean = float(o.mean()) if len(names) else 0.0
    a = o / mean if mean > 0 else torch.zeros_like(o)
    if len(names):
        a = a - (a * n).sum() / n.sum()
    peak = float(a.abs().max()) if len(names) else 0.0
    a = a * owl_lambda / peak if peak > 0 else torch.zeros_like(a)
    return {
        k: min(1.0, max(MIN_DENSITY, d_layer[linear_layer[k]] + float(v)))
        for k, v in zip(names, a, strict=True)
    }


def amplify_partitions(
    delta: torch.Tensor, densities: list[float], factors: list[float]
) -> torch.Tensor:
    """DPA: each entry is scaled by the largest factor among the top-k partitions holding it
    (nested magnitude partitions at the given densities); entries in none are dropped.
    """
    scale = torch.zeros_like(delta)
    for d, f in zip(densities, factors, strict=True):
        scale = torch.maximum(scale, topk_mask(delta, d).to(delta.dtype) * f)
    return delta * scale


class DPPAStats:
    """Two streaming passes: mean |δ| per linear and per layer, then outlier counts. Both add
    up over pieces of a tensor (``chunked``): the sums of |δ| are float64 sums per BLOCK,
    added in the order of the blocks, so the densities do not depend on how the tensors were
    cut or in which order the pieces arrived.
    """

    passes = 2
    chunked = True

    def __init__(self, params: dict[str, Any]):
        self.m_linear = params["outlier_m"]
        self.m_layer = params["layer_outlier_m"]
        self.levels = [params["sparsity"], params["sparsity_next"]]
        self.owl_lambda = params["owl_lambda"]
        self._lock = threading.Lock()
        self.parts: dict[tuple[int, str], dict[int, list[float]]] = {}
        self.sum: dict[tuple[int, str], float] = {}
        self.numel: dict[str, int] = {}
        self.layer_of: dict[str, int] = {}
        self.layer_sum: dict[tuple[int, int], float] = {}
        self.layer_n: dict[int, int] = {}
        self.count: dict[tuple[int, str], int] = {}
        self.layer_count: dict[tuple[int, int], int] = {}
        self.densities: dict[str, list[list[float]]] = {}

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
        if base is None or not is_layer_linear(name, len(shape)):
            return
        ell = layer_index(name)
        assert ell is not None
        for i, t in enumerate(tensors):
            a = (t - base).abs_().reshape(-1)
            if pass_index == 0:
                sums = [sum64(a[j : j + BLOCK]) for j in range(0, a.numel(), BLOCK)]
                with self._lock:
                    self.parts.setdefault((i, name), {})[start] = sums
                    self.numel[name] = math.prod(shape)
                    self.layer_of[name] = ell
            else:
                lin_mean = self.sum[i, name] / self.numel[name]
                layer_mean = self.layer_sum[i, ell] / self.layer_n[ell]
                c = int(torch.count_nonzero(a > self.m_linear * lin_mean))
                lc = int(torch.count_nonzero(a > self.m_layer * layer_mean))
                with self._lock:
                    self.count[i, name] = self.count.get((i, name), 0) + c
                    self.layer_count[i, ell] = self.layer_count.get((i, ell), 0) + lc

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            if not self.numel:
                # Without layer linears DPPA would silently be task arithmetic.
                raise MerganserError(
                    "dppa: no tensor is a linear weight inside a layer stack (names like "
                    "'model.layers.N.mlp.up_proj.weight'); DPPA prunes by layer and needs them"
                )
            for key, parts in self.parts.items():
                total = 0.0
                for start in sorted(parts):  # the blocks in order: blockwise.sum_blocks
                    for part in parts[start]:
                        total += part
                self.sum[key] = total
            # Sums over a layer's tensors in name order: the tensors arrive in the order the
            # threads finish them, and float sums (so the densities) must not depend on it.
            for name in sorted(self.numel):
                ell = self.layer_of[name]
                self.layer_n[ell] = self.layer_n.get(ell, 0) + self.numel[name]
                for i in sorted({i for i, _ in self.sum}):
                    self.layer_sum[i, ell] = self.layer_sum.get((i, ell), 0.0) + self.sum[i, name]
            return
        models = sorted({i for i, _ in self.sum})
        for i in models:
            layer_ratio = {
                ell: 100 * self.layer_count.get((i, ell), 0) / self.layer_n[ell]
                for ell in sorted(self.layer_n)
            }
            linear_ratio = {k: 100 * self.count[i, k] / self.numel[k] for k in sorted(self.numel)}
            for level in self.levels:
                dens = dppa_densities(
                    layer_ratio, linear_ratio, self.layer_of, self.numel, level, self.owl_lambda
                )
                for k, d in dens.items():
                    self.densities.setdefault(k, [[] for _ in models])[i].append(d)

    def params_for(self, name: str) -> dict[str, Any]:
        return {"densities": self.densities.get(name)}


class DppaBlocks(BlockMerge):
    """DPPA block by block. A layer linear's partitions are exact top-k sets of |τᵢ| per
    density, found by statistic passes (StreamingTopK, as TIES's trim); then each entry's
    scale, and the weighted sum, are elementwise. Other tensors are elementwise already.
    """

    def __init__(self, params: dict[str, Any], numel: int):
        self.params, self.numel = params, numel
        self._sel: list[list[StreamingTopK]] | None = None

    @property
    def sel(self) -> list[list[StreamingTopK]]:
        """Per model, a selector per partition density (none outside the layer linears). The
        densities arrive in ``params`` from the statistic passes, after construction."""
        if self._sel is None:
            dens = self.params.get("densities")
            self._sel = [[StreamingTopK(self.numel, d) for d in ds] for ds in dens or []]
        return self._sel

    def _all(self) -> list[StreamingTopK]:
        return [s for row in self.sel for s in row]

    def wants_pass(self, p: int) -> bool:
        return any(s.wants_pass(p) for s in self._all())

    def sampled(self, p: int) -> bool:
        return p == 0

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        pairs = [(i, s) for i, row in enumerate(self.sel) for s in row]
        observe_selectors(pairs, p, start, count, load)

    def end_pass(self, p: int) -> None:
        for s in self._all():
            if s.wants_pass(p):
                s.end_pass(p)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        prm = self.params
        if not self.sel:
            return dppa(tensors, base, **prm)
        factors = [prm["factor"], prm["factor_next"]]

        def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
            scale = torch.zeros_like(d)
            for s, f in zip(self.sel[i], factors, strict=True):
                # Kept where the trim leaves d non-zero: where d is ±0 the scale cannot change
                # d·scale (±0 either way), so this is amplify_partitions' result exactly.
                kept = s.trim_(d.clone()) != 0
                scale = torch.maximum(scale, kept.to(d.dtype) * f)
            return d * scale

        return generalized_task_arithmetic(
            tensors,
            base,
            prm["weight"],
            sparsify=sparsify,
            normalize=prm["normalize"],
            lambda_=prm["lambda_"],
        )


def _blocks(params: dict[str, Any], shape: tuple[int, ...]) -> DppaBlocks | None:
    numel = math.prod(shape)
    # a partition streams through StreamingTopK, which wants more entries than its sample
    return DppaBlocks(params, numel) if numel > 4 * SAMPLE else None


@register(
    "dppa",
    params=(
        WEIGHT,
        LAMBDA,
        normalize(False),
        Param(
            "sparsity",
            "global",
            0.9,
            low=0.0,
            high=1.0,
            doc="target sparsity of the top partition (official s = 0.9)",
        ),
        Param(
            "sparsity_next",
            "global",
            0.8,
            low=0.0,
            high=1.0,
            doc="target sparsity of the second partition (official s = 0.8)",
        ),
        Param("factor", "global", 1.8, low=0.0, doc="amplification of the top partition (r9)"),
        Param(
            "factor_next",
            "global",
            1.0,
            low=0.0,
            doc="amplification of the second partition (r8; the official search starts at 0)",
        ),
        Param("owl_lambda", "global", 0.08, low=0.0, high=1.0, doc="density adjustment amplitude"),
        Param("outlier_m", "global", 5.0, low=0.0, doc="linear outlier threshold (× mean |δ|)"),
        Param(
            "layer_outlier_m",
            "global",
            3.0,
            low=0.0,
            doc="layer outlier threshold (hard-coded 3 in the official code)",
        ),
        Param(
            "amplify_non_linear",
            "global",
            False,
            kind=bool,
            doc="also scale unpruned embedding/norm/head deltas by max(factors) (official)",
        ),
    ),
    needs_base=True,
    # Models are processed one at a time (delta, partition scale, top-k temporaries: about
    # five copies of one tensor whatever their number); 2 per input covers one model up.
    workspace=2.0,
    stats=lambda params: DPPAStats(params),
    blockwise=_blocks,
    reference="Zhu, Xia & Zhang, DPPA, arXiv 2403.02799",
)
def dppa(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    weight: list[float],
    lambda_: float = 1.0,
    normalize: bool = False,
    sparsity: float = 0.9,
    sparsity_next: float = 0.8,
    factor: float = 1.8,
    factor_next: float = 1.0,
    owl_lambda: float = 0.08,
    outlier_m: float = 5.0,
    layer_outlier_m: float = 3.0,
    amplify_non_linear: bool = False,
    densities: list[list[float]] | None = None,
) -> torch.Tensor:
    """Prune each layer linear's τᵢ to its DP densities, amplify its partitions (DPA), then
    θ₀ + λ Σ wᵢ τ'ᵢ. Tensors outside the layer linears keep their full delta.
    """
    factors = [factor, factor_next]

    def sparsify(i: int, d: torch.Tensor) -> torch.Tensor:
        if densities is None:
            return d * max(factors) if amplify_non_linear else d
        return amplify_partitions(d, densities[i], factors)

    return generalized_task_arithmetic(
        tensors, base, weight, sparsify=sparsify, normalize=normalize, lambda_=lambda_
    )
