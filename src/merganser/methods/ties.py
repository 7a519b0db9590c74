"""TIES-Merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any

import torch

from merganser.methods.params import DENSITY, LAMBDA, WEIGHT, normalize, rescale
from merganser.methods.registry import Param, register
from merganser.methods.sparsify import rescale as apply_rescale
from merganser.methods.sparsify import threshold_mask, topk_mask
from merganser.methods.task_vectors import generalized_task_arithmetic
from merganser.stats import GlobalTopK

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
    doc="trim each tensor (mergekit) or the whole model at once (paper)",
)


def _global_stats(params: dict[str, Any]) -> GlobalTopK | None:
    return GlobalTopK() if params.get("scope") == "global" else None


@register(
    "ties",
    params=(WEIGHT, DENSITY, LAMBDA, normalize(True), SIGN, SCOPE, rescale("none")),
    needs_base=True,
    workspace=2.5,
    stats=_global_stats,
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
