"""Model Stock: interpolate between the average of fine-tuned models and the base by angle."""

from __future__ import annotations

import math
from typing import Any

import torch

from merganser.methods.blockwise import BLOCK, BlockMerge, Load, sum_squares
from merganser.methods.registry import Param, register

# A floor on each offset's norm: the pairwise form's floor of 1e-6 on the product of two norms
# (mergekit's) is the product of two floors, exactly so where both norms are on one side of it.
NORM_FLOOR = 1e-3


def _chunks(numel: int) -> range:
    return range(0, numel, BLOCK)


def _ratio(n: int, sq: list[float], spread: float) -> float:
    """t = N cosθ / (1 + (N−1) cosθ) from each offset's squared norm and ‖Σ uᵢ‖², uᵢ = oᵢ /
    max(‖oᵢ‖, 10⁻³); 0 (the base) where the denominator vanishes."""
    units = [q / max(q**0.5, NORM_FLOOR) ** 2 for q in sq]
    pairs = n * (n - 1) / 2
    cos = min(1.0, max(-1.0, (spread - sum(units)) / 2 / pairs))
    den = 1 + (n - 1) * cos
    return 0.0 if abs(den) < 1e-6 else n * cos / den


def _mix(t: float, ws: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    t32 = torch.tensor(t, dtype=torch.float32, device=b.device)
    return t32 * (sum(ws) / len(ws)) + (1 - t32) * b


@register(
    "model_stock",
    params=(
        Param(
            "filter_wise", "global", False, kind=bool, doc="one ratio per row instead of per tensor"
        ),
    ),
    needs_base=True,
    min_models=2,
    workspace=1.0,
    blockwise=lambda params, shape: (
        None if params["filter_wise"] else ModelStockBlocks(math.prod(shape))
    ),
    reference="Jang, Yun & Han, Model Stock, ECCV 2024, arXiv 2403.19522",
)
def model_stock(
    tensors: list[torch.Tensor], base: torch.Tensor, filter_wise: bool = False
) -> torch.Tensor:
    """θ_H = t·mean(θᵢ) + (1−t)·θ₀ with t = N cosθ / (1 + (N−1) cosθ), cosθ the mean pairwise
    cosine of the task vectors oᵢ (Jang et al. 2024; pairwise mean for N > 2 as in mergekit),
    summed in one pass: Σ_{i<j} uᵢ·uⱼ = (‖Σ uᵢ‖² − Σ ‖uᵢ‖²) / 2, uᵢ = oᵢ / max(‖oᵢ‖, 10⁻³), in
    float64 block by block. Where 1 + (N−1) cosθ vanishes (opposed task vectors): θ₀, as mergekit.
    """
    n = len(tensors)
    if filter_wise:
        shape = base.shape
        b = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
        offsets = [(w - b).double() for w in ws]
        sq = torch.stack([o.square().sum(dim=-1) for o in offsets])  # models × rows
        scale = sq.sqrt().clamp(min=NORM_FLOOR)
        total = sum(o / s[:, None] for o, s in zip(offsets, scale, strict=True))
        spread = total.square().sum(dim=-1)
        units = (sq / scale.square()).sum(dim=0)
        cos = ((spread - units) / 2 / (n * (n - 1) / 2)).clamp(-1, 1)
        den = 1 + (n - 1) * cos
        singular = den.abs() < 1e-6
        t = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, den)).float()
        t = t.unsqueeze(-1)
        return (t * (sum(ws) / n) + (1 - t) * b).reshape(shape)
    blocks = ModelStockBlocks(base.numel())
    flat = [x.reshape(-1) for x in tensors]
    fb = base.reshape(-1)
    for p in (0, 1):
        for a in _chunks(fb.numel()):
            count = min(BLOCK, fb.numel() - a)

            def load(_: Any, a: int = a, c: int = count) -> Any:
                return [x[a : a + c] for x in flat], fb[a : a + c]

            blocks.observe(p, a, count, load)
        blocks.end_pass(p)
    return _mix(blocks.t, list(tensors), base)


class ModelStockBlocks(BlockMerge):
    """Model Stock (per tensor) block by block: pass 0 sums each offset's squares, pass 1 the
    squares of Σ oᵢ/max(‖oᵢ‖, 10⁻³), both per block in float64; the merge is then elementwise.
    Blocks must come at multiples of BLOCK (the sums are defined per block)."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.sq: list[float] = []
        self.spread = 0.0
        self.scale: list[float] = []
        self.t = 0.0

    def wants_pass(self, p: int) -> bool:
        return p in (0, 1)

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        if start % BLOCK or count != min(BLOCK, self.numel - start):
            raise AssertionError(f"model_stock: block {start}+{count} is not a whole BLOCK")
        tensors, base = load(None)
        assert base is not None
        b = base.double()
        if p == 0:
            sums = [sum_squares(t.double() - b) for t in tensors]
            self.sq = sums if not self.sq else [x + y for x, y in zip(self.sq, sums, strict=True)]
            return
        total = torch.zeros(count, dtype=torch.float64, device=b.device)
        for t, s in zip(tensors, self.scale, strict=True):
            total += (t.double() - b) / s
        self.spread += sum_squares(total)

    def end_pass(self, p: int) -> None:
        if p == 0:
            self.scale = [max(q**0.5, NORM_FLOOR) for q in self.sq]
        else:
            self.t = _ratio(len(self.sq), self.sq, self.spread)

    def merge(self, start: int, tensors: list[torch.Tensor], base: Any) -> torch.Tensor:
        return _mix(self.t, tensors, base)
