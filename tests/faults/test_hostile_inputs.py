"""Hostile checkpoints through the real command line: refused in one line, no code run."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from conftest import run_cli, write_model, write_recipe


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _st(folder, header: dict, data: bytes, declared: int | None = None):
    folder.mkdir()
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(raw) if declared is None else declared) + raw + data
    )
    return folder


def _hostile(tmp_path, kind: str):
    d = tmp_path / kind
    if kind == "pickle-code":
        d.mkdir()
        torch.save(
            {"w": torch.ones(4), "x": _Evil(str(tmp_path / "marker"))}, d / "pytorch_model.bin"
        )
        return d
    if kind == "out-of-bounds":
        return _st(d, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    if kind == "overlap":
        return _st(
            d,
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        )
    if kind == "huge-header":
        return _st(d, {}, b"", declared=2**62)
    if kind == "huge-shape":
        return _st(
            d, {"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4
        )
    if kind == "truncated":
        write_model(d, {"w": torch.ones(1000)})
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
        return d
    if kind in ("index-dotdot", "index-absolute"):
        write_model(tmp_path / "real", {"w": torch.ones(4)})
        d.mkdir()
        target = (
            "../real/model.safetensors"
            if kind == "index-dotdot"
            else str(tmp_path / "real" / "model.safetensors")
        )
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": target}}))
        return d
    if kind == "not-json-header":
        return _st(d, {}, b"") if False else _raw_garbage(d)
    raise AssertionError(kind)


def _raw_garbage(d):
    d.mkdir()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"\xff\xfe{[}")
    return d


KINDS = [
    "pickle-code",
    "out-of-bounds",
    "overlap",
    "huge-header",
    "huge-shape",
    "truncated",
    "index-dotdot",
    "index-absolute",
    "not-json-header",
]


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_checkpoint_is_refused_in_one_line(tmp_path, kind) -> None:
    good = write_model(tmp_path / "good", {"w": torch.ones(4)})
    bad = _hostile(tmp_path, kind)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(good)}, {"model": str(bad)}]},
    )
    r = run_cli("merge", str(recipe), str(tmp_path / "out"))
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("merganser: error: "), r.stderr
    assert str(bad) in r.stderr or bad.name in r.stderr
    assert not (tmp_path / "marker").exists(), "the pickle ran code"
    assert not (tmp_path / "out").exists()
    r = run_cli("inspect", str(bad))
    assert r.returncode == 1 and "Traceback" not in r.stderr
