"""Karcher (Riemannian) mean of tensors on the hypersphere, with per-model weights."""

from __future__ import annotations

import math

import torch

from merganser.methods.params import WEIGHT
from merganser.methods.registry import Param, register


@register(
    "karcher",
    params=(
        WEIGHT,
        Param("max_iter", "global", 10, kind=int, low=1, high=10_000),
        Param("tol", "global", 1e-5, low=0.0),
    ),
    workspace=3.0,
    reference="Karcher 1977; mergekit karcher (weights honoured here, uniform in mergekit)",
)
def karcher(
    tensors: list[torch.Tensor], weight: list[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """Weighted Karcher mean of the unit directions, scaled by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weight)
    alphas = [w / total for w in weight] if total else [1 / len(weight)] * len(weight)
    norms = [float(t.norm()) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    units = {i: tensors[i] / norms[i] for i in valid}
    a_sum = sum(alphas[i] for i in valid)
    a = {i: alphas[i] / a_sum for i in valid}
    mean = sum(a[i] * units[i] for i in valid)
    m_norm = float(mean.norm())
    mean = units[valid[0]].clone() if m_norm < tol else mean / m_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for i in valid:
            dot = max(-1.0, min(1.0, float((mean * units[i]).sum())))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a[i] * (theta / math.sin(theta)) * (units[i] - dot * mean)
        t_norm = float(tangent.norm())
        if t_norm < tol:
            break
        mean = math.cos(t_norm) * mean + math.sin(t_norm) * (tangent / t_norm)
        u = float(mean.norm())
        if u > tol:
            mean = mean / u
    return sum(al * n for al, n in zip(alphas, norms, strict=True)) * mean
