"""Merge search on the tiny zoo: does searching beat the best fixed-coefficient merge?

1. Fixed coefficients: uniform average, and task arithmetic over a λ grid; the best by dev.
2. Evolver ("+ task arithmetic" at that λ) and CMA-ES (per-model weights, started at that λ)
   each start from that merge; their final dev score is compared with it, test reported beside.
3. Greedy soup (every kept ingredient must raise dev) and top-k greedy merging with and
   without kinship-guided exploration.

    python bench/search.py [--zoo DIR] [--seed 0] [--workers 2] [--n 100] [--out bench_out/search]

Selection uses the dev split only; test is reported. Writes OUT/search_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from merganser.api import merge_tensors
from merganser.evaluation.zoo import ZooSpec, build_zoo
from merganser.search.config import parse_search
from merganser.search.run import load_state, run_search
from merganser.search.workers import EvalSpec, LocalPool, fitness_fn, pack

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--zoo", type=Path, help="zoo folder (default: demo_out/zoo/seedN, built if absent)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n", type=int, default=100, help="examples per task and split")
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "search")
    a = ap.parse_args()
    zoo = a.zoo or REPO / "demo_out" / "zoo" / f"seed{a.seed}"
    paths = build_zoo(zoo, ZooSpec(seed=a.seed))
    tasks = [t for t in paths if t != "base"]
    experts = [str(paths[t]) for t in tasks]
    fit = fitness_fn("accuracy")

    # 1. fixed coefficients, scored with the same evaluator the searches use
    spec = EvalSpec(str(paths["base"]), tuple(tasks), a.n)
    pool = LocalPool(spec, a.workers)
    base, _ = load_state(paths["base"])
    models = [load_state(Path(p))[0] for p in experts]
    fixed: dict[str, Any] = {"average": merge_tensors("linear", models)}
    for lam in LAMBDAS:
        fixed[f"task arithmetic λ={lam}"] = merge_tensors(
            "task_arithmetic", models, base=base, **{"lambda": lam}
        )
    names = list(fixed)
    dev = [fit(s) for s in pool.map([pack(fixed[k]) for k in names], "dev")]
    test = [fit(s) for s in pool.map([pack(fixed[k]) for k in names], "test")]
    pool.close()
    rows = [
        {"name": k, "dev": d, "test": t, "evaluations": 1}
        for k, d, t in zip(names, dev, test, strict=True)
    ]
    best_ta = max((r for r in rows if r["name"].startswith("task")), key=lambda r: r["dev"])
    lam = float(best_ta["name"].split("=")[1])
    print(
        f"best fixed-coefficient merge by dev: {best_ta['name']} (dev {best_ta['dev']:.3f})",
        flush=True,
    )

    common = {
        "models": experts,
        "base_model": str(paths["base"]),
        "evaluator": {"tasks": tasks, "n": a.n},
        "seed": a.seed,
    }
    searches = {
        "Evolver + task arithmetic": {
            "strategy": "evolver",
            "evolver": {
                "generations": a.generations,
                "merger": {"method": "task_arithmetic", "parameters": {"lambda": lam}},
            },
        },
        "CMA-ES (task arithmetic weights)": {
            "strategy": "cmaes",
            "cmaes": {
                "method": "task_arithmetic",
                "start": {"weight": lam},
                "generations": a.generations,
            },
        },
        "greedy soup": {"strategy": "greedy_soup"},
        "top-k greedy (SLERP)": {
            "strategy": "kinship_greedy",
            "kinship_greedy": {"explore": False},
        },
        "top-k greedy + kinship exploration": {"strategy": "kinship_greedy"},
    }
    results = {}
    for label, extra in searches.items():
        print(f"\n== {label}", flush=True)
        cfg = parse_search({**common, **extra}, label)
        t0 = time.perf_counter()
        rep = run_search(
            cfg, a.out / extra["strategy"] / label.replace(" ", "_"), force=True, workers=a.workers
        )
        rep["wall_s"] = time.perf_counter() - t0
        results[label] = rep
        rows.append({"name": label, "dev": rep["best"]["dev"], "test": rep["best"]["test"],
                     "evaluations": rep["evaluations"], "start_dev": rep["start"]["dev"],
                     "start_test": rep["start"]["test"], "wall_s": rep["wall_s"]})  # fmt: skip

    print(f"\nzoo seed {a.seed}, {len(tasks)} tasks, {a.n} examples per task and split", end="")
    print(f", {a.workers} workers")
    print(f"{'merge':<36}{'start dev':>10}{'dev':>8}{'test':>8}{'evals':>7}{'wall s':>8}")
    for r in rows:
        start = f"{r['start_dev']:>10.3f}" if "start_dev" in r else " " * 10
        wall = f"{r['wall_s']:>8.1f}" if "wall_s" in r else ""
        print(f"{r['name']:<36}{start}{r['dev']:>8.3f}{r['test']:>8.3f}{r['evaluations']:>7}{wall}")
    evolver, cmaes = (results[k]["best"]["dev"] for k in list(searches)[:2])
    checks = {
        "Evolver beats the best fixed merge on dev": evolver > best_ta["dev"],
        "CMA-ES beats the best fixed merge on dev": cmaes > best_ta["dev"],
        "greedy soup never kept an ingredient that lowered dev": _soup_ok(results["greedy soup"]),
    }
    print()
    for k, v in checks.items():
        print(f"{'holds' if v else 'FAILS'}: {k}")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "search_bench.json").write_text(
        json.dumps({"rows": rows, "checks": checks, "best_fixed": best_ta}, indent=2) + "\n"
    )
    return 0 if all(checks.values()) else 1


def _soup_ok(rep: dict[str, Any]) -> bool:
    best = rep["history"][0]["dev"]
    for h in rep["history"][1:]:
        if h["kept"]:
            if h["dev"] <= best:
                return False
            best = h["dev"]
    return True


if __name__ == "__main__":
    sys.exit(main())
