"""Top-k greedy merging, optionally guided by Model Kinship (Hu et al., arXiv 2410.12613, §11.2).

Each generation merges every not-yet-merged pair among the k best models in the pool. The
kinship variant also merges the best model with its most distant relative outside the top k
("exploration"), which the paper finds escapes the plateau that plain greedy merging reaches
as the top models become near-identical. The search stops when a generation does not raise
the best dev score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import torch

from merganser.analysis.kinship import state_kinship
from merganser.model.naming import depth, layer_index
from merganser.pipeline.recipe import ParamValue, evaluate, parse_value
from merganser.pipeline.tensors import merge_tensors
from merganser.search.common import Scorer, SearchResult, StateDict

# The released Model Kinship children: mergekit SLERP with this layer schedule (spec §11.2).
KINSHIP_SLERP_T: list[dict[str, Any]] = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def slerp_merger(t: Any = None) -> Callable[[StateDict, StateDict], dict[str, torch.Tensor]]:
    """SLERP of two in-memory models, ``t`` in recipe syntax (default: the paper's schedule)."""
    schedule: ParamValue = parse_value(KINSHIP_SLERP_T if t is None else t, "t")

    def merge(a: StateDict, b: StateDict) -> dict[str, torch.Tensor]:
        layers = 1 + max((i for k in a if (i := layer_index(k)) is not None), default=0)
        return merge_tensors(
            "slerp",
            [b],
            base=a,
            tensor_params=lambda k: {"t": evaluate(schedule, k, depth(k, layers))},
        )

    return merge


def greedy_merge_search(
    pool: Sequence[StateDict],
    merge: Callable[[StateDict, StateDict], dict[str, torch.Tensor]],
    score: Scorer,
    base: StateDict | None = None,
    k: int = 3,
    explore: bool = True,
    generations: int = 5,
    metric: str = "pearson",
) -> SearchResult:
    """Top-k greedy merging with kinship-guided exploration (``explore`` needs ``base``)."""
    models: list[StateDict] = list(pool)
    if len(models) < 2:
        raise ValueError("greedy merging needs at least two models")
    if explore and base is None:
        raise ValueError("kinship-guided exploration needs the base model")
    scores = score(models)
    evaluations = len(models)
    start = max(scores)
    score.generation(0, models[scores.index(start)], start)
    merged: set[tuple[int, int]] = set()
    kin: dict[tuple[int, int], float] = {}
    history: list[dict[str, Any]] = []
    lineage: list[str] = [f"model{i}" for i in range(len(models))]

    def ranked() -> list[int]:
        return sorted(range(len(models)), key=lambda i: (-scores[i], i))

    for g in range(1, generations + 1):
        order = ranked()
        top = order[:k]
        pairs = [p for p in combinations(sorted(top), 2) if p not in merged]
        explored = None
        if explore and len(order) > k:
            best = top[0]
            for i in order[k:]:
                if (best, i) not in kin:
                    kin[best, i] = state_kinship(models[best], models[i], base)[metric]  # type: ignore[arg-type]
            far = min(order[k:], key=lambda i: (kin[best, i], i))
            if (best, far) not in merged and (far, best) not in merged:
                explored = (best, far)
                pairs.append(explored)
        if not pairs:
            break
        merged.update(pairs)
        children = [merge(models[a], models[b]) for a, b in pairs]
        child_scores = score(children)
        evaluations += len(children)
        before = scores[order[0]]
        for (a, b), c, s in zip(pairs, children, child_scores, strict=True):
            models.append(c)
            scores.append(s)
            lineage.append(f"g{g}({lineage[a]}×{lineage[b]})")
        top_now = ranked()[0]
        history.append(
            {
                "generation": g,
                "dev": scores[top_now],
                "children": len(children),
                "explored": None if explored is None else [lineage[i] for i in explored],
            }
        )
        score.generation(g, models[top_now], scores[top_now])
        if scores[top_now] <= before:
            break
    top_now = ranked()[0]
    return SearchResult(
        dict(models[top_now]),
        scores[top_now],
        start,
        evaluations,
        history,
        {"best": lineage[top_now]},
    )
