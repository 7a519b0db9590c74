"""lm-evaluation-harness as an evaluator (the optional extra ``merganser[lm-eval]``).

The harness runs on the loaded model itself (no second copy, no download): its tasks come from
its own registry or from local task YAML files (``include_path``), whose data may be local
files. Each task's headline metric becomes the task's accuracy; the harness's other numbers are
not merganser's to reinterpret, so ``loss`` is NaN.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import Evaluator, LoadedModel, Score

# Which of a task's metrics is its headline, in this order (lm-eval writes "metric,filter").
HEADLINE = ("exact_match", "acc", "acc_norm", "f1", "mc2", "bleu", "rouge1")


def require() -> Any:
    """The lm_eval package, or one line saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise MerganserError(
            "lm-evaluation-harness is not installed: pip install 'merganser[lm-eval]'"
        ) from None
    return lm_eval


def headline(metrics: dict[str, Any]) -> tuple[str, float]:
    """The task's headline metric and its value (the first of HEADLINE it reports)."""
    for name in HEADLINE:
        for key, value in metrics.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)):
                return key, float(value)
    raise MerganserError(f"lm-eval reported no metric merganser knows ({', '.join(metrics)})")


def lm_eval_evaluator(
    tasks: Sequence[str],
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
) -> Evaluator:
    """An evaluator running lm-evaluation-harness ``tasks`` (its registry, or local task YAML
    under ``include_path``) on a loaded causal LM (Gao et al., lm-evaluation-harness).
    """
    lm_eval = require()
    from lm_eval.tasks import TaskManager

    include = None if include_path is None else str(include_path)
    if include is not None and not os.path.isdir(include):
        raise MerganserError(f"{include}: no such folder of lm-eval task definitions")
    manager = TaskManager(include_path=include)
    known = set(manager.all_tasks)
    if unknown := [t for t in tasks if t not in known]:
        raise MerganserError(
            f"lm-eval: unknown task {unknown[0]!r} (local task files go in --lm-eval-include)"
        )

    def run(lm: LoadedModel) -> dict[str, Score]:
        from lm_eval.models.huggingface import HFLM

        if lm.routes is not None:  # lm-eval's tasks are not the heads' tasks: no routing
            raise MerganserError(
                f"{lm.name}: a multi-head model; lm-eval evaluates one causal LM (use the zoo "
                "tasks or JSONL, which route each task to its head)"
            )

        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
        res = lm_eval.simple_evaluate(
            model=model,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            verbosity="ERROR",
        )
        out = {}
        for task in tasks:
            _, value = headline(res["results"][task])
            n = res.get("n-samples", {}).get(task, {}).get("effective", 0)
            out[task] = Score(value, math.nan, int(n))
        return out

    return run
