"""Where candidate merges are scored: in this process, on a local process pool, or on Ray.

A worker builds its evaluator once (model skeleton, tokenizer, dev and test sets) and then
scores candidate state dicts sent to it. Candidates travel as NumPy arrays: they pickle
without torch's shared-memory reductions and Ray maps them zero-copy from its object store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import (
    Evaluator,
    LoadedModel,
    Score,
    jsonl_evaluator,
    zoo_evaluator,
)
from merganser.model import hf

StateDict = Mapping[str, torch.Tensor]
Packed = dict[str, np.ndarray]
SPLITS = ("dev", "test")


@dataclass(frozen=True)
class EvalSpec:
    """Everything a worker needs to build its evaluator; small and picklable."""

    skeleton: str  # a model folder (config.json + tokenizer) whose architecture candidates fit
    tasks: tuple[str, ...] = ()  # zoo tasks
    n: int = 100  # zoo examples per task and split
    jsonl: tuple[tuple[str, str], ...] = ()  # (split, path) pairs for users' data
    threads: int = 1
    # lm-evaluation-harness: (split, tasks, limit, num_fewshot, include_path) per split
    lm_eval: tuple[tuple[str, tuple[str, ...], int | None, int | None, str | None], ...] = ()

    def evaluators(self) -> dict[str, Evaluator]:
        evs: dict[str, list[Evaluator]] = {s: [] for s in SPLITS}
        if self.tasks:
            for s in SPLITS:
                evs[s].append(zoo_evaluator(self.tasks, s, self.n))
        for split, path in self.jsonl:
            evs[split].append(jsonl_evaluator(path))
        for split, tasks, limit, fewshot, include in self.lm_eval:
            from merganser.evaluation.lm_eval import lm_eval_evaluator

            evs[split].append(lm_eval_evaluator(tasks, limit, fewshot, include))
        if not all(evs.values()):
            raise MerganserError(
                "evaluator: needs zoo tasks, a JSONL file or lm_eval tasks for both dev and test"
            )

        def run(evaluators: list[Evaluator]) -> Evaluator:
            return lambda lm: {t: s for ev in evaluators for t, s in ev(lm).items()}

        return {s: run(e) for s, e in evs.items()}


def check_spec(spec: EvalSpec) -> None:
    """Load what every worker will load (config, tokenizer, evaluators) once, here: a problem
    is then one line before any worker starts, not a worker's traceback and a broken pool.
    """
    from transformers import AutoConfig, AutoTokenizer

    hf.require_tokenizer(spec.skeleton, "the search's evaluator")
    hf.load(spec.skeleton, "the config", lambda: AutoConfig.from_pretrained(spec.skeleton))
    hf.load(spec.skeleton, "the tokenizer", lambda: AutoTokenizer.from_pretrained(spec.skeleton))
    spec.evaluators()


class Judge:
    """A model skeleton plus evaluators: loads a candidate's weights and scores them."""

    def __init__(self, spec: EvalSpec):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.set_verbosity_error()
        torch.set_num_threads(spec.threads)
        config = AutoConfig.from_pretrained(spec.skeleton)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        self.lm = LoadedModel(model, AutoTokenizer.from_pretrained(spec.skeleton), "candidate")
        self.evaluators = spec.evaluators()

    def __call__(self, candidate: Packed, split: str) -> dict[str, Score]:
        weights = {k: torch.from_numpy(v) for k, v in candidate.items()}
        missing, unexpected = self.lm.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("rotary_emb.inv_freq")]:
            raise MerganserError(
                f"candidate does not fit the model skeleton: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        return self.evaluators[split](self.lm)


def pack(sd: StateDict) -> Packed:
    """A candidate as NumPy arrays: floating tensors in float32, others as they are."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().numpy()
        for k, v in sd.items()
    }


class Pool(Protocol):
    workers: int
    backend: str  # "in-process", "processes" or "ray"
    nodes: int  # machines the workers run on

    def map(self, candidates: Sequence[Packed], split: str) -> list[dict[str, Score]]: ...

    def close(self) -> None: ...


class LocalPool:
    """In this process (one worker) or on a pool of spawned processes."""

    def __init__(self, spec: EvalSpec, workers: int = 1):
        self.workers = max(1, workers)
        self.backend = "in-process" if self.workers == 1 else "processes"
        self.nodes = 1
        self._judge: Judge | None = None
        self._ex: ProcessPoolExecutor | None = None
        if self.workers == 1:
            self._judge = Judge(spec)
        else:
            import multiprocessing

            self._ex = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(spec,),
            )

    def map(self, candidates: Sequence[Packed], split: str) -> list[dict[str, Score]]:
        if self._judge is not None:
            return [self._judge(c, split) for c in candidates]
        assert self._ex is not None
        futures = [self._ex.submit(_score, c, split) for c in candidates]
        return [f.result() for f in futures]

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(cancel_futures=True)


_WORKER_JUDGE: Judge | None = None


def _init_worker(spec: EvalSpec) -> None:
    global _WORKER_JUDGE
    _WORKER_JUDGE = Judge(spec)


def _score(candidate: Packed, split: str) -> dict[str, Score]:
    assert _WORKER_JUDGE is not None
    return _WORKER_JUDGE(candidate, split)


class RayPool:
    """One Ray actor per worker, each holding its own Judge; candidates go via the object store.

    ``address`` is a cluster address (``ray start --head`` prints it) or ``"local"`` to start
    a private single-machine cluster.
    """

    def __init__(self, spec: EvalSpec, address: str, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise MerganserError("--ray needs Ray: pip install 'merganser[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if address == "local":
                kwargs["num_cpus"] = workers or os.cpu_count() or 1
            else:
                kwargs["address"] = address
            try:
                ray.init(**kwargs)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise MerganserError(f"--ray {address}: cannot connect ({e})") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = max(1, min(workers or cpus, cpus))
        actor = ray.remote(num_cpus=1)(_RayJudge)
        self._actors = [actor.remote(spec) for _ in range(self.workers)]
        self.backend = "ray"
        # Also waits until every actor has built its evaluator, so failures surface here.
        self.nodes = len(set(ray.get([a.node.remote() for a in self._actors])))

    def map(self, candidates: Sequence[Packed], split: str) -> list[dict[str, Score]]:
        ray = self._ray
        refs = [ray.put(c) for c in candidates]
        pending = {}
        results: list[dict[str, Score] | None] = [None] * len(candidates)
        queue = list(range(len(candidates)))
        free = list(self._actors)
        while queue or pending:
            while queue and free:
                i, a = queue.pop(0), free.pop(0)
                pending[a.score.remote(refs[i], split)] = (i, a)
            done, _ = ray.wait(list(pending), num_returns=1)
            i, a = pending.pop(done[0])
            results[i] = ray.get(done[0])
            free.append(a)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for a in self._actors:
            self._ray.kill(a)
        self._ray.shutdown()


class _RayJudge:
    def __init__(self, spec: EvalSpec):
        self.judge = Judge(spec)

    def score(self, candidate: Packed, split: str) -> dict[str, Score]:
        return self.judge(candidate, split)

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def make_pool(spec: EvalSpec, workers: int, ray_address: str | None) -> Pool:
    return RayPool(spec, ray_address, workers) if ray_address else LocalPool(spec, workers)


Fitness = Callable[[dict[str, Score]], float]


def fitness_fn(metric: str) -> Fitness:
    """Mean accuracy over tasks, or the negated mean answer loss (higher is better either way)."""
    if metric == "accuracy":
        return lambda s: sum(v.accuracy for v in s.values()) / len(s)
    if metric == "loss":
        return lambda s: -sum(v.loss for v in s.values()) / len(s)
    raise MerganserError(f"metric: expected accuracy or loss, got {metric!r}")
