"""RAM and RAM+ (tensor-local): Reinforced Agent Merging as mergekit 0.1.5 implements it."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register

EPSILON = Param(
    "epsilon",
    "global",
    1e-5,
    low=0.0,
    doc="a task-vector entry counts only where its magnitude exceeds this (absolute)",
)
REFERENCE = "Reinforced Agent Merging, arXiv 2601.13572, as mergekit 0.1.5 merge_methods/ram.py"


def _split(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """The task vectors, where each counts (|τᵢ| > ε) and how many count at each entry."""
    taus = [t - base for t in tensors]
    counts = [tau.abs() > epsilon for tau in taus]
    n = torch.zeros_like(base)
    for c in counts:
        n += c
    return taus, counts, n


@register("ram", params=(EPSILON,), needs_base=True, elementwise=True, reference=REFERENCE)
def ram(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float = 1e-5) -> torch.Tensor:
    """θ₀ + τ, τ at each entry the one counting τᵢ where only one counts and the mean of the
    counting τᵢ where several do (|τᵢ| ≤ ε is dropped and not counted).
    """
    taus, counts, n = _split(tensors, base, epsilon)
    out = torch.zeros_like(base)
    for tau, c in zip(taus, counts, strict=True):
        out += torch.where(c, tau, 0.0)
    return base + out / n.clamp_min(1.0)


@register(
    "ramplus_tl",
    params=(
        Param("r", "global", 0.1, low=0.0, doc="strength of the unique-entry rescale"),
        Param("alpha", "global", 0.2, low=0.0, doc="cap on each model's shared/unique ratio"),
        EPSILON,
    ),
    needs_base=True,
    reference=REFERENCE,
)
def ramplus_tl(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """RAM with each model's unique entries scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ its
    shared/unique entry ratio within this tensor (mergekit's tensor-local RAM+).
    """
    taus, counts, n = _split(tensors, base, epsilon)
    unique, shared = n == 1, n > 1
    out = torch.zeros_like(base)
    for tau, c in zip(taus, counts, strict=True):
        rho = int((c & shared).sum()) / max(int((c & unique).sum()), epsilon)
        lam = 1 + r * min(max(rho, 0.0), alpha)
        kept = torch.where(c, tau, 0.0)
        out += torch.where(unique, lam * kept, kept / n.clamp_min(1.0))
    return base + out
