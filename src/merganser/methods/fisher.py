"""Fisher merging: an elementwise average weighted by each model's diagonal Fisher information."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from merganser.methods.registry import Param, register


def _norm_metadata(stats: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """A Fisher file's whole-model L2 norm, as `merganser calibrate` records it."""
    sq = sum(
        float(v.double().square().sum())
        for n, v in stats.items()
        if n == "" or n.startswith("fisher.")  # "": a single tensor's own Fisher
    )
    return {"fisher_norm": repr(math.sqrt(sq))}


def _norms(metadata: list[Mapping[str, str]], name: str) -> dict[str, Any]:
    return {"fisher_norms": [float(m.get("fisher_norm", "nan")) for m in metadata]}


@register(
    "fisher",
    params=(
        Param("weight", "model", 1.0, low=0.0, doc="λᵢ, the model's coefficient"),
        Param("floor", "global", 1e-6, low=0.0, doc="lower bound on the Fisher (no 0/0)"),
        Param(
            "floor_models",
            "global",
            "first",
            kind=str,
            choices=("first", "all"),
            doc="first: floor only the first (target) model's Fisher, as the official code",
        ),
        Param(
            "normalize",
            "global",
            False,
            kind=bool,
            doc="divide λᵢ by the model's whole-model Fisher L2 norm",
        ),
    ),
    statistics="fisher",
    statistics_params=_norms,
    statistics_metadata=_norm_metadata,
    elementwise=True,
    validate=lambda p: "weights sum to zero" if sum(p["weight"]) == 0 else None,
    reference="Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022, "
    "arXiv 2111.09832",
)
def fisher(
    tensors: list[torch.Tensor],
    weight: list[float],
    floor: float = 1e-6,
    floor_models: str = "first",
    normalize: bool = False,
    stats: list[torch.Tensor | None] | None = None,
    fisher_norms: list[float] | None = None,
) -> torch.Tensor:
    """θ* = Σ λᵢFᵢθᵢ / Σ λᵢFᵢ elementwise (Matena & Raffel 2022, arXiv 2111.09832)."""
    if stats is None or any(f is None for f in stats):
        raise ValueError("fisher merging needs every model's Fisher for every tensor")
    lam = [w / sum(weight) for w in weight]
    if normalize:
        if fisher_norms is None:
            raise ValueError("normalize: true needs the models' whole-model Fisher norms")
        lam = [x / n if n > 0 else 0.0 for x, n in zip(lam, fisher_norms, strict=True)]
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for i, (x, t, f) in enumerate(zip(lam, tensors, stats, strict=True)):
        fi = f.float()  # type: ignore[union-attr]
        if floor_models == "all" or i == 0:
            fi = fi.clamp_min(floor)
        num.addcmul_(fi, t, value=x)
        den.add_(fi, alpha=x)
    # Where every Fisher is zero (only possible without a floor) keep the first model's value.
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), tensors[0])
