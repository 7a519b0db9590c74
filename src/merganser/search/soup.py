"""Greedy soup (Wortsman et al., Model soups, ICML 2022, Algorithm 1)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

StateDict = Mapping[str, torch.Tensor]


@dataclass
class SoupResult:
    soup: dict[str, torch.Tensor]
    ingredients: list[int]  # indices into the input models, in the order they were added
    score: float
    history: list[tuple[int, float, bool]] = field(default_factory=list)  # (model, score, kept)


def _mean(models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    out = {}
    for k, first in models[0].items():
        if not first.is_floating_point():
            out[k] = first.clone()
            continue
        acc = torch.zeros_like(first, dtype=torch.float32)
        for m in models:
            acc.add_(m[k].float())
        out[k] = acc.div_(len(models)).to(first.dtype)
    return out


def greedy_soup(
    models: Sequence[StateDict],
    evaluate: Callable[[StateDict], float],
    scores: Sequence[float] | None = None,
    report: Callable[[int, StateDict, float], None] | None = None,
) -> SoupResult:
    """Sort models by held-out score, then add each to the uniform soup only if the soup's
    held-out score rises strictly (ties are rejected) — one pass, no revisiting.

    ``evaluate`` must score on a held-out (dev) split, never the test split. ``scores`` may give
    the individual models' scores to avoid re-evaluating them; ``report(step, soup, score)``
    is called with the soup after each step (step 0 is the best single model).
    """
    if not models:
        raise ValueError("greedy_soup needs at least one model")
    individual = list(scores) if scores is not None else [evaluate(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -individual[i])
    chosen = [order[0]]
    best = individual[order[0]]
    soup = _mean([models[order[0]]])
    history = [(order[0], best, True)]
    if report is not None:
        report(0, soup, best)
    for i in order[1:]:
        candidate = _mean([models[j] for j in (*chosen, i)])
        score = evaluate(candidate)
        kept = score > best
        history.append((i, score, kept))
        if kept:
            chosen.append(i)
            soup, best = candidate, score
        if report is not None:
            report(len(history) - 1, soup, best)
    return SoupResult(soup, chosen, best, history)
