"""Spherical interpolation: SLERP of weights (two models) and NuSLERP (of task vectors)."""

from __future__ import annotations

import math

import torch

from merganser.methods import fused
from merganser.methods.blockwise import BlockMerge, Load
from merganser.methods.params import WEIGHT
from merganser.methods.registry import Param, register


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Σ a·b with float64 accumulation, a few million entries at a time (no float64 copies)."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(
        float(torch.sum(a[i : i + chunk] * b[i : i + chunk], dtype=torch.float64))
        for i in range(0, a.numel(), chunk)
    )


def slerp_coefficients(
    t: float, sq0: float, sq1: float, dot: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float] | None:
    """SLERP's (c₀, c₁) from ‖v₀‖², ‖v₁‖² and v₀·v₁ (Shoemake 1985), or None where the tensors
    are nearly colinear and the interpolation is linear."""
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return None
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def _apply(
    t: float, v0: torch.Tensor, v1: torch.Tensor, c: tuple[float, float] | None
) -> torch.Tensor:
    if c is None:
        return torch.lerp(v0, v1, t)
    return (v0 * c[0]).add_(v1, alpha=c[1])


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (Shoemake 1985, mergekit's slerp): the angle
    is taken between the flattened, normalised tensors; the coefficients are applied to the
    unnormalised ones; nearly colinear tensors are interpolated linearly.
    """
    return _apply(t, v0, v1, slerp_coefficients(t, _dot64(v0, v0), _dot64(v1, v1), _dot64(v0, v1)))


class SlerpBlocks(BlockMerge):
    """SLERP block by block: one statistic pass sums ‖v₀‖², ‖v₁‖² and v₀·v₁ in float64."""

    def __init__(self, t: float):
        self.t = t
        self.sums = [0.0, 0.0, 0.0]
        self.coef: tuple[float, float] | None = None

    def wants_pass(self, p: int) -> bool:
        return p == 0

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        tensors, base = load(None)
        assert base is not None
        for k, (a, b) in enumerate(((base, base), (tensors[0], tensors[0]), (base, tensors[0]))):
            self.sums[k] += _dot64(a, b)

    def end_pass(self, p: int) -> None:
        self.coef = slerp_coefficients(self.t, *self.sums)

    def merge(
        self, start: int, tensors: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        assert base is not None
        return _apply(self.t, base, tensors[0], self.coef)

    def fused(self) -> bool:
        return fused.available()

    def observe_raw(
        self, p: int, start: int, tensors: list[torch.Tensor], base: torch.Tensor
    ) -> None:
        for k, v in enumerate(fused.dots(base, tensors[0])):
            self.sums[k] += v

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: torch.Tensor, out: torch.Tensor
    ) -> bool:
        return fused.slerp(base, tensors[0], self.coef, self.t, out)


@register(
    "slerp",
    params=(Param("t", "global", 0.5, doc="0 returns the base model, 1 the other model"),),
    needs_base=True,
    max_models=1,
    workspace=2.0,
    blockwise=lambda params, shape: SlerpBlocks(params["t"]),
    reference="Shoemake 1985; mergekit slerp (Goddard et al., arXiv 2403.13257)",
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """SLERP from the base model (t = 0) to the other model (t = 1), per tensor."""
    return slerp_tensors(t, base, tensors[0])


def nuslerp_tensors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    row_wise: bool = False,
    flatten: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SLERP over whole tensors (``flatten``) or per row/column vector, with a linear fallback
    for colinear pairs (mergekit's nuslerp).
    """
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < eps
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / safe
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if not (flatten or v0.dim() < 2) and row_wise:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@register(
    "nuslerp",
    params=(
        WEIGHT,
        Param(
            "nuslerp_flatten",
            "global",
            True,
            kind=bool,
            doc="one angle per tensor (true) or per row/column vector",
        ),
        Param(
            "nuslerp_row_wise",
            "global",
            False,
            kind=bool,
            doc="with nuslerp_flatten false: interpolate rows instead of columns",
        ),
    ),
    optional_base=True,
    min_models=2,
    max_models=2,
    workspace=3.0,
    reference="mergekit nuslerp (Goddard et al., arXiv 2403.13257)",
)
def nuslerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weight: list[float],
    nuslerp_flatten: bool = True,
    nuslerp_row_wise: bool = False,
) -> torch.Tensor:
    """SLERP of two models with t = w₂/(w₁+w₂); with a base, of their task vectors."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return nuslerp_tensors(t, tensors[0], tensors[1], nuslerp_row_wise, nuslerp_flatten)
    return base + nuslerp_tensors(
        t, tensors[0] - base, tensors[1] - base, nuslerp_row_wise, nuslerp_flatten
    )
