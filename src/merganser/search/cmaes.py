"""CMA-ES over a recipe's parameters (Hansen's ``cma`` package), in the manner of mergekit-evolve.

The genome holds one value per (parameter, layer group, model), each scaled into [0, 1]
between its bounds. With ``layer_groups: G > 1`` the layer stack is cut into G contiguous
groups with their own values, and the tensors outside the stack (embeddings, final norm,
head) form one more group. Candidates are merged in memory with ``merge_tensors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from merganser.errors import MerganserError
from merganser.methods import get_method
from merganser.model.naming import layer_index
from merganser.pipeline.tensors import merge_tensors
from merganser.search.common import Scorer, SearchResult, StateDict

DEFAULT_BOUNDS = {"weight": (0.0, 1.5), "density": (0.05, 1.0)}


@dataclass(frozen=True)
class CMAConfig:
    method: str = "task_arithmetic"
    optimize: tuple[str, ...] = ("weight",)
    start: Mapping[str, float | Sequence[float]] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # other parameters, held constant
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    layer_groups: int = 1
    generations: int = 10
    popsize: int | None = None
    sigma: float = 0.15
    seed: int = 0


class Genome:
    """Maps a vector in [0, 1]^d to per-tensor, per-model parameter values."""

    def __init__(self, config: CMAConfig, n_models: int, keys: Sequence[str]):
        method = get_method(config.method, "cmaes.method")
        per_model = {p.name for p in method.params if p.scope == "model"}
        for name in config.optimize:
            if name not in per_model:
                raise MerganserError(
                    f"cmaes.optimize: {name!r} is not a per-model parameter of "
                    f"{config.method!r} (has {sorted(per_model)})"
                )
        self.names = tuple(config.optimize)
        self.n = n_models
        self.bounds = {
            k: tuple(config.bounds.get(k, DEFAULT_BOUNDS.get(k, (0.0, 1.0)))) for k in self.names
        }
        layers = [i for k in keys if (i := layer_index(k)) is not None]
        self.num_layers = max(layers) + 1 if layers else 0
        g = config.layer_groups
        if g < 1 or (g > 1 and g > self.num_layers):
            raise MerganserError(
                f"cmaes.layer_groups: expected 1..{max(1, self.num_layers)}, got {g}"
            )
        self.groups = g + (1 if g > 1 else 0)
        self.dim = len(self.names) * self.groups * n_models
        start = []
        for name in self.names:
            v = config.start.get(name, 1.0 / n_models if name == "weight" else 0.5)
            values = list(v) if isinstance(v, (list, tuple)) else [v] * n_models
            if len(values) != n_models:
                raise MerganserError(f"cmaes.start.{name}: needs {n_models} values")
            lo, hi = self.bounds[name]
            if not all(lo <= x <= hi for x in values):
                raise MerganserError(f"cmaes.start.{name}: {values} outside bounds [{lo}, {hi}]")
            start.extend([(x - lo) / (hi - lo) for x in values] * self.groups)
        self.x0 = np.array(start)

    def group(self, key: str) -> int:
        idx = layer_index(key)
        if self.groups == 1:
            return 0
        if idx is None:
            return self.groups - 1
        return idx * (self.groups - 1) // self.num_layers

    def values(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """name -> [groups, models] array of parameter values."""
        out = {}
        block = self.groups * self.n
        for j, name in enumerate(self.names):
            lo, hi = self.bounds[name]
            v = np.clip(x[j * block : (j + 1) * block], 0.0, 1.0) * (hi - lo) + lo
            out[name] = v.reshape(self.groups, self.n)
        return out

    def describe(self, x: np.ndarray) -> dict[str, list[list[float]]]:
        return {k: np.round(v, 4).tolist() for k, v in self.values(x).items()}


def merge_genome(
    genome: Genome,
    x: np.ndarray,
    config: CMAConfig,
    models: Sequence[StateDict],
    base: StateDict | None,
) -> dict[str, torch.Tensor]:
    vals = genome.values(x)
    return merge_tensors(
        config.method,
        models,
        base=base,
        tensor_params=lambda k: {n: v[genome.group(k)].tolist() for n, v in vals.items()},
        **dict(config.fixed),
    )


def cma_search(
    models: Sequence[StateDict],
    score: Scorer,
    config: CMAConfig | None = None,
    base: StateDict | None = None,
) -> SearchResult:
    """CMA-ES (Hansen & Ostermeier 2001) over per-model merge parameters, selected on dev."""
    import cma

    config = config or CMAConfig()
    genome = Genome(config, len(models), list(models[0]))
    if get_method(config.method, "cmaes.method").needs_base and base is None:
        raise MerganserError(f"cmaes: method {config.method!r} needs base_model")
    opts: dict[str, Any] = {
        "bounds": [0.0, 1.0],
        "seed": config.seed + 1,  # cma treats seed 0 as "random"
        "verbose": -9,
    }
    if config.popsize:
        opts["popsize"] = config.popsize
    es = cma.CMAEvolutionStrategy(genome.x0, config.sigma, opts)
    evaluations = 1
    first = merge_genome(genome, genome.x0, config, models, base)
    (best_dev,) = score([first])
    start, best_x = best_dev, genome.x0
    score.generation(0, first, start)
    history = []
    for it in range(config.generations):
        xs = es.ask()
        devs = score([merge_genome(genome, x, config, models, base) for x in xs])
        evaluations += len(xs)
        es.tell(xs, [-d for d in devs])  # cma minimises
        k = int(np.argmax(devs))
        if devs[k] > best_dev:
            best_dev, best_x = devs[k], np.array(xs[k])
        history.append(
            {
                "generation": it + 1,
                "dev": best_dev,
                "generation_best": devs[k],
                "params": genome.describe(best_x),
            }
        )
        score.generation(it + 1, merge_genome(genome, best_x, config, models, base), best_dev)
    best = merge_genome(genome, best_x, config, models, base)
    return SearchResult(
        best, best_dev, start, evaluations, history, {"params": genome.describe(best_x)}
    )
