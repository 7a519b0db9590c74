"""Writing merged checkpoints: sharded safetensors into a temporary folder, renamed when verified.

The shard layout (which tensor goes to which file at which offset) is fixed from shapes and
dtypes before any data exists, so each tensor is staged at its place the moment it is computed,
in any order, and the bytes are identical whatever the thread scheduling. Staged blocks go to
disk in file order as they complete (see _ShardStream).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from blake3 import blake3

from merganser.errors import MerganserError
from merganser.storage.direct_io import ALIGN, aligned_buffer, open_direct
from merganser.storage.dtypes import TORCH_TO_ST, itemsize
from merganser.storage.safetensors_header import read_header

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "merganser_manifest.json"
RECIPE_NAME = "merganser_recipe.yaml"
# Each shard's checksum in the manifest: BLAKE3 of the whole file, as `b3sum` computes it. It is
# hashed behind the write frontier while the merge runs; sha256 cost 2.5x the CPU there.
SHARD_DIGEST = "blake3"
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


# Staging blocks: each shard is assembled in memory in blocks of STAGE_BLOCK bytes (a multiple
# of any device's block size, as O_DIRECT requires), at most STAGE_LIMIT of them at once.
STAGE_BLOCK = 4 << 20
# Eight blocks rather than 16 took 16-32 MB off the peak RSS of small merges, at the same
# speed warm and cold (1B TIES and SLERP).
STAGE_LIMIT = 8
WRITE_DEPTH = 4


class _ShardStream(threading.Thread):
    """Assembles each shard in aligned blocks, then hashes and writes the blocks in file order.

    Writers copy their bytes into staging blocks, in any order and from any thread. This thread
    takes each shard's blocks in file order as they complete, feeds them to BLAKE3 while they
    are in memory, and has WRITE_DEPTH threads write them with O_DIRECT where the file system
    allows it: the copy into the page cache, and reading it back to hash, had cost as much CPU
    as the merge itself.
    Writers wait while STAGE_LIMIT blocks are staged, except for the block this thread needs
    next; its bytes come from the oldest unfinished write, so that write always proceeds.
    """

    def __init__(self, fds: dict[int, int], direct: dict[int, int], shards: list[Shard]):
        super().__init__(name="shard-writer", daemon=True)
        self.fds, self.direct, self.shards = fds, direct, shards
        self.digests: list[str | None] = [None] * len(shards)
        self.error: BaseException | None = None
        self._blocks: dict[tuple[int, int], list[Any]] = {}  # (shard, block) -> [buffer, filled]
        self._pool: list[tuple[mmap.mmap, torch.Tensor]] = []
        self._staged = 0
        self._next = (0, 0)  # the block this thread writes next
        self._cv = threading.Condition()
        self._halt = False
        # The write pool's queue has no bound, and writers may always stage the block the
        # stream needs next, so hashed blocks waiting to be written would pile up behind a slow
        # disk (148 blocks, 0.6 GB, in a 1B merge whose inputs were cached). The stream waits
        # for a free write thread before it moves on: at most STAGE_LIMIT + WRITE_DEPTH + 1
        # blocks are staged.
        self._writing = threading.Semaphore(WRITE_DEPTH)

    def _length(self, shard: int, block: int) -> int:
        return min(STAGE_BLOCK, self.shards[shard].size - block * STAGE_BLOCK)

    def _header_bytes(self, shard: int, block: int) -> int:
        """How many bytes of ``block`` are the shard's header (counted as filled from the start;
        this thread copies them in before the block goes out).
        """
        start = block * STAGE_BLOCK
        return max(0, min(len(self.shards[shard].header), start + STAGE_BLOCK) - start)

    def _entry(self, shard: int, block: int) -> list[Any]:
        """The staging entry of a block, allocated once there is room (call with the lock)."""
        # Another writer may create the entry while this one waits, so look again after each.
        while (entry := self._blocks.get((shard, block))) is None:
            if isinstance(self.error, MerganserError):
                raise self.error
            if self.error is not None:
                raise MerganserError(f"output writer failed ({self.error})")
            if self._halt:
                raise MerganserError("output writes cancelled")
            if self._staged < STAGE_LIMIT or (shard, block) <= self._next:
                break
            self._cv.wait()
        if entry is not None:
            return entry
        buf = self._pool.pop() if self._pool else aligned_buffer(STAGE_BLOCK)
        entry = self._blocks[shard, block] = [buf, self._header_bytes(shard, block)]
        self._staged += 1
        return entry

    def put(self, shard: int, offset: int, data: torch.Tensor) -> None:
        """Stage ``data`` (flat bytes) at ``offset`` of ``shard``."""
        pos, end = offset, offset + data.numel()
        while pos < end:
            b = pos // STAGE_BLOCK
            b_start = b * STAGE_BLOCK
            seg_end = min(end, b_start + self._length(shard, b))
            with self._cv:
                entry = self._entry(shard, b)
            # Outside the lock: writers fill disjoint ranges, and the block is only taken once
            # every byte of it is counted below.
            entry[0][1][pos - b_start : seg_end - b_start].copy_(
                data[pos - offset : seg_end - offset]
            )
            with self._cv:
                entry[1] += seg_end - pos
                if entry[1] == self._length(shard, b):
                    self._cv.notify_all()
            pos = seg_end

    def stop(self) -> None:
        with self._cv:
            self._halt = True
            self._cv.notify_all()

    def run(self) -> None:
        # Several O_DIRECT writes in flight: one at a time ran at a quarter of the disk's speed
        # while the inputs were being read.
        writes = ThreadPoolExecutor(WRITE_DEPTH, thread_name_prefix="shard-write")
        try:
            for i, shard in enumerate(self.shards):
                header = torch.frombuffer(bytearray(shard.header), dtype=torch.uint8)
                h = blake3()
                for b in range(-(-shard.size // STAGE_BLOCK)):
                    n = self._length(i, b)
                    with self._cv:
                        if self._header_bytes(i, b) == n:  # no writer will stage this one
                            self._entry(i, b)
                        while (entry := self._blocks.get((i, b))) is None or entry[1] < n:
                            if self._halt or self.error is not None:
                                return
                            self._cv.wait()
                    if head := self._header_bytes(i, b):
                        start = b * STAGE_BLOCK
                        entry[0][1][:head].copy_(header[start : start + head])
                    h.update(entry[0][1][:n].numpy())
                    self._writing.acquire()
                    # Move on before the write can free the block: result() reads a missing
                    # block at or after _next as not yet staged, and would halt the stream.
                    with self._cv:
                        self._next = (i, b + 1)
                        self._cv.notify_all()
                    writes.submit(self._write_and_free, i, b, entry, n)
                self.digests[i] = h.hexdigest()
                with self._cv:
                    self._next = (i + 1, 0)
                    self._cv.notify_all()
        except BaseException as e:
            self._fail(e)
        finally:
            writes.shutdown(wait=True)

    def _fail(self, e: BaseException) -> None:
        with self._cv:
            if self.error is None:
                self.error = e
            self._cv.notify_all()

    def _write_and_free(self, shard: int, block: int, entry: list[Any], n: int) -> None:
        """Write a hashed block, then give its buffer back (on a write thread)."""
        try:
            if self.error is None and not self._halt:
                self._write(shard, block * STAGE_BLOCK, entry[0][0], n)
        except BaseException as e:
            self._fail(e)
        finally:
            with self._cv:
                del self._blocks[shard, block]
                self._pool.append(entry[0])
                self._staged -= 1
                self._cv.notify_all()
            self._writing.release()

    def _write(self, shard: int, offset: int, buf: mmap.mmap, n: int) -> None:
        view = memoryview(buf)[:n]
        what = self.shards[shard].filename
        direct = self.direct.get(shard)
        done = 0
        if direct is not None and n >= ALIGN:
            try:
                done = os.pwrite(direct, view[: n // ALIGN * ALIGN], offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise MerganserError(f"{what}: write failed ({e.strerror})") from None
                # Alignment this device refuses: write the rest through the page cache.
                self.direct.clear()
        if done < n:
            _pwrite_all(self.fds[shard], view[done:], offset + done, what)
            _start_writeback(self.fds[shard], offset + done, n - done)
        view.release()

    def result(self) -> list[str]:
        """The digests, once every byte was staged (joins the thread; never waits for bytes
        that will not come).
        """
        with self._cv:
            complete = self._next >= (len(self.shards), 0) or self.error is not None
            if not complete and not self._waiting_only_on_written():
                self._halt = True
                self._cv.notify_all()
        self.join()
        if self.error is not None:
            raise self.error
        if any(d is None for d in self.digests):
            raise MerganserError("internal: output shards were not completely written")
        return [d for d in self.digests if d is not None]

    def _waiting_only_on_written(self) -> bool:
        """Whether every block from the next one on is staged in full (so the thread will end)."""
        i, b = self._next
        while i < len(self.shards):
            nblocks = -(-self.shards[i].size // STAGE_BLOCK)
            while b < nblocks:
                entry = self._blocks.get((i, b))
                filled = self._header_bytes(i, b) if entry is None else entry[1]
                if filled < self._length(i, b):
                    return False
                b += 1
            i, b = i + 1, 0
        return True


class AtomicOutput:
    """A temporary folder beside ``target`` that becomes ``target`` only when complete.

    Every file and the folder reach the disk (fsync) before the rename that publishes them, so
    not even a power cut leaves a partial output under the target's name.
    """

    def __init__(self, target: Path, force: bool = False):
        self.target = Path(target).absolute()
        self.force = force
        guard_output(self.target, (), force)
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
        self._direct: dict[int, int] = {}
        self._stream: _ShardStream | None = None
        self._shard_digests: list[str] = []

    # -- tensors -----------------------------------------------------------------------------

    def open_shards(self, shards: list[Shard], slots: dict[str, Slot]) -> None:
        self.shards, self.slots = shards, slots
        for i, shard in enumerate(shards):
            path = self.tmp / shard.filename
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            self._fds[i] = fd
            _preallocate(fd, shard.size)
            direct = open_direct(path, os.O_WRONLY)
            if direct is not None:
                self._direct[i] = direct
        stream = _ShardStream(dict(self._fds), dict(self._direct), shards)
        stream.start()
        self._stream = stream  # only once started: abort() joins it

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write ``tensor`` (or a flat chunk of it beginning at element ``start``) in place."""
        slot = self.slots[name]
        if tensor.dtype != slot.dtype:
            raise MerganserError(
                f"internal: tensor {name} has dtype {tensor.dtype}, slot {slot.dtype}"
            )
        data = tensor.contiguous().reshape(-1).view(torch.uint8)
        offset = slot.offset + start * itemsize(slot.dtype)
        if offset + data.numel() > slot.offset + slot.nbytes:
            raise MerganserError(f"internal: write past the end of tensor {name}")
        if self._stream is None:
            raise MerganserError("internal: write before open_shards")
        self._stream.put(slot.shard, offset, data)

    def cancel_writes(self) -> None:
        """Make writes that wait for staging space fail now (a failed merge must unwind)."""
        if self._stream is not None:
            self._stream.stop()

    def close_shards(self) -> None:
        if self._stream is not None:
            self._shard_digests = self._stream.result()
            self._stream = None
        for fd in self._direct.values():
            os.close(fd)
        self._direct.clear()
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
        dest = self.tmp / (name or src.name)
        shutil.copyfile(src, dest)
        _fsync_path(dest)

    def verify_and_index(self) -> dict[str, Any]:
        """Re-check every shard header and write the index; return the shards' BLAKE3 digests
        (hashed while they were written, see _ShardStream).
        """
        manifest = {}
        for shard, digest in zip(self.shards, self._shard_digests, strict=True):
            path = self.tmp / shard.filename
            infos, _ = read_header(path)
            if list(infos) != shard.names or path.stat().st_size != shard.size:
                raise MerganserError(f"{path}: written shard does not match its layout")
            manifest[shard.filename] = {SHARD_DIGEST: digest, "bytes": shard.size}
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.slots.values())},
                "weight_map": {n: s.filename for s in self.shards for n in s.names},
            }
            self.write_file(INDEX_NAME, json.dumps(index, indent=2) + "\n")
        return manifest

    def commit(self) -> None:
        """Move the finished folder into place (replacing the target only with --force)."""
        guard_output(self.target, (), self.force)  # it may have appeared meanwhile
        _swap_in(self.tmp, self.target)

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.stop()
            self._stream.join()
            self._stream = None
        for fd in [*self._fds.values(), *self._direct.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self._direct.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Make ``tmp`` (a finished file, or a folder of files) ``target``: its bytes reach the disk
    first, and a previous ``target`` is swapped out whole, so ``target`` is never partial.
    """
    for f in sorted(tmp.iterdir()) if tmp.is_dir() else [tmp]:
        if f.is_file():
            _fsync_path(f)
    _swap_in(tmp, target)


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the synced ``tmp`` to ``target``, moving a previous target aside first and
    deleting it after, and sync the folders the renames changed.
    """
    if tmp.is_dir():
        _fsync_path(tmp)
    old = None
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    elif target.is_dir() or (target.exists() and tmp.is_dir()):
        # rename() replaces only a file with a file: anything else is moved aside whole.
        old = target.parent / f".{target.name}{_TMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
    # Nothing may interrupt the swap halfway, so termination signals wait for it.
    with _signals_deferred():
        os.rename(tmp, target)
        _fsync_path(target.parent)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink(missing_ok=True)


def file_digest(path: Path, algorithm: str = SHARD_DIGEST, block: int = 8 << 20) -> str:
    """Hex digest of a whole file: "blake3" (what `b3sum` prints) or "sha256" (older manifests)."""
    h = blake3() if algorithm == "blake3" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _preallocate(fd: int, size: int) -> None:
    """Give the file its full size, reserving its blocks where the file system can: writes into
    reserved blocks cost a fraction of the CPU, and a full disk fails here, before any work.
    """
    fallocate = getattr(os, "posix_fallocate", None)  # not on macOS
    try:
        if fallocate is not None:
            fallocate(fd, 0, size)
            return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    os.ftruncate(fd, size)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        f = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux
        return None
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    f.restype = ctypes.c_int
    return f


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing ``nbytes`` at ``offset`` to disk without waiting, so that the fsync at the
    end finds little left to do (Linux; elsewhere the fsync does it all).
    """
    if _SYNC_FILE_RANGE is not None and nbytes > 0:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int, what: str) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        try:
            done += os.pwrite(fd, view[done:], offset + done)
        except OSError as e:
            raise MerganserError(f"{what}: write failed ({e.strerror})") from None


def guard_output(
    target: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]],
    force: bool,
    kind: str = "folder",
) -> Path:
    """The one check every command that writes makes before any work: ``target`` overlaps no
    input (is not one, is not inside one, does not hold one), and an existing target is
    replaced only with ``force`` (an empty folder counts as free). ``kind``: "folder" or
    "file", what the command writes. Returns ``target`` as an absolute path.
    """
    t = Path(target).absolute()
    resolved = t.resolve()
    for ref in inputs:
        p = Path(ref).resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise MerganserError(f"{target}: output path overlaps input {ref}")
    if t.is_symlink() or t.exists():
        if kind == "folder" and t.is_dir() and not t.is_symlink():
            if any(t.iterdir()) and not force:
                raise MerganserError(
                    f"{target}: output folder exists and is not empty (use --force)"
                )
        elif kind == "file" and t.is_dir():
            raise MerganserError(f"{target}: is a folder, expected a file to write")
        elif kind == "folder":
            raise MerganserError(f"{target}: output path exists and is not a folder")
        elif not force:
            raise MerganserError(f"{target}: output file exists (use --force)")
    return t


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


def _fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries, to the disk."""
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
