"""WUDI merging: data-free merging guided by the task vectors themselves (Cheng et al., ICML
2025, arXiv 2503.08099).
"""

from __future__ import annotations

import torch

from merganser.methods.registry import Param, register


def _loss(m: torch.Tensor, taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σᵢ ‖(M − τᵢ)τᵢᵀ‖²_F / cᵢ, on whichever side is smaller (out×out or, equally,
    tr((M − τᵢ)Gᵢ(M − τᵢ)ᵀ) with the in×in Gram Gᵢ = τᵢᵀτᵢ).
    """
    total = m.new_zeros(())
    for tau, c in zip(taus, weights, strict=True):
        diff = m - tau
        if tau.shape[0] <= tau.shape[1]:
            total = total + (diff @ tau.T).pow(2).sum() / c
        else:
            total = total + ((diff @ (tau.T @ tau)) * diff).sum() / c
    return total


@register(
    "wudi",
    params=(
        Param("lambda", "global", 1.0, doc="scale of the merged task vector (FusionBench: 1.0)"),
        Param("lr", "global", 1e-5, low=0.0, doc="Adam's learning rate (official: 1e-5)"),
        Param("steps", "global", 300, kind=int, low=0, doc="Adam steps (official: 300)"),
        Param(
            "solver",
            "global",
            "adam",
            kind=str,
            choices=("adam", "closed_form"),
            doc="adam (the official optimiser, which stays near the task-arithmetic sum) or "
            "closed_form (the loss's exact minimum)",
        ),
        Param(
            "non_matrix",
            "global",
            "mean",
            kind=str,
            choices=("mean", "base"),
            paper="base",
            doc="tensors other than 2-D: the mean task vector (FusionBench) or the base (official)",
        ),
    ),
    needs_base=True,
    workspace=6.0,
    reference="Cheng et al., Whoever Started the Interference Should End It: Guiding Data-Free "
    "Model Merging via Task Vectors, ICML 2025, arXiv 2503.08099",
)
def wudi(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    lambda_: float = 1.0,
    lr: float = 1e-5,
    steps: int = 300,
    solver: str = "adam",
    non_matrix: str = "mean",
) -> torch.Tensor:
    """θ₀ + λ·M, M minimising Σᵢ ‖(M − τᵢ)τᵢᵀ‖²_F / ‖τᵢ‖²_F from M = Σᵢτᵢ: ``steps`` Adam
    steps as the official code (spec §3.1), or its closed form
    M* = (Σᵢ τᵢGᵢ/cᵢ)(Σᵢ Gᵢ/cᵢ)⁺ (a pseudo-inverse where singular).
    """
    taus = [t - base for t in tensors]
    if base.dim() != 2:
        if non_matrix == "base":
            return base.clone()
        return base + lambda_ * torch.stack(taus).mean(dim=0)
    weights = [float(t.pow(2).sum()) for t in taus]
    live = [(t, c) for t, c in zip(taus, weights, strict=True) if c > 0]
    if not live:
        return base.clone()
    taus, weights = [t for t, _ in live], [c for _, c in live]
    if solver == "closed_form":
        grams = [(t.T @ t).double() / c for t, c in zip(taus, weights, strict=True)]
        lhs = sum(t.double() @ g for t, g in zip(taus, grams, strict=True))
        m = (lhs @ torch.linalg.pinv(sum(grams))).float()
        return base + lambda_ * m
    # Float64: each step moves an entry by about lr, below float32's resolution near 1 for
    # lr 1e-5, so float32 rounding would drift the 300 steps (8e-6 in the worked example).
    wide = [t.double() for t in taus]
    m = torch.stack(wide).sum(dim=0).requires_grad_(True)
    opt = torch.optim.Adam([m], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            _loss(m, wide, weights).backward()
            opt.step()
    return base + lambda_ * m.detach().float()
