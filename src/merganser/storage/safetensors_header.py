"""Strict parsing of safetensors headers: every offset is checked before any data is touched.

Format: 8-byte little-endian header length N, N bytes of JSON, then the raw tensor data.
A hostile file must not make us allocate or read beyond what the file actually holds.
"""

from __future__ import annotations

import itertools
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merganser.errors import CheckpointError
from merganser.storage import safejson
from merganser.storage.dtypes import ST_TO_TORCH, itemsize

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit in the reference implementation


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return its tensors and its metadata."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: safetensors header declares {n} bytes (limit {MAX_HEADER_BYTES})"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{path}: truncated safetensors file (header needs {n} bytes, "
                    f"file has {size - 8})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = safejson.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return _parse_entries(path, header, data_start=8 + n, data_size=size - 8 - n)


def _parse_entries(
    path: Path, header: dict, data_start: int, data_size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in ST_TO_TORCH:
            raise CheckpointError(f"{where}: unsupported dtype {code!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with begin <= end")
        begin, end = offsets
        dtype = ST_TO_TORCH[code]
        expected = math.prod(shape) * itemsize(dtype)
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {code} "
                f"needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{where}: data ends at byte {end} but the file holds only {data_size} data "
                "bytes (truncated or out-of-bounds offsets)"
            )
        spans.append((begin, end, name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, end - begin)
    # Empty tensors occupy no bytes and cannot overlap anything.
    spans = sorted(s for s in spans if s[1] > s[0])
    for (_b0, e0, n0), (b1, _e1, n1) in itertools.pairwise(spans):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} and {n1!r} overlap in the data section")
    # As the reference implementation: the tensors fill the data section exactly. Bytes past
    # the last tensor are data no header describes (a wrong file appended to, or a bad write).
    end = max((e for _, e, _ in spans), default=0)
    if end != data_size:
        raise CheckpointError(
            f"{path}: {data_size - end} bytes after the last tensor that no header entry "
            "describes (expected the tensors to fill the file)"
        )
    return tensors, metadata
