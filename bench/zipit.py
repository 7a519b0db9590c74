"""ZipIt! and permutation alignment on models from different initialisations.

Two zoos trained from different seeds (so different initialisations of the base) give, for a
pair of tasks, expert A from zoo seed 0 and expert B from zoo seed 1. Features are matched on
the two tasks' train split; every merge is scored on the test split of both tasks:
averaging, Git Re-Basin (weight and activation matching) then averaging, ZipIt! of every
block into one model, and partial zips ZipIt!_{k/L} (a multi-head model, each task routed to
its model's head) for every k; each with and without the least-squares refit of the merged
linears on the same data (PLeaS, ``--refit``), which is what makes the zips work here.

    python bench/zipit.py [--pairs reverse,add sort,shift] [--n 200] [--examples 128]
                          [--spec hidden=256,intermediate=512] [--device cuda]

``--spec`` overrides fields of the zoo's ZooSpec (wider models zip better, at a training cost);
``--device`` only trains the zoos there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from merganser.evaluation.evaluate import evaluate, zoo_evaluator
from merganser.evaluation.zoo import ZooSpec, build_zoo
from merganser.evaluation.zoo.tasks import get_task
from merganser.zipping.zipper import ZipOptions, zip_models

REPO = Path(__file__).resolve().parents[1]
SLACK = 1.0  # points: 2 of 400 test answers, below the split's sampling noise


def _score(rows: dict[str, dict[str, float]], label: str, path: Path, tasks: list[str],
           test: Any) -> None:  # fmt: skip
    s = evaluate(path, [test])
    row = {t: 100 * s[t].accuracy for t in tasks}
    row["avg"] = sum(row.values()) / len(tasks)
    row["loss"] = sum(s[t].loss for t in tasks) / len(tasks)
    rows[label] = row
    print(f"  {label:<44}" + "".join(f"{row[k]:>9.1f}" for k in (*tasks, "avg")),
          f"{row['loss']:>8.2f}", flush=True)  # fmt: skip


def run_pair(zoos: list[dict[str, Path]], ta: str, tb: str, a: argparse.Namespace,
             layers: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Every merge of expert ta (zoo seed 0) and expert tb (zoo seed 1), scored on test."""
    models = [zoos[0][ta], zoos[1][tb]]
    texts = [p + ans for t in (ta, tb) for p, ans in get_task(t).examples("train", a.examples)]
    test = zoo_evaluator([ta, tb], "test", a.n)
    rows: dict[str, dict[str, float]] = {}
    print(f"\n{ta} expert (zoo seed 0) + {tb} expert (zoo seed 1), test split, {a.n} per task")
    print(f"  {'model':<44}{ta:>9}{tb:>9}{'avg':>9}{'loss':>8}")
    _score(rows, f"expert A ({ta})", models[0], [ta, tb], test)
    _score(rows, f"expert B ({tb})", models[1], [ta, tb], test)
    out = a.out / f"{ta}_{tb}"
    t0 = time.perf_counter()
    for matcher, label in (("identity", "averaging"),
                           ("weights", "Re-Basin weight matching + avg"),
                           ("permute", "Re-Basin activation matching + avg"),
                           ("zipit", f"ZipIt!_{layers}/{layers} (one model)")):  # fmt: skip
        for refit in (False, True):
            opts = ZipOptions(matcher=matcher, refit=refit, ridge=a.ridge)
            folder = out / f"{matcher}{'_refit' * refit}"
            zip_models(models, texts, folder, opts, force=True)
            _score(rows, label + " + refit" * refit, folder, [ta, tb], test)
    for refit in (False, True):
        for k in range(layers, -1, -1):
            opts = ZipOptions(matcher="zipit", layers=k, heads=(ta, tb), refit=refit, ridge=a.ridge)
            folder = out / f"zipit_{k}{'_refit' * refit}"
            zip_models(models, texts, folder, opts, force=True)
            label = f"ZipIt!_{k}/{layers} (multi-head)" + " + refit" * refit
            _score(rows, label, folder, [ta, tb], test)
    print(f"  ({time.perf_counter() - t0:.0f} s of zipping and scoring)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=REPO / "demo_out" / "zoo", help="seedN zoos here")
    ap.add_argument("--pairs", nargs="+", default=["reverse,add", "sort,shift"])
    ap.add_argument("--examples", type=int, default=128, help="feature examples per task")
    ap.add_argument("--n", type=int, default=200, help="test examples per task")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "zipit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ridge", type=float, default=1e-4, help="the least-squares refit's ridge")
    ap.add_argument("--spec", default="", help="ZooSpec overrides: field=int,...")
    ap.add_argument("--device", default="cpu", help="where the zoos are trained")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    over = {k: int(v) for k, v in (f.split("=") for f in a.spec.split(",") if f)}
    specs = [dataclasses.replace(ZooSpec(seed=s), **over) for s in (0, 1)]
    zoos = [build_zoo(a.zoo / f"seed{sp.seed}", sp, device=a.device) for sp in specs]
    a.out.mkdir(parents=True, exist_ok=True)
    layers = specs[0].layers
    report: dict[str, Any] = {}
    verdicts: list[tuple[str, bool]] = []
    for pair in a.pairs:
        ta, tb = pair.split(",")
        rows = report[pair] = run_pair(zoos, ta, tb, a, layers)
        avg = rows["averaging"]["avg"]
        full = rows[f"ZipIt!_{layers}/{layers} (one model)"]["avg"]
        refit = rows[f"ZipIt!_{layers}/{layers} (one model) + refit"]["avg"]
        curve = [
            rows[f"ZipIt!_{k}/{layers} (multi-head) + refit"]["avg"] for k in range(layers + 1)
        ]
        verdicts += [
            (f"{pair}: ZipIt!_{layers}/{layers} beats averaging by ≥ 10 points "
             f"({full:.1f} vs {avg:.1f})", full >= avg + 10),
            (f"{pair}: ZipIt!_{layers}/{layers} + refit beats averaging by ≥ 10 points "
             f"({refit:.1f} vs {avg:.1f})", refit >= avg + 10),
            (f"{pair}: with refit, accuracy never falls by more than {SLACK:g} point as k "
             f"decreases (k = 0..{layers}: " + ", ".join(f"{c:.1f}" for c in curve) + ")",
             all(curve[k] >= curve[k + 1] - SLACK for k in range(layers))),
            (f"{pair}: with refit, ZipIt!_0/{layers} recovers more than ZipIt!_{layers}/{layers} "
             f"({curve[0]:.1f} vs {curve[layers]:.1f})", curve[0] > curve[layers]),
        ]  # fmt: skip
    print()
    for text, ok in verdicts:
        print(f"{'holds' if ok else 'DOES NOT HOLD'}: {text}")
    (a.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {a.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
