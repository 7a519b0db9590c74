"""Model Kinship (Hu et al., arXiv 2410.12613): similarity of two models' task vectors.

Streaming: task vectors are never flattened into one vector. Each tensor contributes float64
moments (computed a few million entries at a time), combined across tensors with Chan's
parallel formulas, so a model of any size needs memory for one tensor per model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merganser.errors import MerganserError
from merganser.storage.checkpoint import Checkpoint
from merganser.storage.writer import publish

METRICS = ("pearson", "cosine", "abs_cosine", "euclidean")
_CHUNK = 1 << 22


@dataclass
class Moments:
    """Count, means, centred second moments and raw sums of a pair (x, y), in float64."""

    n: int = 0
    mx: float = 0.0
    my: float = 0.0
    vxx: float = 0.0  # Σ (x - mx)²
    vyy: float = 0.0
    cxy: float = 0.0  # Σ (x - mx)(y - my)
    sxx: float = 0.0  # Σ x²
    syy: float = 0.0
    sxy: float = 0.0  # Σ xy
    sdd: float = 0.0  # Σ (x - y)²
    keys: list[tuple[int, dict[str, float]]] = field(default_factory=list)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> Moments:
        """Fold in one tensor pair (flattened); returns this tensor's own moments."""
        x, y = x.reshape(-1), y.reshape(-1)
        n = x.numel()
        if n == 0:
            return Moments()
        sx = sy = sxx = syy = sxy = sdd = 0.0
        for i in range(0, n, _CHUNK):
            a, b = x[i : i + _CHUNK].double(), y[i : i + _CHUNK].double()
            sx += float(a.sum())
            sy += float(b.sum())
            sxx += float(a.dot(a))
            syy += float(b.dot(b))
            sxy += float(a.dot(b))
            sdd += float((a - b).square().sum())
        mx, my = sx / n, sy / n
        vxx = vyy = cxy = 0.0
        for i in range(0, n, _CHUNK):
            a, b = x[i : i + _CHUNK].double() - mx, y[i : i + _CHUNK].double() - my
            vxx += float(a.dot(a))
            vyy += float(b.dot(b))
            cxy += float(a.dot(b))
        own = Moments(n, mx, my, vxx, vyy, cxy, sxx, syy, sxy, sdd)
        self._combine(own)
        return own

    def _combine(self, o: Moments) -> None:
        if self.n == 0:
            self.n, self.mx, self.my = o.n, o.mx, o.my
            self.vxx, self.vyy, self.cxy = o.vxx, o.vyy, o.cxy
        else:
            n = self.n + o.n
            dx, dy = o.mx - self.mx, o.my - self.my
            w = self.n * o.n / n
            self.vxx += o.vxx + dx * dx * w
            self.vyy += o.vyy + dy * dy * w
            self.cxy += o.cxy + dx * dy * w
            self.mx += dx * o.n / n
            self.my += dy * o.n / n
            self.n = n
        self.sxx += o.sxx
        self.syy += o.syy
        self.sxy += o.sxy
        self.sdd += o.sdd

    def metrics(self) -> dict[str, float]:
        """Pearson, signed and absolute cosine, Euclidean distance (NaN where undefined)."""
        pcc = self.cxy / math.sqrt(self.vxx * self.vyy) if self.vxx * self.vyy > 0 else math.nan
        cos = self.sxy / math.sqrt(self.sxx * self.syy) if self.sxx * self.syy > 0 else math.nan
        return {
            "pearson": max(-1.0, min(1.0, pcc)) if not math.isnan(pcc) else pcc,
            "cosine": max(-1.0, min(1.0, cos)) if not math.isnan(cos) else cos,
            "abs_cosine": abs(cos),
            "euclidean": math.sqrt(self.sdd),
        }


def vector_kinship(d1: torch.Tensor, d2: torch.Tensor) -> dict[str, float]:
    """The metrics of two task vectors given as tensors (spec §11.1)."""
    m = Moments()
    m.add(d1.float(), d2.float())
    return m.metrics()


def kinship_matrix(
    models: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str], split: bool = False
) -> dict[str, list[list[float]]]:
    """Pairwise kinship of ``models`` relative to ``base``, one pass over the files.

    ``split`` averages per-tensor metrics weighted by size (the reference code's
    ``--split-calculation``); otherwise the whole task vectors are compared.
    """
    if len(models) < 2:
        raise MerganserError("kinship: give at least two models")
    ckpts = [Checkpoint(p) for p in models]
    base_ckpt = Checkpoint(base)
    try:
        k = len(ckpts)
        pairs = {(i, j): Moments() for i in range(k) for j in range(i + 1, k)}
        split_sum = {(i, j): dict.fromkeys(METRICS, 0.0) for i, j in pairs}
        split_n = {(i, j): dict.fromkeys(METRICS, 0) for i, j in pairs}
        for name, info in base_ckpt.tensors.items():
            if not info.dtype.is_floating_point:
                continue
            for c, p in zip(ckpts, models, strict=True):
                if name not in c.tensors:
                    raise MerganserError(f"{p}: tensor {name!r} missing (present in {base})")
            b = base_ckpt.read(name).float()
            deltas = []
            for c in ckpts:
                t = c.read(name).float()
                rows = min(t.shape[0], b.shape[0]) if t.dim() and b.dim() else None
                # Vocabulary mismatch: compare the shared rows only.
                if t.shape != b.shape and (rows is None or t.shape[1:] != b.shape[1:]):
                    raise MerganserError(
                        f"tensor {name!r}: shape {list(t.shape)} vs {list(b.shape)} in the base"
                    )
                deltas.append((t[:rows] - b[:rows]) if rows is not None else (t - b))
            for (i, j), m in pairs.items():
                rows = min(deltas[i].shape[0], deltas[j].shape[0]) if deltas[i].dim() else None
                own = m.add(deltas[i][:rows], deltas[j][:rows])
                if split:
                    for key, v in own.metrics().items():
                        if not math.isnan(v):
                            split_sum[i, j][key] += v * own.n
                            split_n[i, j][key] += own.n
        out = {
            name: [[1.0 if name != "euclidean" else 0.0] * k for _ in range(k)] for name in METRICS
        }
        for (i, j), m in pairs.items():
            values = (
                {
                    key: split_sum[i, j][key] / split_n[i, j][key]
                    if split_n[i, j][key]
                    else math.nan
                    for key in METRICS
                }
                if split
                else m.metrics()
            )
            for key, v in values.items():
                out[key][i][j] = out[key][j][i] = v
        return out
    finally:
        for c in (*ckpts, base_ckpt):
            c.close()


def format_matrix(names: Sequence[str], matrix: list[list[float]]) -> str:
    short = [Path(n).name or str(n) for n in names]
    width = max(10, *(len(s) for s in short)) + 2
    lines = [" " * width + "".join(f"{s[: width - 2]:>{width}}" for s in short)]
    for s, row in zip(short, matrix, strict=True):
        lines.append(f"{s:<{width}}" + "".join(f"{v:>{width}.4f}" for v in row))
    return "\n".join(lines)


def heatmap(names: Sequence[str], matrix: list[list[float]], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    short = [Path(n).name or str(n) for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(short) + 3, 1.0 * len(short) + 2))
    im = ax.imshow(matrix, cmap="viridis")
    ax.set_xticks(range(len(short)), short, rotation=45, ha="right")
    ax.set_yticks(range(len(short)), short)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(f"model kinship ({metric}) of task vectors")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=120, format="png")
        publish(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def state_kinship(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """The metrics of two in-memory models' task vectors relative to ``base`` (spec §11.1)."""
    m = Moments()
    for k, t in base.items():
        if t.is_floating_point():
            m.add(a[k].float() - t.float(), b[k].float() - t.float())
    return m.metrics()
