"""The README's main job: build the tiny zoo, merge its experts with several methods, and
measure every model on every task.

    python -m merganser.demo [OUT] [--seed N] [--reduced]

Hyperparameters (λ, density) are chosen on the dev split; the table reports the test split.
Writes OUT/results.{csv,json,png} and prints the table with the literature's predictions checked.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from merganser.analysis.report import report, with_evaluation, write_html
from merganser.api import MergeOptions, merge
from merganser.evaluation.evaluate import Score, evaluate, load_model, zoo_evaluator
from merganser.evaluation.report import bar_chart, format_table, write_csv, write_json
from merganser.evaluation.zoo import ZooSpec, build_zoo

LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.3, 1.6)
TIES_DENSITIES = (0.2, 0.3, 0.5)
DARE_DENSITIES = (0.3, 0.5)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _avg(scores: dict[str, Score]) -> float:
    return sum(s.accuracy for s in scores.values()) / len(scores)


def candidates(base: str, experts: list[str], reduced: bool) -> dict[str, list[tuple[str, dict]]]:
    """Each method family's grid of recipes (label, recipe); one per family is kept by dev."""
    models = [{"model": m} for m in experts]
    lambdas = (0.5, 1.0) if reduced else LAMBDAS
    ties_d = (0.3,) if reduced else TIES_DENSITIES
    dare_d = (0.5,) if reduced else DARE_DENSITIES
    return {
        "average": [("linear", {"merge_method": "linear", "models": models})],
        "task arithmetic": [
            (
                f"λ={lam}",
                {
                    "merge_method": "task_arithmetic",
                    "base_model": base,
                    "models": models,
                    "parameters": {"lambda": lam},
                },
            )
            for lam in lambdas
        ],
        "TIES": [
            (
                f"d={d},λ={lam}",
                {
                    "merge_method": "ties",
                    "base_model": base,
                    "models": models,
                    "parameters": {"density": d, "lambda": lam},
                },
            )
            for d in ties_d
            for lam in lambdas
        ],
        "DARE-TIES": [
            (
                f"d={d},λ={lam}",
                {
                    "merge_method": "dare_ties",
                    "base_model": base,
                    "models": models,
                    "random_seed": 0,
                    "parameters": {"density": d, "lambda": lam},
                },
            )
            for d in dare_d
            for lam in lambdas
        ],
    }


def run_demo(
    out: str | Path = "demo_out", seed: int = 0, reduced: bool = False, n: int | None = None
) -> dict[str, Any]:
    """Build, merge, evaluate; returns the results (also written under ``out``)."""
    _quiet_transformers()
    out = Path(out)
    t_start = time.perf_counter()
    spec = ZooSpec.reduced(seed) if reduced else ZooSpec(seed=seed)
    paths = build_zoo(out / "zoo" / f"seed{seed}", spec)
    tasks = list(spec.experts)
    n = n or (40 if reduced else 200)
    dev, test = zoo_evaluator(tasks, "dev", n), zoo_evaluator(tasks, "test", n)

    table: dict[str, dict[str, float]] = {}
    for name, path in paths.items():
        label = "base" if name == "base" else f"expert: {name}"
        table[label] = {t: s.accuracy for t, s in evaluate(load_model(path), [test]).items()}
        print(f"  evaluated {label}", file=sys.stderr, flush=True)

    chosen: dict[str, Any] = {}
    scratch = out / "candidates"
    for family, grid in candidates(
        str(paths["base"]), [str(paths[t]) for t in tasks], reduced
    ).items():
        best = None
        for label, recipe in grid:
            dest = scratch / f"{family}-{label}".replace(" ", "_")
            merge(recipe, dest, MergeOptions(force=True, progress=False))
            lm = load_model(dest)
            score = _avg(evaluate(lm, [dev]))
            if best is None or score > best[0]:
                best = (score, label, dest, lm)
        assert best is not None
        dev_score, label, dest, lm = best
        final = out / "merged" / family.replace(" ", "_")
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(dest, final)
        row = f"{family} ({label})"
        table[row] = {t: s.accuracy for t, s in evaluate(lm, [test]).items()}
        chosen[family] = {"setting": label, "dev_average": dev_score, "row": row}
        print(
            f"  {family}: best on dev {label} ({100 * dev_score:.1f}%)", file=sys.stderr, flush=True
        )
    shutil.rmtree(scratch, ignore_errors=True)
    # The experts side by side instead of averaged: a Mixtral whose shared (non-MLP) weights
    # are the base's, as mergekit-moe builds it, and one over the task-arithmetic merge.
    for shared, name in ((paths["base"], "moe"), (out / "merged" / "task_arithmetic", "moe_ta")):
        row, moe = _moe_row(out, Path(shared), paths, tasks, name)
        table[row] = {t: s.accuracy for t, s in evaluate(load_model(moe), [test]).items()}
        print(f"  {row}", file=sys.stderr, flush=True)

    columns = [*tasks, "average"]
    for row in table.values():
        row["average"] = sum(row[t] for t in tasks) / len(tasks)
    checks = _check_predictions(table, tasks, chosen)
    results = {
        "seed": seed,
        "reduced": reduced,
        "examples_per_task": n,
        "tasks": tasks,
        "test_accuracy": table,
        "chosen_on_dev": chosen,
        "predictions": [{"claim": c, "holds": ok, "detail": d} for c, ok, d in checks],
        "seconds": time.perf_counter() - t_start,
    }
    # The report page of the best weight merge (chosen on dev), with the test table.
    best = max(chosen, key=lambda f: chosen[f]["dev_average"])
    rows = ["base", *(f"expert: {t}" for t in tasks), chosen[best]["row"]]
    page = report(out / "merged" / best.replace(" ", "_"))
    page = with_evaluation(page, {r: table[r] for r in rows}, columns)
    write_html(page, out / f"report_seed{seed}.html", force=True)
    write_csv(table, columns, out / f"results_seed{seed}.csv")
    write_json(results, out / f"results_seed{seed}.json")
    bar_chart(
        table,
        columns,
        out / f"results_seed{seed}.png",
        f"merganser demo, seed {seed}: test exact-match accuracy",
    )
    print(f"\ntest exact-match accuracy (%), seed {seed}, {n} examples per task")
    print(format_table(table, columns))
    print()
    for claim, ok, detail in checks:
        print(f"  [{'holds' if ok else 'FAILS'}] {claim}: {detail}")
    print(
        f"\nwritten: {out}/results_seed{seed}.csv, .json, .png, {out}/report_seed{seed}.html "
        f"(the best merge); merged models under {out}/merged"
        f" ({results['seconds']:.0f} s)"
    )
    return results


def _moe_row(
    out: Path, shared: Path, paths: dict[str, Path], tasks: list[str], name: str
) -> tuple[str, Path]:
    """The experts' MLPs as a Mixtral (top-2 routing from each task's training prompts through
    ``shared``, mergekit-moe's ``hidden`` mode) over ``shared``'s other weights; the row label
    and the model's folder. The label says what it costs in parameters.
    """
    import yaml

    from merganser.evaluation.zoo.tasks import get_task
    from merganser.pipeline.moe import build_moe
    from merganser.storage.checkpoint import Checkpoint

    config = {
        "base_model": str(shared),
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "experts": [
            {
                "source_model": str(paths[t]),
                "positive_prompts": [p for p, _ in get_task(t).examples("train", 16)],
            }
            for t in tasks
        ],
    }
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    moe = build_moe(path, out / "merged" / name, force=True)
    with Checkpoint(moe) as m, Checkpoint(paths["base"]) as b:
        ratio = sum(i.numel for i in m.tensors.values()) / sum(i.numel for i in b.tensors.values())
    over = "the base" if shared == paths["base"] else "the task-arithmetic merge"
    return f"MoE of the {len(tasks)} experts over {over} (top-2, {ratio:.1f}x parameters)", moe


def _check_predictions(
    table: dict[str, dict[str, float]], tasks: list[str], chosen: dict[str, Any]
) -> list[tuple[str, bool, str]]:
    base = table["base"]["average"]
    merges = {f: table[c["row"]] for f, c in chosen.items()}
    checks = []
    worst = min(merges, key=lambda f: merges[f]["average"])
    checks.append(
        (
            "every merge beats the base on the average",
            all(m["average"] > base for m in merges.values()),
            f"base {100 * base:.1f}%, weakest merge {worst} {100 * merges[worst]['average']:.1f}%",
        )
    )
    losses = [
        f"{t} vs {f}" for t in tasks for f, m in merges.items() if m[t] >= table[f"expert: {t}"][t]
    ]
    checks.append(
        (
            "each expert beats every merge on its own task",
            not losses,
            "all hold" if not losses else "not for " + ", ".join(losses),
        )
    )
    ties, ta, avg = (merges[k]["average"] for k in ("TIES", "task arithmetic", "average"))
    checks.append(
        (
            "TIES >= task arithmetic >= averaging (test average)",
            ties >= ta >= avg,
            f"{100 * ties:.1f}% / {100 * ta:.1f}% / {100 * avg:.1f}%",
        )
    )
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m merganser.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("out", nargs="?", default="demo_out")
    ap.add_argument("--seed", type=int, action="append", help="repeatable (default: 0)")
    ap.add_argument("--reduced", action="store_true", help="small zoo, few examples (tests)")
    a = ap.parse_args(argv)
    for seed in a.seed or [0]:
        run_demo(a.out, seed, a.reduced)
    return 0


if __name__ == "__main__":
    sys.exit(main())
