"""Old commit vs this checkout, side by side in one run: whole-CLI merge time and output bytes.

    python bench/ab.py COMMIT [--repeats 3] [--work /tmp/merganser-ab]

COMMIT is checked out into a git worktree under the work folder and run from the same venv
(``PYTHONPATH``), alternating with this checkout, on 125M-parameter Llama-shaped bf16
checkpoints generated locally (two experts and a base). Prints each method's medians, their
ratio, and whether the two outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from llama import llama_shapes, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "vocab_size": 32000,
}


def _models(root: Path) -> None:
    shapes = llama_shapes(768, 2048, 12, 32000)
    g = torch.Generator().manual_seed(0)
    for name in ("base", "e1", "e2"):
        d = root / name
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        w = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
        save_checkpoint(w, d)
        (d / "config.json").write_text(json.dumps(CONFIG))


def _recipes(root: Path) -> dict[str, Path]:
    experts = [{"model": str(root / e), "parameters": {"weight": 0.5}} for e in ("e1", "e2")]
    ties = [
        {"model": str(root / e), "parameters": {"density": 0.5, "weight": 1.0}}
        for e in ("e1", "e2")
    ]
    recipes = {
        "linear": {"merge_method": "linear", "models": experts, "dtype": "bfloat16"},
        "ties": {
            "merge_method": "ties",
            "base_model": str(root / "base"),
            "models": ties,
            "dtype": "bfloat16",
        },
    }
    paths = {}
    for k, r in recipes.items():
        paths[k] = root / f"{k}.yaml"
        paths[k].write_text(json.dumps(r))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("commit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/merganser-ab"))
    a = ap.parse_args()
    old = a.work / "old"
    if old.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=True)
    subprocess.run(["git", "worktree", "add", "-q", str(old), a.commit], cwd=REPO, check=True)
    _models(a.work)
    recipes = _recipes(a.work)
    trees = {"old": old / "src", "new": REPO / "src"}
    times: dict[tuple[str, str], list[float]] = {(t, k): [] for t in trees for k in recipes}
    try:
        for _ in range(a.repeats):
            for k, recipe in recipes.items():
                for t, src in trees.items():
                    cmd = [sys.executable, "-c", "from merganser.cli import entry; entry()"]
                    cmd += ["merge", str(recipe), str(a.work / f"out_{t}_{k}"), "--force"]
                    cmd += ["--no-progress", "--read", "cache"]
                    t0 = time.perf_counter()
                    env = dict(os.environ, PYTHONPATH=str(src))
                    subprocess.run(cmd, env=env, check=True, capture_output=True)
                    times[(t, k)].append(time.perf_counter() - t0)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    for k in recipes:
        o, n = statistics.median(times[("old", k)]), statistics.median(times[("new", k)])
        a_, b_ = (a.work / f"out_{t}_{k}" / "model.safetensors" for t in ("old", "new"))
        same = a_.read_bytes() == b_.read_bytes()
        print(f"{k}: {a.commit} {o:.2f} s, now {n:.2f} s ({n / o:.2f}x); identical: {same}")


if __name__ == "__main__":
    main()
