"""RegMean: closed-form merging of linear layers from their input Gram matrices."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import torch

from merganser.methods.registry import Param, register


def reduce_nondiag(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1−α)·diag(G): shrink the off-diagonal entries, keep the diagonal (spec §9.1)."""
    if alpha == 1.0:
        return gram
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


@functools.lru_cache(maxsize=64)
def _names(text: str) -> frozenset[str]:
    return frozenset(json.loads(text))


def _layout(metadata: list[Mapping[str, str]], name: str) -> dict[str, Any]:
    """Whether ``name`` is stored ``[in, out]`` (GPT-2 Conv1D), as each calibration recorded;
    a linear layer a calibration's data never reached has no Gram to merge it by."""
    if any(name in _names(m.get("no_input", "[]")) for m in metadata):
        raise ValueError(f"{name}: a linear layer the calibration data never reached (no Gram)")
    marks = {name in _names(m.get("in_out", "[]")) for m in metadata}
    if len(marks) > 1:
        raise ValueError(f"{name}: the statistics disagree on whether it is a Conv1D weight")
    return {"in_out": marks.pop()} if marks else {}


@register(
    "regmean",
    params=(
        Param("weight", "model", 1.0, low=0.0, doc="model coefficient (Gᵢ scaled by n·wᵢ/Σw)"),
        Param("alpha", "global", 1.0, low=0.0, high=1.0, doc="off-diagonal scale of the Grams"),
        Param(
            "ridge",
            "global",
            1e-6,
            low=0.0,
            doc="pull toward the plain mean, relative to the mean Gram diagonal (singular Grams)",
        ),
    ),
    statistics="gram",
    statistics_params=_layout,
    validate=lambda p: "weights sum to zero" if sum(p["weight"]) == 0 else None,
    workspace=2.0,
    reference="Jin et al., Dataless Knowledge Fusion by Merging Weights, ICLR 2023, "
    "arXiv 2212.09849",
)
def regmean(
    tensors: list[torch.Tensor],
    weight: list[float],
    alpha: float = 1.0,
    ridge: float = 1e-6,
    stats: list[torch.Tensor | None] | None = None,
    in_out: bool = False,
) -> torch.Tensor:
    """W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ per linear weight, in float64 (Jin et al. 2023, arXiv 2212.09849).

    ``stats`` are the input Grams Xᵢᵀ Xᵢ of the layer; tensors without them (biases, norms,
    embeddings) get the weighted mean. ``ridge`` solves (ΣG̃ + εI) Wᵀ = ΣG̃ᵢWᵢᵀ + ε W̄ᵀ, which
    leaves input features no model ever saw at the mean instead of zero. ``in_out``: the
    weights are stored ``[in, out]`` (GPT-2 Conv1D), so W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ.
    """
    if in_out and tensors[0].dim() == 2:
        flipped = [t.T for t in tensors]
        return regmean(flipped, weight, alpha, ridge, stats).T.contiguous()
    total = sum(weight)
    mean = torch.zeros_like(tensors[0])
    for w, t in zip(weight, tensors, strict=True):
        mean.add_(t, alpha=w / total)
    if stats is None or any(g is None for g in stats) or tensors[0].dim() != 2:
        return mean
    n = len(tensors)
    a = torch.zeros(tensors[0].shape[1], tensors[0].shape[1], dtype=torch.float64)
    b = torch.zeros(tensors[0].shape[1], tensors[0].shape[0], dtype=torch.float64)
    for w, t, g in zip(weight, tensors, stats, strict=True):
        gi = reduce_nondiag(g.double() * (n * w / total), alpha)  # type: ignore[union-attr]
        a += gi
        b += gi @ t.double().T
    if ridge > 0:
        eps = ridge * float(torch.diagonal(a).mean()) or ridge
        a.diagonal().add_(eps)
        b += eps * mean.double().T
    return torch.linalg.solve(a, b).T.to(torch.float32).contiguous()
