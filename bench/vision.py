"""Vision benchmark: FusionBench's CLIP ViT-B/32 eight-task table, on the vision zoo.

The zoo (``merganser.evaluation.zoo.vision``): a tiny ViT pretrained on generated images, one
frozen linear head per task and one fine-tuned backbone per task. Every merge is a backbone,
scored on each task through that task's head. Settings are chosen on the dev split, the test
split is reported, and normalised accuracy is the merge's accuracy on each task over that
task's expert's, averaged. Data-aware methods read 256 unlabelled training images per task
(FusionBench's count); AdaMerging minimises entropy on the unlabelled dev images and keeps
the checkpoint (every 50 steps, the start included) with the best dev accuracy.

    python bench/vision.py [--root DIR] [--seed 0] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from merganser.api import (
    AdaMergingConfig,
    CalibrationOptions,
    adamerging,
    calibrate_module,
    merge_tensors,
    regmean_plusplus,
)
from merganser.evaluation.zoo.vision import (
    VISION_TASKS,
    TaskModel,
    VisionZooSpec,
    accuracy,
    build_vision_zoo,
    load_backbone,
    load_head,
    task_data,
)

REPO = Path(__file__).resolve().parents[1]

# FusionBench's published CLIP ViT-B/32 eight-task averages (docs/modelpool/clip_vit.md, and the
# WUDI README for consensus); None where neither publishes one.
FUSIONBENCH_B32: dict[str, float | None] = {
    "pretrained": 48.2,
    "fine-tuned (each expert)": 90.3,
    "averaging": 66.5,
    "task arithmetic": 68.0,
    "TIES": 72.2,
    "DARE (task arithmetic)": None,
    "Fisher": 70.6,
    "RegMean": 82.4,
    "RegMean++": 84.4,
    "AdaMerging (task-wise)": None,
    "AdaMerging (layer-wise)": 82.6,
    "TSV-M": None,
    "Iso-C": 82.8,
    "Iso-CTS": 82.7,
    "WUDI": 84.5,
    "consensus (TA)": 73.6,
}
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
ALPHAS = (0.5, 1.0, 1.5, 2.0)


class Bench:
    def __init__(self, zoo: Path, tasks: tuple[str, ...], n_dev: int, n_test: int) -> None:
        self.tasks = tasks
        self.base = load_backbone(zoo / "base")
        self.experts = [load_backbone(zoo / "experts" / t) for t in tasks]
        self.heads = [load_head(zoo / "heads" / f"{t}.safetensors") for t in tasks]
        self.skeleton = load_backbone(zoo / "base")
        self.data = {
            split: [task_data(t, split, n, seed=zoo_seed(zoo)) for t in tasks]
            for split, n in (("dev", n_dev), ("test", n_test))
        }
        self.calib = [task_data(t, "calib", 256, seed=zoo_seed(zoo))[0] for t in tasks]
        self.base_sd = state(self.base)
        self.expert_sds = [state(m) for m in self.experts]

    def score(self, sd: dict[str, torch.Tensor], split: str) -> list[float]:
        self.skeleton.load_state_dict(sd)
        return [
            accuracy(TaskModel(self.skeleton, h), x, y)
            for h, (x, y) in zip(self.heads, self.data[split], strict=True)
        ]

    def pick(self, name: str, grid: list[tuple[str, Any]]) -> dict[str, Any]:
        """Each setting's merge (a thunk) scored on dev; the best one's test scores."""
        best: tuple[float, str, dict[str, torch.Tensor]] | None = None
        for label, make in grid:
            sd = make()
            dev = mean(self.score(sd, "dev"))
            if best is None or dev > best[0]:
                best = (dev, label, sd)
        assert best is not None
        test = self.score(best[2], "test")
        return {"method": name, "setting": best[1], "dev": best[0], "test": test}


def state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def zoo_seed(zoo: Path) -> int:
    return int(json.loads((zoo / "zoo.json").read_text())["spec"]["seed"])


def run(b: Bench, quick: bool, log: Any) -> list[dict[str, Any]]:
    ex, base = b.expert_sds, b.base_sd
    rows: list[dict[str, Any]] = []

    def add(r: dict[str, Any]) -> None:
        rows.append(r)
        log(f"{r['method']:<26} {r['setting']:<22} test avg {mean(r['test']):5.1f}")

    lams = (0.3,) if quick else LAMBDAS
    alphas = (1.0, 1.5) if quick else ALPHAS
    add({"method": "pretrained", "setting": "—", "test": b.score(base, "test")})
    fine = [b.score(sd, "test")[i] for i, sd in enumerate(ex)]
    add({"method": "fine-tuned (each expert)", "setting": "—", "test": fine})
    add(b.pick("averaging", [("—", lambda: merge_tensors("linear", ex))]))

    def grid(method: str, key: str, values: tuple, **kw: Any) -> list[tuple[str, Any]]:
        return [
            (f"{key}={v}", lambda v=v: merge_tensors(method, ex, base, **{key: v}, **kw))
            for v in values
        ]

    add(b.pick("task arithmetic", grid("task_arithmetic", "lambda", lams)))
    add(b.pick("TIES", grid("ties", "lambda", lams, density=0.2, scope="global")))
    add(b.pick("DARE (task arithmetic)",
               grid("dare_linear", "lambda", lams, density=0.5, rescale="inverse")))  # fmt: skip
    add(b.pick("TSV-M", grid("tsv_m", "alpha", alphas)))
    add(b.pick("Iso-C", grid("iso_c", "alpha", alphas)))
    add(b.pick("Iso-CTS", grid("iso_cts", "alpha", alphas)))
    add(b.pick("WUDI", grid("wudi", "lambda", (1.0,) if quick else (0.5, 1.0, 1.5))))
    add(b.pick("consensus (TA)", grid("consensus", "alpha", lams)))

    # Data-aware: each expert with its own head, on 256 unlabelled training images.
    stats, metas = [], []
    for m, h, x in zip(b.experts, b.heads, b.calib, strict=True):
        t, meta = calibrate_module(
            TaskModel(m, h), list(x.split(32)),
            options=CalibrationOptions(fisher=True, examples=256, progress=False),
        )  # fmt: skip
        stats.append({_strip(k): v for k, v in t.items() if ".backbone." in f".{k}"})
        metas.append(meta)
    add(b.pick("Fisher", [
        (f"normalize={v}", lambda v=v: merge_tensors("fisher", ex, statistics=stats, normalize=v))
        for v in (False, True)
    ]))  # fmt: skip
    add(b.pick("RegMean", [
        (f"alpha={a}", lambda a=a: merge_tensors("regmean", ex, statistics=stats, alpha=a))
        for a in ((0.95,) if quick else (0.5, 0.9, 0.95, 1.0))
    ]))  # fmt: skip

    def pp(alpha: float) -> dict[str, torch.Tensor]:
        tasks = [[{"pixel_values": c} for c in x.split(32)] for x in b.calib]
        return regmean_plusplus(
            [load_copy(b, i) for i in range(len(ex))], tasks, base=b.base, alpha=alpha
        )

    add(b.pick("RegMean++", [(f"alpha={a}", lambda a=a: pp(a)) for a in (0.95,)]))

    nets = [TaskModel(b.skeleton, h) for h in b.heads]
    pre = {f"backbone.{k}": v for k, v in base.items()}
    ex_pre = [{f"backbone.{k}": v for k, v in sd.items()} for sd in ex]
    unlabelled = [list(x.split(64)) for x, _ in b.data["dev"]]
    steps = 20 if quick else 300

    class DevScore:
        """The merge's dev average (AdaMerging keeps the best checkpoint by it)."""

        def __call__(self, cands: list[dict[str, torch.Tensor]]) -> list[float]:
            return [mean(b.score(unprefix(c), "dev")) for c in cands]

        def generation(self, gen: int, best: Any, dev: float) -> None:
            pass

    for gran in ("task", "layer"):
        grid = []
        for lr in (1e-3, 1e-2):

            def ada(gran: str = gran, lr: float = lr) -> dict[str, torch.Tensor]:
                cfg = AdaMergingConfig(granularity=gran, steps=steps, lr=lr, report_every=50)
                r = adamerging(nets, pre, ex_pre, unlabelled, score=DevScore(), config=cfg)
                return unprefix(r.best)

            grid.append((f"lr={lr}, {steps} steps", ada))
        add(b.pick(f"AdaMerging ({gran}-wise)", grid))
    return rows


def unprefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("backbone.") :]: v for k, v in sd.items()}


def load_copy(b: Bench, i: int) -> torch.nn.Module:
    """Expert ``i`` as a module of its own (RegMean++ runs every expert's blocks)."""
    import copy

    m = copy.deepcopy(b.base)
    m.load_state_dict(b.expert_sds[i])
    return m


def _strip(k: str) -> str:
    kind, _, name = k.partition(".")
    return f"{kind}.{name[len('backbone.') :]}"


def table(rows: list[dict[str, Any]], tasks: tuple[str, ...]) -> str:
    fine = rows[1]["test"]
    head = "| method | setting (by dev) | " + " | ".join(tasks)
    head += " | avg | normalized | FusionBench B/32 |"
    lines = [head, "|" + "---|" * (len(tasks) + 5)]
    for r in rows:
        norm = mean([100 * a / f for a, f in zip(r["test"], fine, strict=True)])
        fb = FUSIONBENCH_B32.get(r["method"])
        cells = " | ".join(f"{a:.1f}" for a in r["test"])
        lines.append(
            f"| {r['method']} | {r['setting']} | {cells} | {mean(r['test']):.1f} | "
            f"{norm:.1f} | {'—' if fb is None else f'{fb:.1f}'} |"
        )
    return "\n".join(lines)


# ZipIt!'s setting: two networks from different initialisations, each trained on its own task
# (disjoint label sets), merged into one; each task is scored through its own head.
ZIP_PAIRS = (("color", "orientation"), ("quadrant", "tint"), ("count", "frequency"))
ZIP_ROWS = (  # label, matcher, layers zipped, refit ridge
    ("each model alone", None, None, None),
    ("averaging", "average", None, None),
    ("Git Re-Basin (weight matching)", "weight", None, None),
    ("permutation (activation matching)", "permute", None, None),
    ("ZipIt! 3/3", "zipit", 3, None),
    ("ZipIt! 2/3 (partial)", "zipit", 2, None),
    ("ZipIt! 1/3 (partial)", "zipit", 1, None),
    ("averaging + refit", "average", None, 1e-4),
    ("ZipIt! 3/3 + refit", "zipit", 3, 1e-4),
)


def train_mlp(task: str, init_seed: int, steps: int, seed: int) -> torch.nn.Sequential:
    """A 768-128-128-128-classes ReLU network on one task's flattened images."""
    from torch import nn

    torch.manual_seed(init_seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, VISION_TASKS[task]),
    )  # fmt: skip
    x, y = task_data(task, "train", steps * 64, seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for i in range(steps):
        loss = torch.nn.functional.cross_entropy(
            net(x[i * 64 : (i + 1) * 64]), y[i * 64 : (i + 1) * 64]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def zipit_table(seed: int, steps: int, n_test: int, log: Any) -> list[dict[str, Any]]:
    from merganser.zipping.sequential import zip_sequential

    rows = []
    for pair in ZIP_PAIRS:
        with torch.enable_grad():
            nets = [train_mlp(t, 100 + i, steps, seed) for i, t in enumerate(pair)]
        tests = [task_data(t, "test", n_test, seed) for t in pair]
        # Features are matched on both tasks' unlabelled training images.
        feats = torch.cat([task_data(t, "train", 512, seed + 1)[0] for t in pair])
        flat = [x.flatten(1) for x in feats.split(128)]
        for label, matcher, stop, ridge in ZIP_ROWS:
            if matcher is None:
                accs = [_acc(n, x, y) for n, (x, y) in zip(nets, tests, strict=True)]
            else:
                body = [torch.nn.Sequential(*n[1:]) for n in nets]  # the Flatten has no weights
                z = zip_sequential(body, flat, matcher=matcher, stop=stop, seed=seed, refit=ridge)
                accs = [
                    100.0 * float((z(x.flatten(1), k).argmax(-1) == y).float().mean())
                    for k, (x, y) in enumerate(tests)
                ]
            rows.append({"pair": "+".join(pair), "method": label, "test": accs})
            log(f"zip {'+'.join(pair):<22} {label:<36} {mean(accs):5.1f}")
    return rows


def _acc(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((net(x).argmax(-1) == y).float().mean())


def zip_table(rows: list[dict[str, Any]]) -> str:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    lines = ["| merge | " + " | ".join(pairs) + " | avg | vs averaging |",
             "|" + "---|" * (len(pairs) + 3)]  # fmt: skip
    by = {(r["pair"], r["method"]): mean(r["test"]) for r in rows}
    avg_ref = mean([by[(p, "averaging")] for p in pairs])
    for label in dict.fromkeys(r["method"] for r in rows):
        vals = [by[(p, label)] for p in pairs]
        rel = 100 * (mean(vals) - avg_ref) / avg_ref
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals)
                     + f" | {mean(vals):.1f} | {rel:+.0f} % |")  # fmt: skip
    return "\n".join(lines)


# The ViT version: expert A from the zoo of seed s, expert B from the zoo of seed s+1 (its own
# pretraining from another initialisation), each with its own head.
VIT_ROWS = (  # label, matcher, share of the blocks zipped (None: all), refit ridge
    ("each model alone", None, None, None),
    ("averaging", "average", None, None),
    ("Git Re-Basin (weight matching)", "weight", None, None),
    ("permutation (activation matching)", "permute", None, None),
    ("ZipIt! {k}/{n}", "zipit", 1.0, None),
    ("ZipIt! {k}/{n} (partial)", "zipit", 0.75, None),
    ("ZipIt! {k}/{n} (partial)", "zipit", 0.5, None),
    ("ZipIt! {k}/{n} (partial)", "zipit", 0.25, None),
    ("averaging + refit", "average", None, 1e-4),
    ("ZipIt! {k}/{n} + refit", "zipit", 1.0, 1e-4),
    ("control: both experts from one zoo (same init), averaging", "same", None, None),
)


@torch.no_grad()
def vit_zip_table(zoos: tuple[Path, Path], n_test: int, log: Any) -> list[dict[str, Any]]:
    from merganser.zipping.vit import zip_vit

    seeds = [zoo_seed(z) for z in zoos]
    specs = [json.loads((z / "zoo.json").read_text())["spec"] for z in zoos]
    layers = specs[0]["layers"]
    rows = []
    for pair in [p for p in ZIP_PAIRS if all(t in specs[0]["tasks"] for t in p)]:
        nets = [load_backbone(z / "experts" / t) for z, t in zip(zoos, pair, strict=True)]
        heads = [
            load_head(z / "heads" / f"{t}.safetensors") for z, t in zip(zoos, pair, strict=True)
        ]
        tests = [task_data(t, "test", n_test, s) for t, s in zip(pair, seeds, strict=True)]
        # matched on both tasks' unlabelled calibration images (the zoo's calib split)
        feats = torch.cat(
            [task_data(t, "calib", 256, s)[0] for t, s in zip(pair, seeds, strict=True)]
        )
        done = set()
        for label, matcher, share, ridge in VIT_ROWS:
            stop = None if share is None else max(1, round(share * layers))
            label = label.format(k=stop, n=layers)
            if label in done or ("partial" in label and stop == layers):
                continue  # the reduced zoo's ViT is shallower: fewer partial zips
            done.add(label)
            if matcher is None:
                accs = [accuracy(TaskModel(n, h), x, y)
                        for n, h, (x, y) in zip(nets, heads, tests, strict=True)]  # fmt: skip
            elif matcher == "same":
                same = [nets[0], load_backbone(zoos[0] / "experts" / pair[1])]
                sh = [heads[0], load_head(zoos[0] / "heads" / f"{pair[1]}.safetensors")]
                st = [tests[0], task_data(pair[1], "test", n_test, seeds[0])]
                z = zip_vit(same, sh, feats.split(64), matcher="average")
                accs = [_acc_task(z, k, x, y) for k, (x, y) in enumerate(st)]
            else:
                z = zip_vit(nets, heads, feats.split(64), matcher=matcher, stop=stop, refit=ridge)
                accs = [_acc_task(z, k, x, y) for k, (x, y) in enumerate(tests)]
            rows.append({"pair": "+".join(pair), "method": label, "test": accs})
            log(f"vit zip {'+'.join(pair):<22} {label:<36} {mean(accs):5.1f}")
    return rows


def _acc_task(z: torch.nn.Module, task: int, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * float((z(x, task).argmax(-1) == y).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=REPO / "bench_out" / "vision_zoo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the reduced zoo and one setting each")
    ap.add_argument("--dev", type=int, default=300, help="dev images per task")
    ap.add_argument("--test", type=int, default=500, help="test images per task")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--zip-steps", type=int, default=1500, help="training steps per MLP")
    ap.add_argument("--only-zip", action="store_true", help="only the ZipIt! table")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = VisionZooSpec.reduced(a.seed) if a.quick else VisionZooSpec(seed=a.seed)
    t0 = time.time()

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    if not a.only_zip:
        zoo = build_vision_zoo(a.root, spec)
        log(f"zoo: {zoo} ({time.time() - t0:.0f} s)")
        rows = run(Bench(zoo, spec.tasks, a.dev, a.test), a.quick, log)
        print(table(rows, spec.tasks))
        print(f"\n{len(spec.tasks)} tasks, seed {a.seed}, {time.time() - t0:.0f} s\n")
    zips = zipit_table(a.seed, 200 if a.quick else a.zip_steps, a.test, log)
    print(zip_table(zips))
    print(f"\nZipIt! MLP pairs: different initialisations, disjoint tasks, seed {a.seed}\n")
    other = VisionZooSpec.reduced(a.seed + 1) if a.quick else VisionZooSpec(seed=a.seed + 1)
    zoos = (build_vision_zoo(a.root, spec), build_vision_zoo(a.root, other))
    vit_zips = vit_zip_table(zoos, a.test, log)
    print(zip_table(vit_zips))
    print(f"\nZipIt! ViT pairs: expert A from the zoo of seed {a.seed}, expert B from seed "
          f"{a.seed + 1}; {time.time() - t0:.0f} s in all")  # fmt: skip
    if a.json:
        a.json.write_text(
            json.dumps(
                {"spec": spec.__dict__, "rows": rows, "zip": zips, "vit_zip": vit_zips}, indent=1
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
