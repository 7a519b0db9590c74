"""A merge that is killed or interrupted leaves no output folder and never touches its inputs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import tree_digest, write_model, write_recipe

import merganser


def _big_models(root: Path) -> Path:
    # ~48 MB of float32 per model: large enough that the merge takes a visible moment.
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        tensors = {f"layer.{j}.w": torch.randn(1024, 1024, generator=g) for j in range(12)}
        paths.append(write_model(root / f"m{i}", tensors))
    return write_recipe(
        root / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(paths[0]),
            "models": [{"model": str(p)} for p in paths[1:]],
        },
    )


def _start(recipe: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "merganser.cli",
            "merge",
            str(recipe),
            str(out),
            "--threads",
            "1",
            "--out-shard-size",
            "8MB",
            "--no-progress",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _wait_for_shard(parent: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if list(parent.glob(".out.merganser-tmp-*/model-*.safetensors")):
            return
        assert proc.poll() is None, "merge ended before it could be interrupted"
        time.sleep(0.002)
    raise AssertionError("no shard appeared")


def test_sigkill_mid_write_leaves_no_output(tmp_path) -> None:
    recipe = _big_models(tmp_path)
    before = {p.name: tree_digest(p) for p in tmp_path.glob("m*")}
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_shard(tmp_path, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not out.exists()
    assert {p.name: tree_digest(p) for p in tmp_path.glob("m*")} == before

    # The next merge into the same target cleans the dead process's temporary folder.
    merganser.merge(recipe, out, merganser.MergeOptions(progress=False))
    assert out.is_dir()
    assert not list(tmp_path.glob(".out.merganser-tmp-*"))


def test_sigterm_mid_write_cleans_up_and_says_so(tmp_path) -> None:
    recipe = _big_models(tmp_path)
    out = tmp_path / "out"
    proc = _start(recipe, out)
    _wait_for_shard(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip() == "merganser: interrupted; nothing was written"
    assert not out.exists()
    assert not list(tmp_path.glob(".out.merganser-tmp-*"))


def test_failure_inside_a_worker_removes_the_temporary_folder(tmp_path) -> None:
    m = write_model(tmp_path / "m", {"w": torch.ones(4)})
    n = write_model(tmp_path / "n", {"w": torch.full((4,), float("inf"))})
    out = tmp_path / "out"
    try:
        merganser.merge(
            {"merge_method": "linear", "models": [{"model": str(m)}, {"model": str(n)}]}, out
        )
    except merganser.MerganserError as e:
        assert "tensor w" in str(e) and "NaN or Inf" in str(e)
    else:
        raise AssertionError("non-finite result was written")
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))
