"""Passthrough: copy one model's tensor, optionally scaled (used with layer slices)."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "passthrough",
    params=(Param("scale", "model", 1.0, doc="multiply the tensor by this factor"),),
    elementwise=True,
    reference="mergekit passthrough (Goddard et al., arXiv 2403.13257)",
    max_models=1,
    workspace=0.0,
)
def passthrough(tensors: list[torch.Tensor], scale: list[float]) -> torch.Tensor:
    """Return the single input tensor times ``scale`` (mergekit's passthrough)."""
    if scale[0] == 1.0:
        return tensors[0]
    return tensors[0] * scale[0]
