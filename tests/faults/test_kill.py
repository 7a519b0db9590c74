"""SIGKILL a multi-shard merge at many random moments: the output is always either absent or a
complete, verified model identical to a clean run, and the inputs never change."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tree_digest, write_model, write_recipe

from merganser.analysis.verify import verify_output

TRIALS = 24


def _cmd(recipe: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "merganser.cli",
        "merge",
        str(recipe),
        str(out),
        "--out-shard-size",
        "4MB",
        "--threads",
        "2",
        "--no-progress",
    ]


def test_kill_at_random_moments(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    paths = [
        write_model(
            tmp_path / f"m{i}",
            {f"layers.{j}.w": torch.randn(512, 1024, generator=g) for j in range(8)},
        )
        for i in range(3)
    ]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "dare_ties",
            "base_model": str(paths[0]),
            "random_seed": 1,
            "models": [{"model": str(p), "parameters": {"density": 0.5}} for p in paths[1:]],
        },
    )
    inputs = {p.name: tree_digest(p) for p in paths}

    clean = tmp_path / "clean"
    t0 = time.monotonic()
    proc = subprocess.Popen(_cmd(recipe, clean), stderr=subprocess.PIPE)
    proc.wait()
    total = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    expected = tree_digest(clean)

    rng = random.Random(1234)
    outcomes = {"absent": 0, "complete": 0}
    for trial in range(TRIALS):
        out = tmp_path / f"out{trial}"
        proc = subprocess.Popen(_cmd(recipe, out), stderr=subprocess.DEVNULL)
        if trial % 3 == 0:  # anywhere in the run, start-up included
            time.sleep(rng.uniform(0, total * 1.05))
        else:  # once the temporary folder exists: just after, or anywhere in the write phase
            t_start = time.monotonic()
            while proc.poll() is None and not list(tmp_path.glob(f".out{trial}.merganser-tmp-*")):
                time.sleep(0.001)
            waited = time.monotonic() - t_start
            span = 0.05 if trial % 3 == 1 else max(0.0, total - waited) * 1.05
            time.sleep(rng.uniform(0, span))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            verify_output(out)
            assert tree_digest(out) == expected, f"trial {trial}: output differs from clean run"
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
        assert {p.name: tree_digest(p) for p in paths} == inputs, f"trial {trial}: input changed"
    print(f"\n{TRIALS} kill trials: {outcomes}")
    assert outcomes["absent"] > 0, outcomes  # kills really landed mid-merge
