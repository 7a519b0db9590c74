"""The README's main job: build three tiny Llama checkpoints locally and merge them.

Run as ``python -m merganser.demo OUT``. It prints, for each merge, how far the result lies from
the base and from each expert, which is what each method should do by construction: a uniform
soup sits between the experts, task arithmetic with lambda 1 adds both deltas, and negation
moves away from the expert it subtracts.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from merganser.api import MergeOptions, merge
from merganser.checkpoint import Checkpoint
from merganser.tiny import build_family

RECIPES = {
    "soup (linear)": {
        "merge_method": "linear",
        "models": [{"model": "expert_1"}, {"model": "expert_2"}],
    },
    "task arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "expert_1"}, {"model": "expert_2"}],
        "parameters": {"lambda": 1.0},
    },
    "negate expert_1": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [{"model": "expert_1", "parameters": {"weight": -1.0}}],
    },
}


def _flat(path: Path) -> torch.Tensor:
    with Checkpoint(path) as c:
        return torch.cat([c.read(n).float().reshape(-1) for n in sorted(c.tensors)])


def main(out: str = "demo_out") -> int:
    root = Path(out)
    models = root / "models"
    if not (models / "expert_2" / "model.safetensors").exists():
        print(f"building three tiny Llama checkpoints under {models}")
        build_family(models, experts=2, seed=0, hidden_size=128, intermediate=256, layers=4)
    refs = {name: _flat(models / name) for name in ("base", "expert_1", "expert_2")}
    print(f"\n{'merge':<18}{'seconds':>9}{'|Δ base|':>11}{'|Δ e1|':>9}{'|Δ e2|':>9}")
    for title, spec in RECIPES.items():
        recipe = dict(spec)
        recipe["base_model"] = str(models / spec["base_model"]) if "base_model" in spec else None
        recipe["models"] = [
            {**m, "model": str(models / m["model"])}
            for m in spec["models"]  # type: ignore[union-attr]
        ]
        if recipe["base_model"] is None:
            del recipe["base_model"]
        dest = root / "merged" / title.split()[0]
        t0 = time.perf_counter()
        merge(recipe, dest, MergeOptions(force=True, progress=False))
        dt = time.perf_counter() - t0
        got = _flat(dest)
        dist = [float((got - refs[k]).norm()) for k in ("base", "expert_1", "expert_2")]
        print(f"{title:<18}{dt:>9.2f}{dist[0]:>11.3f}{dist[1]:>9.3f}{dist[2]:>9.3f}")
    print(f"\nmerged models written under {root / 'merged'} (try: merganser inspect)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
