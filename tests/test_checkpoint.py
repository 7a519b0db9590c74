"""Reading every supported format, and refusing hostile files with one clear line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model

import merganser
from merganser.errors import CheckpointError
from merganser.storage.checkpoint import Checkpoint

T = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.bias": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
}


def _same(ckpt: Checkpoint) -> None:
    assert set(ckpt.tensors) == set(T)
    for k, v in T.items():
        assert torch.equal(ckpt.read(k), v)
        flat = ckpt.read(k, 1, 1)
        assert torch.equal(flat, v.reshape(-1)[1:2])


def test_hf_folder_single_file(tmp_path) -> None:
    with Checkpoint(write_model(tmp_path / "m", T, {"num_hidden_layers": 3})) as c:
        _same(c)
        assert c.num_layers() == 3


def test_single_safetensors_file(tmp_path) -> None:
    with Checkpoint(write_model(tmp_path / "m", T) / "model.safetensors") as c:
        _same(c)


def test_sharded_folder_with_index(tmp_path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "m"
    d.mkdir()
    save_file({"a.weight": T["a.weight"]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b.bias": T["b.bias"]}, str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a.weight": "model-00001-of-00002.safetensors",
                    "b.bias": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with Checkpoint(d) as c:
        _same(c)


def test_torch_bin_through_weights_only(tmp_path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    torch.save(T, d / "pytorch_model.bin")
    with Checkpoint(d) as c:
        _same(c)
    # and a .bin input merges like any other
    out = merganser.merge({"merge_method": "linear", "models": [{"model": str(d)}]}, tmp_path / "o")
    assert torch.equal(load_folder(out)["a.weight"], T["a.weight"])


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_that_runs_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "marker"
    bad = tmp_path / "evil.bin"
    torch.save({"w": torch.ones(2), "x": _Evil(str(marker))}, bad)
    with pytest.raises(CheckpointError, match=r"evil\.bin: refused to load"):
        Checkpoint(bad)
    assert not marker.exists()


def _raw_safetensors(path: Path, header: dict, data: bytes, declared: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", declared if declared is not None else len(raw)) + raw + data)
    return path


HOSTILE = {
    "offsets out of bounds": (
        {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
        b"\0" * 8,
        None,
        "data ends at byte 16 but the file holds only 8",
    ),
    "overlapping tensors": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
        None,
        "overlap",
    ),
    "huge declared header": ({}, b"", 2**40, "header declares 1099511627776 bytes"),
    "header longer than file": ({}, b"", 4096, "truncated safetensors file"),
    "size disagrees with shape": (
        {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        b"\0" * 8,
        None,
        "needs 12",
    ),
    "negative shape": (
        {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}},
        b"",
        None,
        "non-negative",
    ),
    "unknown dtype": (
        {"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}},
        b"\0",
        None,
        "unsupported dtype",
    ),
    "huge shape": (
        {"w": {"dtype": "F32", "shape": [2**31, 2**31], "data_offsets": [0, 8]}},
        b"\0" * 8,
        None,
        "needs",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_safetensors_header(case, tmp_path) -> None:
    header, data, declared, expected = HOSTILE[case]
    p = _raw_safetensors(tmp_path / "x.safetensors", header, data, declared)
    with pytest.raises(CheckpointError, match=r"x\.safetensors") as e:
        Checkpoint(p)
    assert expected in str(e.value)


def test_truncated_shard_is_refused(tmp_path) -> None:
    d = write_model(tmp_path / "m", T)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or out-of-bounds"):
        Checkpoint(d)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x"])
def test_index_pointing_outside_the_folder(tmp_path, target) -> None:
    d = tmp_path / "m"
    d.mkdir()
    write_model(tmp_path, T)  # a real file next to the folder
    (tmp_path / "outside.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": target}})
    )
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(d)


def test_symlink_escaping_the_folder(tmp_path) -> None:
    write_model(tmp_path / "real", T)
    d = tmp_path / "m"
    d.mkdir()
    (d / "shard.safetensors").symlink_to(tmp_path / "real" / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "shard.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside the model folder"):
        Checkpoint(d)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path) -> None:
    d = write_model(tmp_path / "m", T)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"zzz": "model.safetensors"}})
    )
    with pytest.raises(CheckpointError, match=r"'zzz' is mapped to model\.safetensors"):
        Checkpoint(d)
