"""Merging at scale: base + {2, 3, 5, 8} experts of 1B-shape bf16 checkpoints, side by side in
one run, for linear, TIES, DARE-TIES, DELLA, Model Stock and DPPA: wall seconds, CPU seconds per GB
of input, peak RSS, and the 8-expert / 3-expert ratios the scale targets are stated in.

    python bench/scale.py [--experts 2,3,5,8] [--methods ...] [--threads N] [--mergekit]
                          [--repeats 1] [--read cache]

Experts beyond the three generated checkpoints are hard links to them (the disk holds three;
with ``--read cache`` the page cache serves every read, as in a warm run). ``--mergekit`` adds
mergekit 0.1.5 (its own venv) at the largest expert count for TIES and DARE-TIES. ``--7b``
adds merges of base + 8 experts of 7B shape (one 13.5 GB file, hard-linked as every input;
``--7b-methods``, TIES by default): their peak RSS against the 1B runs' shows memory
independent of model size. ``--methods ""`` skips the 1B runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import llama_shapes, save_checkpoint
from peak_rss import ROOT, make_family, run

REPO = Path(__file__).resolve().parents[1]
MK = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
METHODS = {
    "linear": {"merge_method": "linear"},
    "ties": {"merge_method": "ties", "density": 0.5, "weight": 1.0},
    "dare_ties": {"merge_method": "dare_ties", "density": 0.5, "weight": 1.0},
    "della": {"merge_method": "della", "density": 0.5, "epsilon": 0.1, "weight": 1.0},
    "model_stock": {"merge_method": "model_stock"},
    # Methods with whole-model statistic passes before the merge pass.
    "ties_global": {"merge_method": "ties", "density": 0.5, "weight": 1.0,
                    "parameters": {"scope": "global"}},
    "dppa": {"merge_method": "dppa", "weight": 1.0},
    "sce": {"merge_method": "sce", "parameters": {"select_topk": 0.5}},
}  # fmt: skip
DEFAULT = "linear,ties,dare_ties,della,model_stock,dppa"


def seven_b() -> Path:
    """A 7B-shape bf16 checkpoint (Llama-2-7B's shapes, random values), once."""
    import torch

    root = ROOT / "llama_7b"
    base = root / "base"
    if not (base / "model.safetensors").exists():
        base.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(7)
        shapes = llama_shapes(4096, 11008, 32, 32000)
        tensors = {k: torch.empty(v).uniform_(-0.05, 0.05, generator=g).to(torch.bfloat16)
                   for k, v in shapes.items()}  # fmt: skip
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
               "torch_dtype": "bfloat16"}  # fmt: skip
        (base / "config.json").write_text(json.dumps(cfg))
        save_checkpoint(tensors, base)
        del tensors
    for i in range(1, 9):  # experts: hard links of the base (the merge streams them all)
        d = root / f"e{i}"
        if not (d / "model.safetensors").exists():
            d.mkdir(exist_ok=True)
            os.link(base / "model.safetensors", d / "model.safetensors")
            shutil.copy(base / "config.json", d / "config.json")
    return root


def experts(root: Path, n: int) -> list[Path]:
    """``n`` expert folders: e1..e3 as generated, the rest hard links to them."""
    out = []
    for i in range(1, n + 1):
        d = root / f"e{i}"
        if i > 3 and not (d / "model.safetensors").exists():
            src = root / f"e{(i - 1) % 3 + 1}"
            d.mkdir(exist_ok=True)
            os.link(src / "model.safetensors", d / "model.safetensors")
            shutil.copy(src / "config.json", d / "config.json")
        out.append(d)
    return out


def recipe(root: Path, method: str, n: int) -> Path:
    spec = dict(METHODS[method])
    name = spec.pop("merge_method")
    top = spec.pop("parameters", None)
    models = [{"model": str(e), "parameters": dict(spec)} for e in experts(root, n)]
    r = {"merge_method": name, "base_model": str(root / "base"), "models": models,
         "dtype": "bfloat16"}  # fmt: skip
    if top:
        r["parameters"] = top
    if name == "linear":
        r.pop("base_model")
        r["models"].insert(0, {"model": str(root / "base")})
    path = ROOT / f"scale-{method}-{n}.yaml"
    path.write_text(json.dumps(r))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experts", default="2,3,5,8")
    ap.add_argument("--methods", default=DEFAULT, help=f"of {', '.join(METHODS)}")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--read", default="cache")
    ap.add_argument("--mergekit", action="store_true")
    ap.add_argument("--7b", dest="seven", action="store_true")
    ap.add_argument("--7b-methods", dest="seven_methods", default="ties")
    a = ap.parse_args()
    root = make_family("llama_1gb", 8)
    counts = [int(x) for x in a.experts.split(",")]
    size = (root / "base" / "model.safetensors").stat().st_size
    print(f"{'method':<13}{'experts':>8}{'input GB':>9}{'wall s':>8}{'CPU s':>8}"
          f"{'CPU s/GB':>9}{'peak RSS GB':>12}")  # fmt: skip
    rows: dict[tuple[str, int], tuple[float, float, int]] = {}
    methods = [m for m in a.methods.split(",") if m]
    for method in methods:
        for n in counts:
            cmd = [sys.executable, "-m", "merganser.cli", "merge", str(recipe(root, method, n))]
            cmd += [str(ROOT / "scale-out"), "--force", "--no-progress", "--read", a.read]
            if a.threads:
                cmd += ["--threads", str(a.threads)]
            runs = [run(cmd) for _ in range(a.repeats)]
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            rss = max(r[2] for r in runs)
            gb = size * (n + 1) / 1e9
            rows[(method, n)] = (wall, cpu / gb, rss)
            print(f"{method:<13}{n:>8}{gb:>9.2f}{wall:>8.1f}{cpu:>8.1f}{cpu / gb:>9.2f}"
                  f"{rss / 2**30:>12.3f}", flush=True)  # fmt: skip
    if methods and 3 in counts and max(counts) > 3:
        top = max(counts)
        print(f"\n{top} experts vs 3: CPU s per GB, wall, peak RSS")
        for method in methods:
            w8, c8, r8 = rows[(method, top)]
            w3, c3, r3 = rows[(method, 3)]
            print(f"  {method:<13} CPU/GB {c8 / c3:.2f}x  wall {w8 / w3:.2f}x  RSS {r8 / r3:.2f}x")
    if a.mergekit and MK.exists():
        top = max(counts)
        print(f"\nmergekit 0.1.5 at {top} experts (its own venv, --lazy-unpickle off, CPU)")
        for method in [m for m in ("ties", "dare_ties") if (m, top) in rows]:
            cmd = [str(MK), str(recipe(root, method, top)), str(ROOT / "scale-mk"),
                   "--allow-crimes", "--random-seed", "0"]  # fmt: skip
            wall, cpu, rss = run(cmd)
            ours = rows[(method, top)][0]
            print(f"  {method:<13} wall {wall:.1f} s (merganser {ours:.1f} s: "
                  f"{ours / wall:.3f}x)  peak RSS {rss / 2**30:.2f} GB")  # fmt: skip
    if a.seven:
        root7 = seven_b()
        size7 = (root7 / "base" / "model.safetensors").stat().st_size
        for method in a.seven_methods.split(","):
            cmd = [sys.executable, "-m", "merganser.cli", "merge", str(recipe(root7, method, 8))]
            cmd += [str(ROOT / "scale-out"), "--force", "--no-progress", "--read", a.read]
            wall, cpu, rss = run(cmd)
            print(f"\n7B shape, {method}, 8 experts: {9 * size7 / 1e9:.1f} GB in, wall "
                  f"{wall:.1f} s, CPU {cpu / (9 * size7 / 1e9):.2f} s/GB, peak RSS "
                  f"{rss / 2**30:.3f} GB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
