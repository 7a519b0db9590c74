"""Data-aware merging on the tiny zoo: RegMean and Fisher vs plain averaging, and AdaMerging
vs task arithmetic at its initial λ.

Each expert is calibrated on its own task's train split (`merganser calibrate`: input Grams
and diagonal Fisher); the merges run through the streaming engine from recipes; a setting
(RegMean α, Fisher normalisation) is chosen on dev and the test split is reported.

    python bench/data_aware.py [--zoo DIR] [--seed 0] [--examples 256] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from merganser.api import MergeOptions, merge
from merganser.evaluation.calibrate import CalibrationOptions, calibrate
from merganser.evaluation.evaluate import evaluate, load_model, zoo_evaluator
from merganser.evaluation.zoo import ZooSpec, build_zoo
from merganser.evaluation.zoo.tasks import get_task
from merganser.search.config import parse_search
from merganser.search.run import run_search

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, help="zoo folder (default: demo_out/zoo/seedN)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=256, help="calibration examples per model")
    ap.add_argument("--n", type=int, default=200, help="evaluation examples per task and split")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "data_aware")
    ap.add_argument("--ada-steps", type=int, default=300)
    ap.add_argument("--ada-lr", type=float, default=0.01)
    a = ap.parse_args()
    paths = build_zoo(a.zoo or REPO / "demo_out" / "zoo" / f"seed{a.seed}", ZooSpec(seed=a.seed))
    tasks = [t for t in paths if t != "base"]
    a.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    stats = {}
    for t in tasks:
        texts = [p + ans for p, ans in get_task(t).examples("train", a.examples, a.seed)]
        stats[t] = a.out / f"stats_{t}.safetensors"
        calibrate(paths[t], texts, stats[t], CalibrationOptions(examples=a.examples, fisher=True))
    calib_s = time.perf_counter() - t0
    print(f"calibrated {len(tasks)} experts on {a.examples} examples each in {calib_s:.0f} s")

    def recipe(method: str, params: dict[str, Any], with_stats: bool) -> dict[str, Any]:
        models = [
            {"model": str(paths[t]), **({"statistics": str(stats[t])} if with_stats else {})}
            for t in tasks
        ]
        r: dict[str, Any] = {"merge_method": method, "models": models, "parameters": params}
        if method == "task_arithmetic":
            r["base_model"] = str(paths["base"])
        return r

    families = {
        "average": [("", recipe("linear", {}, False))],
        "task arithmetic": [
            (f"λ={x}", recipe("task_arithmetic", {"lambda": x}, False)) for x in (0.5, 0.7, 1.0)
        ],
        "RegMean": [
            (f"α={x}", recipe("regmean", {"alpha": x}, True)) for x in (1.0, 0.9, 0.5, 0.1)
        ],
        "Fisher": [
            (f"normalize={x}", recipe("fisher", {"normalize": x}, True)) for x in (False, True)
        ],
    }
    dev = zoo_evaluator(tasks, "dev", a.n)
    test = zoo_evaluator(tasks, "test", a.n)
    rows = {}
    for family, grid in families.items():
        best = None
        for label, r in grid:
            out = a.out / "merged" / f"{family}_{label}".replace(" ", "_")
            merge(r, out, MergeOptions(force=True, progress=False))
            lm = load_model(out)
            d = evaluate(lm, [dev])
            score = sum(s.accuracy for s in d.values()) / len(d)
            if best is None or score > best[0]:
                best = (score, label, lm)
        assert best is not None
        t_scores = evaluate(best[2], [test])
        rows[family] = {
            "setting": best[1],
            "dev": best[0],
            **{t: s.accuracy for t, s in t_scores.items()},
            "test": sum(s.accuracy for s in t_scores.values()) / len(t_scores),
        }
    print(f"\nzoo seed {a.seed}, test split ({a.n} per task); settings chosen on dev")
    print(f"{'merge':<18}{'setting':<18}" + "".join(f"{t:>9}" for t in tasks) + f"{'avg':>9}")
    for fam, r in rows.items():
        cells = "".join(f"{100 * r[t]:>9.1f}" for t in tasks)
        print(f"{fam:<18}{r['setting']:<18}{cells}{100 * r['test']:>9.1f}")
    # AdaMerging: entropy minimisation on the dev split's prompts (answers unused), from λ=0.3.
    ta03 = a.out / "merged" / "ta_0.3"
    merge(
        recipe("task_arithmetic", {"lambda": 0.3}, False),
        ta03,
        MergeOptions(force=True, progress=False),
    )
    t_scores = evaluate(load_model(ta03), [test])
    ta_test = sum(s.accuracy for s in t_scores.values()) / len(t_scores)
    ada = {}
    for label, ties in (("AdaMerging", False), ("AdaMerging++", True)):
        cfg = parse_search(
            {
                "strategy": "adamerging",
                "models": [str(paths[t]) for t in tasks],
                "base_model": str(paths["base"]),
                "evaluator": {"tasks": tasks, "n": a.n},
                "seed": a.seed,
                "workers": 1,
                "adamerging": {"steps": a.ada_steps, "lr": a.ada_lr, "ties": ties},
            },
            label,
        )
        rep = run_search(cfg, a.out / label, force=True, verbose=False)
        ada[label] = rep["best"]["test"]
        rows[label] = {"setting": f"layer-wise, lr {a.ada_lr}", "dev": rep["best"]["dev"],
                       **rep["best"]["test_tasks"], "test": rep["best"]["test"]}  # fmt: skip
    print(f"\nAdaMerging ({a.ada_steps} steps from λ=0.3), test split")
    print(f"{'task arithmetic λ=0.3':<24}{100 * ta_test:>8.1f}")
    for label, v in ada.items():
        print(f"{label:<24}{100 * v:>8.1f}")
    checks = {
        "RegMean beats plain averaging on the task average": rows["RegMean"]["test"]
        > rows["average"]["test"],
        "AdaMerging beats task arithmetic at its initial λ": ada["AdaMerging"] > ta_test,
    }
    print()
    for k, v in checks.items():
        print(f"{'holds' if v else 'FAILS'}: {k}")
    ok = all(checks.values())
    (a.out / "data_aware.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
