"""Feature matching between models from different initialisations: pure tensor functions.

Two families (spec §8):

* **Git Re-Basin** (Ainsworth et al., ICLR 2023, arXiv 2209.04836): *weight matching* finds,
  for every hidden-unit permutation of a :data:`PermSpec`, the permutation of model B that
  best lines its weights up with model A's, by coordinate descent over linear assignment
  problems; *activation matching* solves one assignment per layer on the features'
  cross-correlation (:func:`permute_match`).
* **ZipIt!** (Stoica et al., ICLR 2024, arXiv 2305.03053): :func:`zipit_match` greedily merges
  the most correlated pair of features, across *or within* models, until each merge point has
  its original width.

A matcher returns ``(merge, unmerge)`` over the models' stacked features (n models × d each):
``merge`` is d × n·d (each merged feature is the average of its group), ``unmerge`` is
n·d × d (0/1: which merged feature stands in for each original one).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from merganser.errors import MerganserError


def solve_lap(score: torch.Tensor) -> torch.Tensor:
    """Column index per row of the maximum-weight assignment (Hungarian, via scipy)."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(score.detach().double().cpu().numpy(), maximize=True)
    out = torch.empty(score.shape[0], dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return out


def correlation(cov: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """C / (σ σᵀ), the features' correlation from their covariance (ZipIt's metric)."""
    std = torch.diagonal(cov).clamp_min(0).sqrt()
    return cov / (torch.outer(std, std) + eps)


def _models(size: int, n_models: int) -> int:
    if n_models < 2 or size % n_models:
        raise MerganserError(
            f"matching: {size} stacked features do not split into {n_models} models"
        )
    return size // n_models


def permute_match(corr: torch.Tensor, n_models: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Align every model's features to model 0's by one LAP each on their cross-correlation.

    Activation matching (Git Re-Basin; ZipIt's ``match_tensors_permute`` baseline): each merged
    feature averages model 0's feature i with its partner in every other model.
    """
    d = _models(corr.shape[0], n_models)
    eye = torch.eye(d, dtype=torch.float64)
    blocks = [eye]
    for m in range(1, n_models):
        ci = solve_lap(corr[:d, m * d : (m + 1) * d])
        blocks.append(eye[ci].T)  # row ci[i] of model m ↔ merged feature i
    unmerge = torch.cat(blocks, dim=0)
    return (unmerge / unmerge.sum(0, keepdim=True)).T, unmerge


def zipit_match(
    corr: torch.Tensor,
    n_models: int = 2,
    alpha: float = 0.3,
    beta: float = 0.125,
    parity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt!'s greedy zip over stacked features (Stoica et al. 2024, spec §8.2).

    Repeatedly merges the most correlated pair — from two models or from the same one — until
    d groups remain. A merged group's correlations are the minimum of its members', times
    ``alpha`` (α ≤ 0 instead forbids the group any further merge with either origin model).
    Each model may make ``int((to_remove // n) · beta)`` same-model merges; with ``parity``
    the budget is checked after it is spent, as in the official code, so β = 0 still allows one
    per model; ``parity=False`` blocks them up front.
    """
    size = corr.shape[0]
    d = _models(size, n_models)
    s = corr.detach().double().clone()
    s.fill_diagonal_(-torch.inf)
    groups = torch.eye(size, dtype=torch.float64)
    origin = torch.arange(size) // d
    budget = [int((size - d) // n_models * beta + 1e-4)] * n_models
    if not parity:
        for m in range(n_models):
            if budget[m] <= 0:
                s[(origin == m)[:, None] & (origin == m)[None, :]] = -torch.inf
    while groups.shape[1] > d:
        flat = int(s.reshape(-1).argmax())
        i, j = sorted((flat % s.shape[1], flat // s.shape[1]))
        if s[i, j] == -torch.inf:
            raise MerganserError("zipit: no features left that may merge (raise beta)")
        oi, oj = int(origin[i]), int(origin[j])
        groups[:, i] += groups[:, j]
        s[:, i] = torch.minimum(s[:, i], s[:, j])
        s[i, :] = torch.minimum(s[i, :], s[j, :])
        keep = torch.arange(s.shape[1]) != j
        groups, s, origin = groups[:, keep], s[keep][:, keep], origin[keep]
        if oi == oj:
            budget[oi] -= 1
            if budget[oi] <= 0:
                s[(origin == oi)[:, None] & (origin == oi)[None, :]] = -torch.inf
        if alpha <= 0:
            for o in (oi, oj):
                s[origin == o, i] = -torch.inf
                s[i, origin == o] = -torch.inf
        else:
            s[:, i] *= alpha
            s[i, :] *= alpha
    return (groups / groups.sum(0, keepdim=True)).T, groups


# ---------------------------------------------------------------------------------------------
# Git Re-Basin weight matching over a permutation spec


@dataclass(frozen=True)
class Axis:
    """One axis of one parameter that a permutation acts on, in units of ``group`` rows."""

    param: str
    axis: int
    group: int = 1


PermSpec = Mapping[str, list[Axis]]  # permutation name -> the axes it permutes


def _take(w: torch.Tensor, ax: Axis, idx: torch.Tensor) -> torch.Tensor:
    moved = w.movedim(ax.axis, 0)
    shape = moved.shape
    units = moved.reshape(shape[0] // ax.group, -1)[idx]
    return units.reshape(shape).movedim(0, ax.axis)


def _units(w: torch.Tensor, ax: Axis) -> torch.Tensor:
    moved = w.movedim(ax.axis, 0)
    return moved.reshape(moved.shape[0] // ax.group, -1)


def perm_sizes(spec: PermSpec, params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Units per permutation, checked to agree across every axis it acts on."""
    sizes: dict[str, int] = {}
    for name, axes in spec.items():
        for ax in axes:
            if ax.param not in params:
                raise MerganserError(f"permutation {name!r}: no parameter {ax.param!r}")
            n = params[ax.param].shape[ax.axis]
            if n % ax.group:
                raise MerganserError(f"{ax.param}: axis {ax.axis} ({n}) not in units of {ax.group}")
            if sizes.setdefault(name, n // ax.group) != n // ax.group:
                raise MerganserError(
                    f"permutation {name!r}: {ax.param} axis {ax.axis} has {n // ax.group} units, "
                    f"others {sizes[name]}"
                )
    return sizes


def apply_perms(
    spec: PermSpec,
    perms: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Model B with every permutation applied: ``b'[i] = b[perm[i]]`` along each axis."""
    out = dict(params)
    for name, axes in spec.items():
        for ax in axes:
            out[ax.param] = _take(out[ax.param], ax, perms[name])
    return out


def weight_matching(
    spec: PermSpec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Permutations of B that maximise Σ⟨W_A, π(W_B)⟩ (Git Re-Basin weight matching).

    Coordinate descent as in the official code: each round visits the permutations in a random
    order and solves, for each, the LAP of Σ W_A(axis→0) · π_others(W_B)(axis→0)ᵀ, until no
    permutation improves. ``perm[p][i]`` is the unit of B matched to unit i of A.
    """
    sizes = perm_sizes(spec, a)
    if perm_sizes(spec, b) != sizes:
        raise MerganserError("weight matching: the two models' shapes differ")
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    rng = np.random.default_rng(seed)
    names = list(spec)
    for _ in range(max_iter):
        progress = False
        for k in rng.permutation(len(names)):
            p = names[k]
            score = torch.zeros(sizes[p], sizes[p], dtype=torch.float64)
            for ax in spec[p]:
                wb = b[ax.param]
                for q, axes in spec.items():  # every other permutation applied to B
                    for other in axes:
                        if other.param == ax.param and (q, other) != (p, ax):
                            wb = _take(wb, other, perms[q])
                score += _units(a[ax.param], ax).double() @ _units(wb, ax).double().T
            ci = solve_lap(score)
            old = float(score[torch.arange(sizes[p]), perms[p]].sum())
            new = float(score[torch.arange(sizes[p]), ci].sum())
            progress = progress or new > old + 1e-12
            perms[p] = ci
        if not progress:
            break
    return perms
