"""The page cache: what it holds, and filling it with a merge's first input bytes while a command
starts up.

A command-line merge spends a second or two importing torch before it reads anything, with
one core busy and the disk idle. ``Prefetch`` reads the inputs' leading bytes meanwhile, in the
order the engine will ask for them, and the engine then finds those ranges cached (Checkpoint
reads resident ranges through the cache). No torch here: this runs before torch is imported.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import platform
import stat
import sys
import threading
from pathlib import Path
from typing import Literal, get_args

from merganser.storage import safejson

# cachestat(2), Linux 6.5+; the number is the generic table's, which these machines use.
_CACHESTAT = 451 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else 0
_syscall = ctypes.CDLL(None, use_errno=True).syscall if _CACHESTAT else None
_no_cachestat = threading.Event()

# How merges read their inputs. auto: through the page cache where it holds the range, else
# O_DIRECT; cache: always the page cache (keeps the inputs cached for the next run); direct:
# always O_DIRECT where the file system can.
ReadMode = Literal["auto", "cache", "direct"]
READ_MODES: tuple[str, ...] = get_args(ReadMode)


class _CacheRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def cached(fd: int, offset: int, n: int) -> int | None:
    """How many bytes of [offset, offset+n) of ``fd`` the page cache holds (or is reading in),
    in whole pages; None where the kernel cannot tell (cachestat(2) missing).
    """
    if _syscall is None or _no_cachestat.is_set():
        return None
    first, end = offset // mmap.PAGESIZE, -(-(offset + n) // mmap.PAGESIZE)
    rng, st = _CacheRange(first * mmap.PAGESIZE, (end - first) * mmap.PAGESIZE), _CacheStat()
    if _syscall(ctypes.c_long(_CACHESTAT), fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):  # old kernel, or seccomp
            _no_cachestat.set()
        return None
    return min(st.cache * mmap.PAGESIZE, n)


def resident(fd: int, offset: int, n: int) -> bool | None:
    """Whether the page cache holds every page of bytes [offset, offset+n) of ``fd``; None
    where the kernel cannot tell (cachestat(2) missing).
    """
    got = cached(fd, offset, n)
    return None if got is None else got >= n


def prefetch_limit() -> int:
    """Bytes a prefetch may read: a quarter of the free memory, at most 4 GiB (the cache must
    still hold them when the merge gets there).
    """
    try:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0
    return min(4 << 30, free // 4)


def weight_files(model: Path) -> list[Path]:
    """A model's safetensors files in the order a merge plan reads them (by path), as far as
    can be told without parsing headers: best effort, for prefetching only. Anything odd (an
    unreadable index, a path too long, a FIFO) gives fewer files, never an error: the merge
    itself reports it.
    """
    try:
        if model.is_file():
            return [model]
        index = model / "model.safetensors.index.json"
        try:
            weight_map = safejson.loads(index.read_bytes())["weight_map"]
            names = {v for v in weight_map.values() if isinstance(v, str) and "/" not in v}
            return sorted(model / n for n in names)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass
        single = model / "model.safetensors"
        return [single] if single.is_file() else sorted(model.glob("*.safetensors"))
    except (OSError, ValueError):
        return []


class Prefetch:
    """Reads the leading bytes of each model's weight files into the page cache on a thread,
    the models side by side (as a merge's first items read them), until ``stop`` or ``limit``
    bytes in all. Ranges already cached are skipped, not read again.

    Where the kernel takes read-ahead requests (POSIX_FADV_WILLNEED), the thread queues reads
    and returns rather than reading: the disk keeps busy while it waits for the GIL, which
    the importing main thread holds for long stretches, and no byte is copied. At most
    ``WINDOW`` bytes are queued at once, so the import's own page faults do not wait behind
    a deep queue.
    """

    PIECE = 16 << 20
    WINDOW = 128 << 20

    def __init__(self, models: list[list[Path]], limit: int):
        self.models = [m for m in models if m]
        self.limit = limit
        self.done = 0  # bytes read or queued from the disk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop after the read in flight; the bytes read or queued."""
        self._stop.set()
        self._thread.join()
        return self.done

    def _run(self) -> None:
        buf = memoryview(bytearray(self.PIECE))
        streams = [
            _Stream(files, max(self.PIECE, self.WINDOW // len(self.models)))
            for files in self.models
        ]
        try:
            while streams and not self._stop.is_set() and self.done < self.limit:
                for s in list(streams):
                    if self._stop.is_set() or self.done >= self.limit:
                        break
                    got = s.next_piece(buf)
                    if got is None:
                        streams.remove(s)
                    else:
                        self.done += got
        finally:
            for s in streams:
                s.close()


class _Stream:
    """One model's files, read front to back a piece at a time."""

    def __init__(self, files: list[Path], window: int):
        self.files = list(files)
        self.fd: int | None = None
        self.offset = self.size = 0
        self.advise = hasattr(os, "posix_fadvise")
        self.window = window
        self.queued: collections.deque[tuple[int, int]] = collections.deque()  # (start, end)

    def next_piece(self, buf: memoryview) -> int | None:
        """Read or queue the next piece unless cached; its bytes, or None once all are read."""
        while True:
            if self.fd is None:
                if not self.files:
                    return None
                try:
                    # Non-blocking: opening a FIFO for reading would wait for a writer forever.
                    self.fd = os.open(self.files.pop(0), os.O_RDONLY | os.O_NONBLOCK)
                    st = os.fstat(self.fd)
                except (OSError, ValueError):  # ValueError: a NUL in the path
                    continue  # the merge itself reports missing, unreadable or bad paths
                if not stat.S_ISREG(st.st_mode):
                    self.close()  # a FIFO, device or folder: the merge itself refuses it
                    continue
                self.size = st.st_size
                self.offset = 0
            n, got = min(len(buf), self.size - self.offset), 0
            try:
                if n > 0 and not resident(self.fd, self.offset, n):
                    if self.advise:
                        n = got = self._advise(n) or n
                    if not self.advise:
                        n = got = os.preadv(self.fd, [buf[:n]], self.offset)
            except OSError:
                n = 0
            if n > 0:
                self.offset += n
                return got
            self.close()

    def _advise(self, n: int) -> int:
        """Queue the next ``n`` bytes for reading; the bytes the kernel took on (it caps one
        request at its read-ahead size), or 0 where none show up in the cache (no read-ahead
        here): reads are used from then on.
        """
        assert self.fd is not None
        while self.queued and self.offset + n - self.queued[0][0] > self.window:
            # A read of a queued piece's last byte returns once the kernel has read it in.
            os.pread(self.fd, 1, self.queued.popleft()[1] - 1)
        os.posix_fadvise(self.fd, self.offset, n, os.POSIX_FADV_WILLNEED)
        got = cached(self.fd, self.offset, n)
        if not got:
            self.advise = False
            return 0
        self.queued.append((self.offset, self.offset + got))
        return got

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.queued.clear()
