"""`merganser verify`: re-check a merged folder against the manifest written with it."""

from __future__ import annotations

import json
from pathlib import Path

from merganser.errors import MerganserError
from merganser.safetensors_header import read_header
from merganser.writer import INDEX_NAME, MANIFEST_NAME, SHARD_DIGEST, file_digest


def verify_output(folder: str | Path) -> dict[str, int]:
    """Check index, every shard header and every shard checksum; raise on the first mismatch."""
    root = Path(folder)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise MerganserError(f"{root}: no {MANIFEST_NAME} (not written by merganser?)")
    try:
        shards = json.loads(mpath.read_text())["shards"]
    except (ValueError, KeyError, TypeError) as e:
        raise MerganserError(f"{mpath}: unreadable manifest ({e})") from None
    names: dict[str, str] = {}
    for fname, info in shards.items():
        path = root / fname
        if not path.is_file():
            raise MerganserError(f"{path}: shard listed in the manifest is missing")
        tensors, _ = read_header(path)
        if path.stat().st_size != info["bytes"]:
            raise MerganserError(f"{path}: size {path.stat().st_size} != recorded {info['bytes']}")
        # Manifests written before BLAKE3 record sha256.
        algorithm = SHARD_DIGEST if SHARD_DIGEST in info else "sha256"
        if file_digest(path, algorithm) != info.get(algorithm):
            raise MerganserError(f"{path}: checksum does not match the manifest")
        for n in tensors:
            names[n] = fname
    index = root / INDEX_NAME
    if len(shards) > 1 or index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise MerganserError(f"{index}: unreadable index ({e})") from None
        if weight_map != names:
            raise MerganserError(f"{index}: weight_map does not match the shards' headers")
    return {"shards": len(shards), "tensors": len(names)}
