"""`merganser verify`: re-check a merged folder against the manifest written with it.

The manifest records a digest of every file of the output (shards, config, recipe, model card,
tokenizer files, index) and the recipe's sha256. Verify re-hashes each one, refuses a file that
is missing or not listed, and re-derives the recipe hash from the recipe file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from merganser.errors import MerganserError
from merganser.storage import safejson
from merganser.storage.safetensors_header import read_header
from merganser.storage.writer import (
    INDEX_NAME,
    MANIFEST_NAME,
    RECIPE_NAME,
    SHARD_DIGEST,
    file_digest,
)


def _manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise MerganserError(f"{root}: no {MANIFEST_NAME} (not written by merganser?)")
    try:
        manifest = safejson.loads(mpath.read_bytes())
    except (OSError, ValueError) as e:
        raise MerganserError(f"{mpath}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), dict):
        raise MerganserError(f"{mpath}: unreadable manifest (no shards)")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise MerganserError(f"{mpath}: unreadable manifest (files is not a mapping)")
    for name, info in [*manifest["shards"].items(), *files.items()]:
        if not isinstance(info, dict) or not isinstance(info.get("bytes"), int):
            raise MerganserError(f"{mpath}: unreadable manifest (entry {name!r})")
        if ".." in Path(name).parts or Path(name).is_absolute():
            raise MerganserError(f"{mpath}: manifest names {name!r}, outside the folder")
    return manifest


def _check_file(path: Path, info: dict[str, Any], what: str) -> None:
    if not path.is_file():
        raise MerganserError(f"{path}: {what} listed in the manifest is missing")
    if path.stat().st_size != info["bytes"]:
        raise MerganserError(f"{path}: size {path.stat().st_size} != recorded {info['bytes']}")
    # Manifests written before BLAKE3 record sha256.
    algorithm = SHARD_DIGEST if SHARD_DIGEST in info else "sha256"
    if file_digest(path, algorithm) != info.get(algorithm):
        raise MerganserError(f"{path}: checksum does not match the manifest")


def verify_output(folder: str | Path) -> dict[str, Any]:
    """Check every file against the manifest, every shard header, the index and the recipe
    hash; raise on the first mismatch. ``files_checked`` is False for manifests written before
    merganser recorded every file (their shards alone are checked).
    """
    root = Path(folder)
    manifest = _manifest(root)
    shards: dict[str, Any] = manifest["shards"]
    files: dict[str, Any] | None = manifest.get("files")
    names: dict[str, str] = {}
    for fname, info in shards.items():
        path = root / fname
        _check_file(path, info, "shard")
        tensors, _ = read_header(path)
        for n in tensors:
            names[n] = fname
    if files is not None:
        for fname, info in files.items():
            _check_file(root / fname, info, "file")
        listed = {*shards, *files, MANIFEST_NAME}
        for p in sorted(root.rglob("*")):
            rel = str(p.relative_to(root))
            if (p.is_file() or p.is_symlink()) and rel not in listed:
                raise MerganserError(f"{p}: file not listed in the manifest")
    index = root / INDEX_NAME
    if len(shards) > 1 or index.exists():
        try:
            weight_map = safejson.loads(index.read_bytes())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MerganserError(f"{index}: unreadable index ({e})") from None
        if weight_map != names:
            raise MerganserError(f"{index}: weight_map does not match the shards' headers")
    recipe = root / RECIPE_NAME
    if (
        "recipe_sha256" in manifest
        and recipe.is_file()
        and hashlib.sha256(recipe.read_bytes()).hexdigest() != manifest["recipe_sha256"]
    ):
        raise MerganserError(f"{recipe}: does not hash to the manifest's recipe_sha256")
    return {"shards": len(shards), "tensors": len(names), "files_checked": files is not None}
