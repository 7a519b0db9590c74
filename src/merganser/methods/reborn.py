"""Reborn (experimental): transplant a reference model's difference from the base into a
target, scaled elementwise by "dynamic attention" over the size of that difference.

No paper or full code exists (spec §7): this is the labelled reconstruction, not the author's
exact method.
"""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


@register(
    "reborn",
    params=(
        Param("temperature", "global", 1.0, low=1e-12, doc="softmax temperature tau"),
        Param("gamma", "global", 1.0, doc="scale of the transplanted difference"),
        Param(
            "normalise",
            "global",
            "max1",
            kind=str,
            choices=("max1", "mean1", "none"),
            doc="max1: s = a/max(a) (bounded); mean1: N·a; none: the raw softmax",
        ),
    ),
    needs_base=True,
    min_models=2,
    max_models=2,
    workspace=3.0,
    experimental=True,
    reference="JayLee (asiansoul), Reborn, Medium 2024 — reconstruction, spec §7.2",
)
def reborn(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    temperature: float = 1.0,
    gamma: float = 1.0,
    normalise: str = "max1",
) -> torch.Tensor:
    """EXPERIMENTAL. models = [reference R, target T]: T + γ·s⊙(R − B) with
    a = softmax(|R − B|/τ) over the tensor and s = normalise(a).
    """
    reference, target = tensors
    delta = reference - base
    logits = delta.abs().reshape(-1) / temperature
    if normalise == "max1":
        s = torch.exp(logits - logits.max())  # a / max(a), without forming tiny probabilities
    else:
        s = torch.softmax(logits, dim=0)
        if normalise == "mean1":
            s = s * s.numel()
    return target + gamma * s.view(delta.shape) * delta
