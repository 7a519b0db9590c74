"""`merganser evolve SEARCH.yaml OUT`: run a merge search and write its best model and report.

Selection only ever sees the dev split. After each generation the best candidate so far is
also scored on test, for the report and the plot, never for a decision. Every evaluation
goes to OUT/evaluations.jsonl, which is what ``--resume`` replays (see journal.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import Score
from merganser.model.hf import TOKENIZER_FILES
from merganser.search.adamerging import AdaMergingConfig, adamerging, last_token_logits
from merganser.search.cmaes import CMAConfig, cma_search
from merganser.search.common import SearchResult, StateDict
from merganser.search.config import SearchConfig
from merganser.search.evolver import EvolverConfig, evolve
from merganser.search.journal import JOURNAL_NAME, Journal, candidate_key
from merganser.search.kinship_greedy import greedy_merge_search, slerp_merger
from merganser.search.soup import greedy_soup
from merganser.search.workers import EvalSpec, Pool, check_spec, fitness_fn, make_pool, pack
from merganser.storage.checkpoint import Checkpoint, check_same_tensors
from merganser.storage.writer import guard_output, publish

RESULTS_NAME = "search.json"
PLOT_NAME = "search.png"
# Everything a search writes into OUT; --force removes these and nothing else.
OUTPUTS = ("best", ".best.tmp", RESULTS_NAME, f".{RESULTS_NAME}.tmp", PLOT_NAME, JOURNAL_NAME)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    """All tensors of a model in float32 (searches hold their models in memory), and dtypes."""
    with Checkpoint(path) as c:
        dtypes = {k: c.tensors[k].dtype for k in c}
        return {
            k: c.read(k).float() if dtypes[k].is_floating_point else c.read(k) for k in c
        }, dtypes


@dataclass
class _Scorer:
    """The strategies' Scorer: journal lookups, parallel evaluation, progress and test probes."""

    pool: Pool
    journal: Journal
    metric: str
    generations: int
    verbose: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    evaluated: int = 0
    replayed: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def scores(self, candidates: Sequence[StateDict], split: str) -> list[dict[str, Score]]:
        packed = [pack(c) for c in candidates]
        keys = [candidate_key(p) for p in packed]
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            if self.journal.get(k, split) is None and k not in todo:
                todo[k] = i
        self.replayed += len(keys) - len(todo)
        if todo:
            results = self.pool.map([packed[i] for i in todo.values()], split)
            self.journal.record([(k, split, r) for k, r in zip(todo, results, strict=True)])
            self.evaluated += len(todo)
        return [self.journal.get(k, split) for k in keys]  # type: ignore[misc]

    def __call__(self, candidates: Sequence[StateDict]) -> list[float]:
        fit = fitness_fn(self.metric)
        return [fit(s) for s in self.scores(candidates, "dev")]

    def generation(self, gen: int, best: StateDict, best_dev: float) -> None:
        (test,) = self.scores([best], "test")
        minutes = (time.perf_counter() - self.t0) / 60
        row = {
            "generation": gen,
            "dev": best_dev,
            "test": fitness_fn(self.metric)(test),
            "test_tasks": {t: s.accuracy for t, s in test.items()},
            "evaluations": self.evaluated,
            "replayed": self.replayed,
        }
        self.rows.append(row)
        if self.verbose:
            rate = self.evaluated / minutes if minutes > 0 else 0.0
            print(
                f"generation {gen}/{self.generations}: best dev {best_dev:.4f} "
                f"(its test {row['test']:.4f}), {self.evaluated} evaluations ({rate:.0f}/min)"
                + (f", {self.replayed} from the journal" if self.replayed else ""),
                file=sys.stderr,
                flush=True,
            )


def _generations(cfg: SearchConfig) -> int | str:
    if cfg.strategy == "evolver":
        return cfg.evolver.generations
    if cfg.strategy == "cmaes":
        return cfg.cmaes.generations
    if cfg.strategy == "kinship_greedy":
        return cfg.kinship_greedy.generations
    if cfg.strategy == "adamerging":
        return cfg.adamerging.steps
    return len(cfg.models) - 1


def _strategy(
    cfg: SearchConfig, models: list[StateDict], base: StateDict | None, score: _Scorer
) -> SearchResult:
    if cfg.strategy == "evolver":
        e = cfg.evolver
        return evolve(
            models,
            score,
            EvolverConfig(
                **e.model_dump(exclude={"merger"}),
                merger=e.merger.method,
                merger_params=e.merger.parameters,
                merger_statistics=[load_state(cfg.resolve(s))[0] for s in e.merger.statistics]
                if e.merger.statistics
                else None,
                seed=cfg.seed,
            ),
            base,
        )
    if cfg.strategy == "cmaes":
        c = cfg.cmaes
        return cma_search(
            models,
            score,
            CMAConfig(
                **c.model_dump(exclude={"optimize", "parameters"}),
                optimize=tuple(c.optimize),
                fixed=c.parameters,
                seed=cfg.seed,
            ),
            base,
        )
    if cfg.strategy == "greedy_soup":
        soup = greedy_soup(models, lambda sd: score([sd])[0], score(models), score.generation)
        history = [{"model": i, "dev": s, "kept": k} for i, s, k in soup.history]
        return SearchResult(
            soup.soup,
            soup.score,
            soup.history[0][1],
            len(models) + len(soup.history) - 1,
            history,
            {"ingredients": [cfg.models[i] for i in soup.ingredients]},
        )
    if cfg.strategy == "adamerging":
        a = cfg.adamerging
        skeleton, prompts = _unlabelled_prompts(cfg, a.batch)
        return adamerging(
            skeleton,
            base,  # type: ignore[arg-type]
            models,
            [[{"input_ids": i, "attention_mask": m} for i, m in task] for task in prompts],
            score,
            AdaMergingConfig(**a.model_dump(), seed=cfg.seed),
            predictions=last_token_logits,
        )
    k = cfg.kinship_greedy
    return greedy_merge_search(
        models, slerp_merger(k.t), score, base, k.k, k.explore, k.generations, k.metric
    )


def _unlabelled_prompts(
    cfg: SearchConfig, batch: int
) -> tuple[torch.nn.Module, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """A model skeleton and, per task, the dev split's prompts (answers unused) in batches."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from merganser.evaluation.evaluate import LoadedModel, pad_batches, read_jsonl

    skeleton = cfg.resolve(cfg.base_model or cfg.models[0])
    model = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(skeleton), dtype=torch.float32
    )
    tok = AutoTokenizer.from_pretrained(skeleton)
    by_task: dict[str, list[str]] = {}
    if cfg.evaluator.tasks:
        from merganser.evaluation.zoo.tasks import get_task

        for t in cfg.evaluator.tasks:
            by_task[t] = [p for p, _ in get_task(t).examples("dev", cfg.evaluator.n)]
    if cfg.evaluator.dev:
        for _, obj in read_jsonl(cfg.resolve(cfg.evaluator.dev)):
            by_task.setdefault(str(obj.get("task", "dev")), []).append(str(obj.get("prompt", "")))
    if not by_task:  # lm-eval tasks alone bring no unlabelled prompts to minimise entropy on
        raise MerganserError(
            "adamerging: needs unlabelled prompts: evaluator tasks (zoo) or a dev JSONL file"
        )
    lm = LoadedModel(model, tok)
    pad = tok.pad_token_id or 0
    return model, [
        pad_batches([[*lm.bos, *lm.encode(t)] for t in texts], pad, batch)
        for texts in by_task.values()
    ]


def run_search(
    cfg: SearchConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    resume_repair: bool = False,
    force: bool = False,
    workers: int | None = None,
    ray: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the search described by ``cfg``; writes OUT/best, OUT/search.json, OUT/search.png."""
    out = Path(out)
    refs = [cfg.resolve(m) for m in cfg.models]
    base_ref = cfg.resolve(cfg.base_model) if cfg.base_model else None
    jsonl = tuple(
        (s, str(cfg.resolve(p)))
        for s, p in (("dev", cfg.evaluator.dev), ("test", cfg.evaluator.test))
        if p
    )
    stats = [cfg.resolve(p) for p in cfg.evolver.merger.statistics or []]
    # OUT may hold a search to resume or replace (the checks below), but never any input.
    inputs = [*refs, *([base_ref] if base_ref else []), *(Path(p) for _, p in jsonl), *stats]
    guard_output(out, inputs, force=True)
    journal_path = out / JOURNAL_NAME
    if out.exists() and not journal_path.exists() and any(out.iterdir()) and not force:
        raise MerganserError(f"{out}: exists and is not a search folder (use --force)")
    if journal_path.exists() and not resume and not force:
        raise MerganserError(
            f"{out}: holds a search already (use --resume to go on, --force to restart)"
        )
    if resume and not journal_path.exists():
        raise MerganserError(f"{out}: nothing to resume (no evaluations.jsonl)")
    for p in (*refs, *([base_ref] if base_ref else [])):
        if not p.exists():
            raise MerganserError(f"{p}: model not found")
    skeleton = base_ref or refs[0]
    if not (skeleton / "config.json").is_file():
        raise MerganserError(f"{skeleton}: the search needs a model folder with config.json")
    for _, p in jsonl:
        if not Path(p).is_file():
            raise MerganserError(f"{p}: evaluation file not found")

    loaded = [load_state(p) for p in refs]
    models = [sd for sd, _ in loaded]
    dtypes = loaded[0][1]
    for p, sd in zip(refs[1:], models[1:], strict=True):
        check_same_tensors(refs[0], models[0], p, sd)
    base = None
    if base_ref is not None:
        base, _ = load_state(base_ref)
        check_same_tensors(refs[0], models[0], base_ref, base)

    lm = cfg.evaluator.lm_eval
    lm_eval = () if lm is None else tuple(
        (split, tuple(tasks), lm.limit, lm.num_fewshot,
         None if lm.include_path is None else str(cfg.resolve(lm.include_path)))
        for split, tasks in (("dev", lm.dev), ("test", lm.test))
    )  # fmt: skip
    spec = EvalSpec(
        str(skeleton), tuple(cfg.evaluator.tasks), cfg.evaluator.n, jsonl, lm_eval=lm_eval
    )
    check_spec(spec)
    if force:
        for name in OUTPUTS:
            p = out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    n_workers = workers or cfg.workers or os.cpu_count() or 1
    journal = Journal(out, cfg.digest(), resume, repair=resume_repair)
    pool = make_pool(spec, n_workers, ray)
    try:
        scorer = _Scorer(pool, journal, cfg.metric, _generations(cfg), verbose)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        result = _strategy(cfg, models, base, scorer)
        (test,) = scorer.scores([result.best], "test")
        start_test = scorer.rows[0]["test"] if scorer.rows else None
        report = {
            "strategy": cfg.strategy,
            "metric": cfg.metric,
            "seed": cfg.seed,
            "workers": pool.workers,
            "backend": pool.backend,
            "nodes": pool.nodes,
            "start": {"dev": result.start_dev, "test": start_test},
            "best": {
                "dev": result.dev,
                "test": fitness_fn(cfg.metric)(test),
                "test_tasks": {t: s.accuracy for t, s in test.items()},
            },
            "evaluations": scorer.evaluated,
            "replayed": scorer.replayed,
            "seconds": round(time.perf_counter() - t0, 2),
            "generations": scorer.rows,
            "history": result.history,
            "details": result.details,
        }
        _save_model(result.best, dtypes, skeleton, out / "best")
        tmp = out / f".{RESULTS_NAME}.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        publish(tmp, out / RESULTS_NAME)
        plot_search(scorer.rows, cfg.strategy, out / PLOT_NAME)
        return report
    finally:
        pool.close()
        journal.close()


def _save_model(
    sd: StateDict, dtypes: dict[str, torch.dtype], skeleton: Path, folder: Path
) -> None:
    """The best candidate as a model folder (the skeleton's config and tokenizer), atomically."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(
        {k: v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in sd.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    for name in ("config.json", *TOKENIZER_FILES):
        if (skeleton / name).is_file():
            shutil.copy2(skeleton / name, tmp / name)
    publish(tmp, folder)


def plot_search(rows: list[dict[str, Any]], strategy: str, path: Path) -> None:
    """Dev and test score of the best candidate (chosen by dev) after each generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    gens = [r["generation"] for r in rows]
    ax.plot(gens, [r["dev"] for r in rows], "o-", label="dev (selects)")
    ax.plot(gens, [r["test"] for r in rows], "s--", label="test (reported)")
    ax.set_xlabel("generation")
    ax.set_ylabel("score")
    ax.set_title(f"merganser evolve: {strategy}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
