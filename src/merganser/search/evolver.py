"""Evolver (Du et al., "Knowledge Fusion By Evolving Weights of Language Models", arXiv 2406.12208).

The population is the fine-tuned models themselves, each flattened to one vector. A child is
a differential-evolution mutant crossed over with its parent element by element; it replaces
the parent only if the dev score rises (spec §6.1). Two modes, as in the official code:

- ``standalone`` (``evolve``): each child competes with its own parent, ``dev(child)``.
- ``merger`` (``evolve_with_merger``): a child is kept if ``dev(Merge(population with the
  child in its parent's place))`` beats the current merged score; the result is that merge.

Departures (docs/methods.md): selection uses the dev split only (the official mode B picks
its returned population by test score); standalone generations are synchronous (all children
come from the generation's start, so they can be scored in parallel); and merger mode's
default ``batch`` schedule scores the n single substitutions in parallel, then accepts the
improving ones best first, re-scoring each further one on top of those already accepted, so
every acceptance is still a measured improvement. ``schedule: sequential`` is the code's order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from merganser.errors import MerganserError
from merganser.pipeline.tensors import merge_tensors
from merganser.search.common import Flat, Scorer, SearchResult, StateDict


@dataclass(frozen=True)
class EvolverConfig:
    mode: Literal["standalone", "merger"] = "merger"
    mutation: Literal["code", "rand1"] = "code"
    f: float = 0.5
    cr: float = 0.5
    generations: int = 15
    schedule: Literal["batch", "sequential"] = "batch"
    merger: str = "linear"
    merger_params: Mapping[str, Any] = field(default_factory=dict)
    # Per-model calibration statistics for a data-aware merger (regmean, fisher). As in the
    # official code they describe the original models and are not recomputed as they evolve.
    merger_statistics: Sequence[Mapping[str, torch.Tensor]] | None = None
    seed: int = 0


def crossover(x: torch.Tensor, mutant: torch.Tensor, cr: float, u: torch.Tensor) -> torch.Tensor:
    """Binomial crossover: take the mutant where the uniform draw ``u`` is below ``cr``."""
    return torch.where(u < cr, mutant, x)


def mutate(pop: torch.Tensor, i: int, f: float, partners: Sequence[int]) -> torch.Tensor:
    """``code``: x_i + F(x_ref − x_i) with one partner; ``rand1``: x_r1 + F(x_r2 − x_r3)."""
    if len(partners) == 1:
        return torch.lerp(pop[i], pop[partners[0]], f)
    r1, r2, r3 = partners
    return pop[r1] + f * (pop[r2] - pop[r3])


class _Evolution:
    def __init__(
        self,
        models: Sequence[StateDict],
        base: StateDict | None,
        config: EvolverConfig,
        score: Scorer,
    ):
        n = len(models)
        if n < 2:
            raise MerganserError("evolver: needs at least two models")
        if config.mutation == "rand1" and n < 4:
            raise MerganserError("evolver: mutation rand1 needs at least four models")
        self.flat = Flat(models[0])
        self.pop = torch.stack([self.flat.flatten(m) for m in models])
        self.base, self.c, self.score = base, config, score
        self.gen = torch.Generator().manual_seed(config.seed)
        self.evaluations = 0
        self.history: list[dict[str, Any]] = []

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def _pick(self, options: list[int]) -> int:
        return options[int(torch.randint(len(options), (), generator=self.gen))]

    def _child(self, i: int, ref: int | None = None) -> torch.Tensor:
        n = self.pop.shape[0]
        others = [j for j in range(n) if j != i]
        if self.c.mutation == "rand1":
            # Three distinct partners, drawn one after another without replacement.
            partners = [
                others.pop(int(torch.randint(len(others), (), generator=self.gen)))
                for _ in range(3)
            ]
        else:
            partners = [ref if ref is not None else self._pick(others)]
        u = torch.rand(self.pop.shape[1], generator=self.gen)
        return crossover(self.pop[i], mutate(self.pop, i, self.c.f, partners), self.c.cr, u)

    def _score(self, candidates: list[StateDict]) -> list[float]:
        self.evaluations += len(candidates)
        return self.score(candidates)

    def _merge(self, pop: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return merge_tensors(
            self.c.merger,
            [self.flat.unflatten(x) for x in pop],
            base=self.base,
            statistics=self.c.merger_statistics,
            **dict(self.c.merger_params),
        )

    def standalone(self) -> SearchResult:
        n, g = self.pop.shape[0], self.c.generations
        scores = self._score([self.flat.unflatten(x) for x in self.pop])
        start = max(scores)
        self.score.generation(0, self.flat.unflatten(self.pop[scores.index(start)]), start)
        for it in range(g):
            children = []
            for i in range(n):
                p = 0.5 / (g - it) + 0.5  # chance of a random partner, rising to 1
                others = [j for j in range(n) if j != i]
                ref = (
                    self._pick(others) if self._rand() < p else max(others, key=scores.__getitem__)
                )
                children.append(self._child(i, ref))
            child_scores = self._score([self.flat.unflatten(c) for c in children])
            accepted = 0
            for i, (c, s) in enumerate(zip(children, child_scores, strict=True)):
                if s > scores[i]:
                    self.pop[i], scores[i] = c, s
                    accepted += 1
            best = max(range(n), key=scores.__getitem__)
            self._report(it, self.flat.unflatten(self.pop[best]), scores[best], accepted)
        best = max(range(n), key=scores.__getitem__)
        return self._result(self.flat.unflatten(self.pop[best].clone()), scores[best], start)

    def with_merger(self) -> SearchResult:
        n = self.pop.shape[0]
        (s_now,) = self._score([self._merge(self.pop)])
        start = s_now
        self.score.generation(0, self._merge(self.pop), start)
        for it in range(self.c.generations):
            perm = torch.randperm(n, generator=self.gen).tolist()
            accepted = 0
            if self.c.schedule == "sequential":
                for i in perm:
                    child = self._child(i)
                    (s,) = self._score([self._merge(self._with(i, child))])
                    if s > s_now:
                        self.pop[i], s_now = child, s
                        accepted += 1
            else:
                children = {i: self._child(i) for i in perm}
                trial = self._score([self._merge(self._with(i, children[i])) for i in perm])
                better = sorted(
                    ((s, k) for k, s in enumerate(trial) if s > s_now), key=lambda e: (-e[0], e[1])
                )
                for rank, (s, k) in enumerate(better):
                    i = perm[k]
                    if rank > 0:  # re-measure on top of what was accepted before it
                        (s,) = self._score([self._merge(self._with(i, children[i]))])
                    if s > s_now:
                        self.pop[i], s_now = children[i], s
                        accepted += 1
            self._report(it, self._merge(self.pop), s_now, accepted)
        return self._result(self._merge(self.pop), s_now, start)

    def _with(self, i: int, child: torch.Tensor) -> list[torch.Tensor]:
        return [child if j == i else x for j, x in enumerate(self.pop)]

    def _report(self, it: int, best: StateDict, dev: float, accepted: int) -> None:
        self.history.append({"generation": it + 1, "dev": dev, "accepted": accepted})
        self.score.generation(it + 1, best, dev)

    def _result(self, best: dict[str, torch.Tensor], dev: float, start: float) -> SearchResult:
        return SearchResult(best, dev, start, self.evaluations, self.history)


def evolve(
    models: Sequence[StateDict],
    score: Scorer,
    config: EvolverConfig | None = None,
    base: StateDict | None = None,
) -> SearchResult:
    """Evolver (Du et al., arXiv 2406.12208): DE over the models' weights, selected on dev."""
    config = config or EvolverConfig()
    ev = _Evolution(models, base, config, score)
    return ev.standalone() if config.mode == "standalone" else ev.with_merger()
