"""SEARCH.yaml: which models, which evaluator, which strategy and its settings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from merganser.errors import RecipeError
from merganser.evaluation.zoo.tasks import ALL_TASKS
from merganser.pipeline.recipe import format_error, read_yaml

STRATEGIES = ("evolver", "cmaes", "greedy_soup", "kinship_greedy", "adamerging")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LmEvalSection(_Strict):
    """lm-evaluation-harness tasks: ``dev`` ones select, ``test`` ones report."""

    dev: list[str]
    test: list[str]
    limit: int | None = Field(None, ge=1)
    num_fewshot: int | None = Field(None, ge=0)
    include_path: str | None = None  # a folder of local task YAML files


class EvaluatorSection(_Strict):
    tasks: list[str] = Field(default_factory=list)  # zoo tasks
    n: int = Field(100, ge=1, le=100_000)  # examples per task and split
    dev: str | None = None  # JSONL files of {"prompt", "answer"[, "task"]}
    test: str | None = None
    lm_eval: LmEvalSection | None = None


class MergerSection(_Strict):
    method: str = "linear"
    parameters: dict[str, Any] = Field(default_factory=dict)
    statistics: list[str] | None = None  # per model, `merganser calibrate` files (regmean, fisher)


class EvolverSection(_Strict):
    mode: Literal["standalone", "merger"] = "merger"
    mutation: Literal["code", "rand1"] = "code"
    f: float = Field(0.5, gt=0, le=2)
    cr: float = Field(0.5, gt=0, le=1)
    generations: int = Field(15, ge=1, le=10_000)
    schedule: Literal["batch", "sequential"] = "batch"
    merger: MergerSection = Field(default_factory=MergerSection)


class CMASection(_Strict):
    method: str = "task_arithmetic"
    optimize: list[str] = Field(default_factory=lambda: ["weight"], min_length=1)
    start: dict[str, float | list[float]] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)  # held fixed
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    layer_groups: int = Field(1, ge=1)
    generations: int = Field(10, ge=1, le=10_000)
    popsize: int | None = Field(None, ge=2)
    sigma: float = Field(0.15, gt=0, le=1)


class SoupSection(_Strict):
    pass


class KinshipSection(_Strict):
    k: int = Field(3, ge=2)
    generations: int = Field(5, ge=1, le=1000)
    explore: bool = True
    metric: Literal["pearson", "cosine", "abs_cosine"] = "pearson"
    t: Any = None  # SLERP t in recipe syntax; default: the Model Kinship paper's schedule


class AdaMergingSection(_Strict):
    granularity: Literal["layer", "task"] = "layer"
    init: float = Field(0.3, ge=0, le=1)
    lr: float = Field(1e-3, gt=0)
    steps: int = Field(500, ge=1, le=1_000_000)
    batch: int = Field(16, ge=1)
    clamp: bool = True
    ties: bool = False  # AdaMerging++
    density: float = Field(0.2, gt=0, le=1)
    report_every: int = Field(50, ge=1)


class SearchConfig(_Strict):
    strategy: Literal["evolver", "cmaes", "greedy_soup", "kinship_greedy", "adamerging"]
    models: list[str] = Field(min_length=2)
    base_model: str | None = None
    evaluator: EvaluatorSection
    metric: Literal["accuracy", "loss"] = "accuracy"
    seed: int = Field(0, ge=0)
    workers: int | None = Field(None, ge=1)
    evolver: EvolverSection = Field(default_factory=EvolverSection)
    cmaes: CMASection = Field(default_factory=CMASection)
    greedy_soup: SoupSection = Field(default_factory=SoupSection)
    kinship_greedy: KinshipSection = Field(default_factory=KinshipSection)
    adamerging: AdaMergingSection = Field(default_factory=AdaMergingSection)

    source_dir: Path | None = None
    source_text: str = ""

    def resolve(self, ref: str) -> Path:
        p = Path(os.path.expanduser(ref))
        if not p.is_absolute() and self.source_dir is not None:
            alt = self.source_dir / p
            if alt.exists() or not p.exists():
                return alt
        return p

    def digest(self) -> str:
        """Identifies the search for resuming (workers do not change results, so not included)."""
        data = self.model_dump(exclude={"source_dir", "source_text", "workers"})
        return hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()


def parse_search(data: Any, name: str = "<search>", source_dir: Path | None = None) -> SearchConfig:
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: expected a YAML mapping at the top level")
    for key in ("source_dir", "source_text"):
        if key in data:
            raise RecipeError(f"{name}: {key}: unknown key")
    try:
        cfg = SearchConfig.model_validate({**data, "source_dir": source_dir})
    except ValidationError as e:
        raise RecipeError(f"{name}: {format_error(e.errors()[0])}") from None
    ev = cfg.evaluator
    if not ev.tasks and not (ev.dev and ev.test) and ev.lm_eval is None:
        raise RecipeError(
            f"{name}: evaluator: give zoo tasks, both dev and test JSONL files, or lm_eval"
        )
    for i, t in enumerate(ev.tasks):
        if t not in ALL_TASKS:
            raise RecipeError(
                f"{name}: evaluator.tasks[{i}]: unknown task {t!r} (known: {', '.join(ALL_TASKS)})"
            )
    stats = cfg.evolver.merger.statistics
    if stats is not None and len(stats) != len(cfg.models):
        raise RecipeError(
            f"{name}: evolver.merger.statistics: needs one file per model ({len(cfg.models)})"
        )
    if cfg.strategy == "adamerging" and not cfg.base_model:
        raise RecipeError(f"{name}: adamerging: needs base_model (task vectors)")
    if cfg.strategy == "kinship_greedy" and cfg.kinship_greedy.explore and not cfg.base_model:
        raise RecipeError(f"{name}: kinship_greedy.explore: needs base_model to measure kinship")
    return cfg


def load_search(path: str | os.PathLike[str]) -> SearchConfig:
    """Read and validate a SEARCH.yaml file; relative paths are relative to its folder."""
    p = Path(path)
    text, data = read_yaml(p, "search file")
    cfg = parse_search(data, str(p), p.parent.resolve())
    return cfg.model_copy(update={"source_text": text})
