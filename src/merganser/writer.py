"""Writing merged checkpoints: sharded safetensors into a temporary folder, renamed when verified.

The shard layout (which tensor goes to which file at which offset) is fixed from shapes and
dtypes before any data exists, so each tensor is written with ``pwrite`` the moment it is
computed, in any order, and the bytes are identical whatever the thread scheduling.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merganser.dtypes import TORCH_TO_ST, itemsize
from merganser.errors import MerganserError
from merganser.safetensors_header import read_header

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "merganser_manifest.json"
_TMP_MARK = ".merganser-tmp-"


@dataclass
class Slot:
    """Where one tensor's bytes go."""

    shard: int
    offset: int  # absolute offset of the tensor's first byte in its shard file
    dtype: torch.dtype
    nbytes: int


@dataclass
class Shard:
    filename: str
    names: list[str] = field(default_factory=list)
    header: bytes = b""
    size: int = 0


def layout(
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
) -> tuple[list[Shard], dict[str, Slot]]:
    """Assign tensors, in order, to shards of at most ``max_shard_bytes`` data each."""
    groups: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
    used = 0
    for name, shape, dtype in tensors:
        n = itemsize(dtype)
        for d in shape:
            n *= d
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append((name, shape, dtype, n))
        used += n
    total = len(groups)
    shards: list[Shard] = []
    slots: dict[str, Slot] = {}
    for si, group in enumerate(groups):
        fname = (
            "model.safetensors" if total == 1 else f"model-{si + 1:05d}-of-{total:05d}.safetensors"
        )
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, shape, dtype, n in group:
            header[name] = {
                "dtype": TORCH_TO_ST[dtype],
                "shape": list(shape),
                "data_offsets": [pos, pos + n],
            }
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, like safetensors
        start = 8 + len(raw)
        for name, _shape, dtype, n in group:
            rel = header[name]["data_offsets"][0]
            slots[name] = Slot(si, start + rel, dtype, n)
        shards.append(
            Shard(fname, [g[0] for g in group], len(raw).to_bytes(8, "little") + raw, start + pos)
        )
    return shards, slots


class _ShardHasher(threading.Thread):
    """sha256 of each shard, computed while the shards are being written.

    Writers report each byte range they fill; this thread hashes every shard, in order, up to
    its first unfilled byte (reading back through the page cache) as soon as the ranges before
    it are complete. The checksums are then ready about when the last tensor lands, instead of
    costing a serial re-read of the whole output afterwards.
    """

    def __init__(self, fds: dict[int, int], shards: list[Shard]):
        super().__init__(name="shard-sha256", daemon=True)
        self.fds, self.shards = fds, shards
        self.digests: list[str | None] = [None] * len(shards)
        self.error: BaseException | None = None
        self._frontier = [len(sh.header) for sh in shards]  # bytes known to be written
        self._pending: list[dict[int, int]] = [{} for _ in shards]  # start -> end, past it
        self._cv = threading.Condition()
        self._halt = False

    def filled(self, shard: int, start: int, end: int) -> None:
        with self._cv:
            pending = self._pending[shard]
            pending[start] = end
            f = self._frontier[shard]
            while f in pending:
                f = pending.pop(f)
            if f != self._frontier[shard]:
                self._frontier[shard] = f
                self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._halt = True
            self._cv.notify_all()

    def run(self) -> None:
        try:
            for i, shard in enumerate(self.shards):
                h, done = hashlib.sha256(), 0
                while done < shard.size:
                    with self._cv:
                        while self._frontier[i] <= done and not self._halt:
                            self._cv.wait()
                        if self._halt:
                            return
                        upto = self._frontier[i]
                    while done < upto:
                        chunk = os.pread(self.fds[i], min(8 << 20, upto - done), done)
                        if not chunk:
                            raise OSError(f"{shard.filename}: short read while hashing")
                        h.update(chunk)
                        done += len(chunk)
                self.digests[i] = h.hexdigest()
        except BaseException as e:
            self.error = e

    def result(self) -> list[str]:
        """The digests, once every byte was reported (joins the thread; never waits for bytes
        that will not come).
        """
        with self._cv:
            complete = all(f == sh.size for f, sh in zip(self._frontier, self.shards, strict=True))
            if not complete:
                self._halt = True
                self._cv.notify_all()
        self.join()
        if self.error is not None:
            raise self.error
        if not complete or any(d is None for d in self.digests):
            raise MerganserError("internal: output shards were not completely written")
        return [d for d in self.digests if d is not None]


class AtomicOutput:
    """A temporary folder beside ``target`` that becomes ``target`` only when complete."""

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        _refuse_existing(self.target, force)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(self.target)
        self.tmp = (
            self.target.parent
            / f".{self.target.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        self.tmp.mkdir()
        self._fds: dict[int, int] = {}
        self.shards: list[Shard] = []
        self.slots: dict[str, Slot] = {}
        self._hasher: _ShardHasher | None = None
        self._shard_sha256: list[str] = []

    # -- tensors -----------------------------------------------------------------------------

    def open_shards(self, shards: list[Shard], slots: dict[str, Slot]) -> None:
        self.shards, self.slots = shards, slots
        for i, shard in enumerate(shards):
            fd = os.open(self.tmp / shard.filename, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds[i] = fd
            _pwrite_all(fd, shard.header, 0, shard.filename)
            os.ftruncate(fd, shard.size)
        hasher = _ShardHasher(dict(self._fds), shards)
        hasher.start()
        self._hasher = hasher  # only once started: abort() joins it

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write ``tensor`` (or a flat chunk of it beginning at element ``start``) in place."""
        slot = self.slots[name]
        if tensor.dtype != slot.dtype:
            raise MerganserError(
                f"internal: tensor {name} has dtype {tensor.dtype}, slot {slot.dtype}"
            )
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        offset = slot.offset + start * itemsize(slot.dtype)
        if offset + data.nbytes > slot.offset + slot.nbytes:
            raise MerganserError(f"internal: write past the end of tensor {name}")
        _pwrite_all(
            self._fds[slot.shard], memoryview(data), offset, self.shards[slot.shard].filename
        )
        if self._hasher is not None and data.nbytes:
            self._hasher.filled(slot.shard, offset, offset + data.nbytes)

    def close_shards(self) -> None:
        if self._hasher is not None:
            self._shard_sha256 = self._hasher.result()
            self._hasher = None
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    # -- finishing ---------------------------------------------------------------------------

    def write_file(self, name: str, content: str | bytes) -> None:
        data = content.encode() if isinstance(content, str) else content
        with open(self.tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or src.name))

    def verify_and_index(self) -> dict[str, Any]:
        """Re-check every shard header and write the index; return the shards' sha256 (hashed
        while they were written, see _ShardHasher).
        """
        manifest = {}
        for shard, digest in zip(self.shards, self._shard_sha256, strict=True):
            path = self.tmp / shard.filename
            infos, _ = read_header(path)
            if list(infos) != shard.names or path.stat().st_size != shard.size:
                raise MerganserError(f"{path}: written shard does not match its layout")
            manifest[shard.filename] = {"sha256": digest, "bytes": shard.size}
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.slots.values())},
                "weight_map": {n: s.filename for s in self.shards for n in s.names},
            }
            self.write_file(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return manifest

    def commit(self) -> None:
        """Move the finished folder into place (replacing the target only with --force)."""
        _fsync_dir(self.tmp)
        old = None
        if self.target.exists():
            _refuse_existing(self.target, self.force)
            if self.target.is_dir() and not any(self.target.iterdir()):
                self.target.rmdir()
            else:
                old = (
                    self.target.parent / f".{self.target.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}"
                )
                os.rename(self.target, old)
        # Nothing may interrupt the swap halfway, so termination signals wait for it.
        with _signals_deferred():
            os.rename(self.tmp, self.target)
            _fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self._hasher is not None:
            self._hasher.stop()
            self._hasher.join()
            self._hasher = None
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, what: str) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise MerganserError(f"{what}: write failed ({e.strerror})") from None


def _refuse_existing(target: Path, force: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise MerganserError(f"{target}: output path exists and is not a folder")
    if any(target.iterdir()) and not force:
        raise MerganserError(f"{target}: output folder exists and is not empty (use --force)")


def _remove_stale_tmp(target: Path) -> None:
    """Delete temporary folders left by merges into the same target whose process is gone."""
    prefix = f".{target.name}{_TMP_MARK}"
    for p in target.parent.glob(prefix + "*"):
        rest = p.name[len(prefix) :]
        pid = rest.split("-", 1)[0]
        if rest.startswith("old-") or (pid.isdigit() and not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _signals_deferred:
    """Hold SIGINT/SIGTERM during a critical section (main thread only), then re-deliver."""

    _SIGS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> None:
        import threading

        self._active = threading.current_thread() is threading.main_thread()
        if self._active:
            signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGS)

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._SIGS)
