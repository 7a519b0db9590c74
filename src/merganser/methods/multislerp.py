"""Multi-model SLERP as mergekit 0.1.5 implements it: normalised linear interpolation."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "multislerp",
    params=(
        Param("weight", "model", None, doc="weight of each model (required, as in mergekit)"),
        Param("normalize_weights", "global", True, kind=bool, doc="divide weights by their sum"),
        Param("eps", "global", 1e-8, low=0.0, doc="guard against zero norms"),
    ),
    optional_base=True,
    validate=lambda p: (
        "weights sum to zero with normalize_weights: true"
        if p["normalize_weights"] and sum(p["weight"]) == 0
        else None
    ),
    reference="mergekit 0.1.5 merge_methods/multislerp.py (documented there as barycentric "
    "interpolation on a hypersphere; its tangent step is identically zero)",
)
def multislerp(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    weight: list[float],
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """θ₀ + normalise(Σ wᵢ ûᵢ)·Σ wᵢ‖Xᵢ‖, Xᵢ = θᵢ − θ₀ (θᵢ without a base), ûᵢ = Xᵢ/(‖Xᵢ‖+ε):
    mergekit's multislerp, whose exponential-map step vanishes (t = 0), so it is nlerp. One
    model is returned as is; two opposite directions fall back to Σ wᵢXᵢ, more are refused.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    w = list(weight)
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    xs = [t - base if base is not None else t for t in tensors]
    norms = [float(torch.linalg.vector_norm(x)) for x in xs]
    mean = torch.zeros_like(xs[0])
    for wi, x, nx in zip(w, xs, norms, strict=True):
        # Unit vector first, then the weight, each rounded (no fused multiply-add): opposite
        # directions cancel exactly, as they do in mergekit.
        mean += (x / (nx + eps)) * wi
    size = float(torch.linalg.vector_norm(mean))
    if size < eps:
        if len(tensors) != 2:
            raise ValueError("multislerp: the models' directions cancel out (antipodal)")
        out = w[0] * xs[0] + w[1] * xs[1]
    else:
        out = mean * (sum(wi * nx for wi, nx in zip(w, norms, strict=True)) / size)
    return out + base if base is not None else out
