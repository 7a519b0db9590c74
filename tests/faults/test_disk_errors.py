"""Write failures (file-size limit, a failing write, too little space) end with one line, a
non-zero exit and no partial output."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
from conftest import write_model, write_recipe

import merganser
import merganser.storage.writer


@pytest.fixture
def recipe(tmp_path):
    g = torch.Generator().manual_seed(0)
    m = write_model(
        tmp_path / "m", {f"t{i}": torch.randn(256, 1024, generator=g) for i in range(6)}
    )
    return write_recipe(
        tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(m)}]}
    )


def _leftovers(root):
    return [p.name for p in root.iterdir() if p.name.startswith((".out", "out"))]


def test_file_size_limit(tmp_path, recipe) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "merganser.cli",
            "merge",
            str(recipe),
            str(tmp_path / "out"),
            "--out-shard-size",
            "2MB",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit,
    )
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot write output (File too large)" in r.stderr
    assert "Traceback" not in r.stderr
    assert _leftovers(tmp_path) == []


def test_write_failing_midway(tmp_path, recipe, monkeypatch) -> None:
    calls = {"n": 0}
    real = os.pwrite

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(merganser.storage.writer.os, "pwrite", flaky)
    with pytest.raises(merganser.MerganserError, match="No space left on device"):
        merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(out_shard_size=2_000_000))
    assert calls["n"] >= 4
    assert _leftovers(tmp_path) == []


def test_too_little_space_is_reported_before_any_work(tmp_path, recipe, monkeypatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merganser.api.shutil, "disk_usage", lambda p: usage(10**9, 10**9, 1000))
    read = merganser.storage.checkpoint.Checkpoint.read
    monkeypatch.setattr(
        merganser.storage.checkpoint.Checkpoint,
        "read",
        lambda *a, **k: pytest.fail("tensor data was read"),
    )
    with pytest.raises(merganser.MerganserError, match="not enough disk space"):
        merganser.merge(recipe, tmp_path / "out")
    monkeypatch.setattr(merganser.storage.checkpoint.Checkpoint, "read", read)
    assert _leftovers(tmp_path) == []


def test_unwritable_parent_folder(tmp_path, recipe) -> None:
    if os.geteuid() == 0:
        parent = tmp_path / "file-not-folder"
        parent.write_text("x")
        out = parent / "out"
    else:
        parent = tmp_path / "ro"
        parent.mkdir(mode=0o500)
        out = parent / "out"
    with pytest.raises(merganser.MerganserError, match="cannot create output"):
        merganser.merge(recipe, out)
