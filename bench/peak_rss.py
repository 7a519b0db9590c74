"""Peak RSS of merging four ~1 GB bf16 Llama-shaped checkpoints (base + 3 experts).

Generates the checkpoints locally (once, cached under bench_out/), then runs `merganser merge`
in a child process per recipe and reports the child's peak resident set size from
getrusage, next to the same merge of checkpoints a quarter the size, as ratios in one run.
`merganser report` and `merganser kinship` of the same inputs are measured the same way:
both stream, so their peak RSS should not grow with the model either.

    python bench/peak_rss.py [--scale 1.0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import llama_shapes, save_checkpoint

ROOT = Path(__file__).resolve().parents[1] / "bench_out"
TARGET_RSS = 1.5 * 2**30


def make_family(name: str, layers: int) -> Path:
    root = ROOT / name
    shapes = llama_shapes(2048, 5504, layers, 32000)
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5504,
        "num_hidden_layers": layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
        "torch_dtype": "bfloat16",
    }
    for i, m in enumerate(["base", "e1", "e2", "e3"]):
        d = root / m
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {
            k: torch.empty(s).uniform_(-0.05, 0.05, generator=g).to(torch.bfloat16)
            for k, s in shapes.items()
        }
        (d / "config.json").write_text(json.dumps(cfg))
        save_checkpoint(tensors, d)
        del tensors
    return root


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, CPU s, peak RSS bytes) of ``cmd``, run in a child of a wrapper that reads its
    children's rusage.
    """
    wrapper = (
        "import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]);"
        "u=resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(u.ru_utime+u.ru_stime,u.ru_maxrss);sys.exit(r.returncode)"
    )
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    cpu, rss = r.stdout.strip().splitlines()[-1].split()
    return wall, float(cpu), int(rss) * 1024


def measure(cmd: list[str]) -> tuple[float, int]:
    """(wall s, peak RSS bytes) of ``cmd`` in a child process."""
    wall, _, rss = run(cmd)
    return wall, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    families = {
        "~1 GB/model": make_family("llama_1gb", 8),
        "~0.25 GB/model": make_family("llama_250mb", 1),
    }
    methods = {
        "linear": {"merge_method": "linear"},
        "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    }
    print(
        f"{'checkpoints':<16}{'method':<17}{'input GB':>9}{'wall s':>8}{'peak RSS GB':>12}"
        f"{'RSS/input':>10}"
    )
    results = {}
    for fam, root in families.items():
        size = sum((root / m / "model.safetensors").stat().st_size
                   for m in ("base", "e1", "e2", "e3"))  # fmt: skip
        for mname, spec in methods.items():
            recipe = {**spec, "models": [{"model": str(root / m)} for m in ("e1", "e2", "e3")]}
            if spec["merge_method"] != "linear":
                recipe["base_model"] = str(root / "base")
            else:
                recipe["models"].insert(0, {"model": str(root / "base")})
            rpath = ROOT / f"{mname}.yaml"
            rpath.write_text(json.dumps(recipe))
            cmd = [
                sys.executable,
                "-m",
                "merganser.cli",
                "merge",
                str(rpath),
                str(ROOT / "out"),
                "--force",
                "--no-progress",
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            dt, rss = measure(cmd)
            results[(fam, mname)] = rss
            print(
                f"{fam:<16}{mname:<17}{size / 1e9:>9.2f}{dt:>8.1f}{rss / 2**30:>12.3f}"
                f"{rss / size:>10.3f}"
            )
    analyses = {}
    for fam, root in families.items():
        size = sum((root / m / "model.safetensors").stat().st_size
                   for m in ("base", "e1", "e2", "e3"))  # fmt: skip
        experts = [str(root / m) for m in ("e1", "e2", "e3")]
        recipe = ROOT / f"{fam[1:5].strip()}-report.yaml"
        recipe.write_text(json.dumps({
            "merge_method": "ties", "base_model": str(root / "base"),
            "models": [{"model": e, "parameters": {"density": 0.5}} for e in experts],
        }))  # fmt: skip
        for tool, cmd in (
            ("report", ["report", str(recipe), "--json"]),
            ("kinship", ["kinship", *experts, "--base", str(root / "base"), "--json"]),
        ):
            dt, rss = measure([sys.executable, "-m", "merganser.cli", *cmd])
            analyses[(fam, tool)] = rss
            print(
                f"{fam:<16}{tool:<17}{size / 1e9:>9.2f}{dt:>8.1f}{rss / 2**30:>12.3f}"
                f"{rss / size:>10.3f}"
            )
    for tool in ("report", "kinship"):
        ratio = analyses[("~1 GB/model", tool)] / analyses[("~0.25 GB/model", tool)]
        print(f"peak RSS of {tool}, 1 GB vs 0.25 GB checkpoints: {ratio:.2f}x")
    big = [v for (f, _), v in results.items() if f.startswith("~1")]
    small = [v for (f, _), v in results.items() if not f.startswith("~1")]
    print(
        f"\npeak RSS, 1 GB vs 0.25 GB checkpoints: {max(big) / max(small):.2f}x "
        "(1.0 = independent of model size)"
    )
    ok = max(big) < TARGET_RSS
    print(
        f"largest peak RSS {max(big) / 2**30:.3f} GiB vs target 1.5 GiB: {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
