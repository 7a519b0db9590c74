"""Reading checkpoints lazily: headers first, then one tensor (or one slice of one) at a time.

Supported: Hugging Face folders (single or sharded safetensors, or torch .bin), single
.safetensors files, and .bin/.pt/.pth files through ``torch.load(weights_only=True)`` only.
Tensor data is read with ``preadv`` into private buffers rather than mmap, so the resident set
holds only the tensors in flight and not every page of every input that was ever touched. By
default ranges the page cache does not hold are read with O_DIRECT (see direct_io): a merge reads
each byte once, and filling the cache would cost more CPU than the merge.
"""

from __future__ import annotations

import errno
import os
import pickle
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from merganser.errors import CheckpointError, MerganserError
from merganser.storage import direct_io, pagecache, safejson
from merganser.storage.dtypes import itemsize
from merganser.storage.inputs import regular_file
from merganser.storage.pagecache import READ_MODES, ReadMode
from merganser.storage.safetensors_header import TensorInfo, read_header

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class Checkpoint:
    """One model's tensors, known from headers; data is read on demand."""

    def __init__(self, path: str | os.PathLike[str], read_mode: ReadMode = "auto"):
        if read_mode not in READ_MODES:
            expected = ", ".join(READ_MODES)
            raise MerganserError(f"read mode {read_mode!r}: expected one of {expected}")
        self.path = Path(path)
        self.read_mode = read_mode
        self.config: dict[str, Any] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}  # safetensors __metadata__ (of the files, merged)
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, int | None] = {}  # None: the file system refuses O_DIRECT
        self._refused: set[Path] = set()  # files whose O_DIRECT reads the device refused
        self._torch_state: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or directory")
        if not self.path.is_dir():
            regular_file(self.path)
        if self.path.is_dir():
            self._open_folder()
        else:
            self._open_file(self.path)
        if not self.tensors:
            raise CheckpointError(f"{self.path}: checkpoint holds no tensors")

    # -- discovery ---------------------------------------------------------------------------

    def _open_folder(self) -> None:
        folder = self.path
        cfg = folder / "config.json"
        if _present(cfg):
            self.config = _read_json(cfg)
            if not isinstance(self.config, dict):
                raise CheckpointError(f"{cfg}: expected a JSON object")
        if _present(folder / ST_INDEX):
            self._open_index(folder / ST_INDEX)
        elif _present(folder / "model.safetensors"):
            self._open_file(folder / "model.safetensors")
        elif _present(folder / BIN_INDEX):
            self._open_index(folder / BIN_INDEX)
        elif _present(folder / "pytorch_model.bin"):
            self._open_file(folder / "pytorch_model.bin")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(
                    f"{folder}: no model.safetensors, {ST_INDEX}, or pytorch_model.bin found"
                )
            for f in files:
                self._open_file(f)

    def _open_index(self, index_path: Path) -> None:
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to files")
        folder = index_path.parent.resolve()
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in by_file.items():
            shard = _inside(folder, fname, index_path)
            found = self._open_file(shard, only=set(names))
            missing = sorted(set(names) - found)
            if missing:
                raise CheckpointError(
                    f"{index_path}: tensor {missing[0]!r} is mapped to {fname} but is not in it"
                )

    def _open_file(self, path: Path, only: set[str] | None = None) -> set[str]:
        regular_file(path)
        if path.suffix == ".safetensors":
            infos, meta = read_header(path)
            self.metadata.update(meta)
        elif path.suffix in TORCH_SUFFIXES:
            infos = self._load_torch_file(path)
        else:
            raise CheckpointError(
                f"{path}: unsupported checkpoint format (expected .safetensors, .bin, .pt)"
            )
        found: set[str] = set()
        for name, info in infos.items():
            if only is not None and name not in only:
                continue
            if name in self.tensors:
                raise CheckpointError(
                    f"{path}: tensor {name!r} also appears in {self.tensors[name].file.name}"
                )
            self.tensors[name] = info
            found.add(name)
        return found

    def _load_torch_file(self, path: Path) -> dict[str, TensorInfo]:
        # weights_only=True refuses any pickle that would construct arbitrary objects or run code.
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds more than plain tensors "
                f"(weights_only=True: {first[:160]})"
            ) from None
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load torch checkpoint ({e})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self._torch_state[path] = tensors
        return {
            k: TensorInfo(k, v.dtype, tuple(v.shape), path, 0, v.numel() * v.element_size())
            for k, v in tensors.items()
        }

    # -- data --------------------------------------------------------------------------------

    def read(
        self,
        name: str,
        start: int = 0,
        count: int | None = None,
        out: torch.Tensor | None = None,
        again: bool = False,
    ) -> torch.Tensor:
        """Read tensor ``name`` (or elements [start, start+count) of it, flattened), into the
        bytes of ``out`` when given (a reused buffer spares the page faults of a fresh one).
        ``again``: the caller will read these bytes again, so in auto mode they go through the
        page cache.
        """
        return self._read_stored(self.tensors[name], name, start, count, out, again)

    def _read_stored(
        self,
        info: TensorInfo,
        name: str,
        start: int = 0,
        count: int | None = None,
        out: torch.Tensor | None = None,
        again: bool = False,
    ) -> torch.Tensor:
        """Checkpoint.read of the tensor ``info`` describes, as stored in its file."""
        whole = start == 0 and (count is None or count == info.numel)
        count = info.numel - start if count is None else count
        if info.file in self._torch_state:
            t = self._torch_state[info.file][name]
            out = t.reshape(-1)[start : start + count].clone()
            return out.reshape(info.shape) if whole else out
        size = itemsize(info.dtype)
        if count == 0:
            return torch.empty(info.shape if whole else (0,), dtype=info.dtype)
        # Uninitialised memory: the read overwrites every byte, so no zero-fill pass.
        buf = torch.empty(count * size, dtype=torch.uint8) if out is None else out.view(-1)
        buf = buf.view(torch.uint8)[: count * size]
        self._read_bytes(info.file, buf, info.start + start * size, again)
        out = buf.view(info.dtype)
        return out.reshape(info.shape) if whole else out

    def _read_bytes(self, path: Path, buf: torch.Tensor, offset: int, again: bool) -> None:
        fd = self._fd(path)
        if self.read_mode == "direct" or (
            self.read_mode == "auto"
            and not again
            and pagecache.resident(fd, offset, buf.numel()) is False
        ):
            direct = self._direct_fd(path)
            if direct is not None:
                try:
                    got = direct_io.pread_direct(direct, buf, offset)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise CheckpointError(f"{path}: read failed ({e.strerror})") from None
                    self._refused.add(path)  # alignment this device refuses: use the cache
                else:
                    if got < buf.numel():
                        raise CheckpointError(f"{path}: file ended early (truncated while reading)")
                    return
        _pread_exact(fd, memoryview(buf.numpy()), offset, path)

    def _direct_fd(self, path: Path) -> int | None:
        if path in self._refused:
            return None
        if path not in self._direct:
            with self._lock:
                if path not in self._direct:
                    self._direct[path] = direct_io.open_direct(path, os.O_RDONLY)
        return self._direct[path]

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as e:
                        raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
                    self._fds[path] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct.clear()
            self._torch_state.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor ``name`` is stored in (what an output keeps by default)."""
        return self.tensors[name].dtype

    # -- summaries ---------------------------------------------------------------------------

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def num_layers(self) -> int | None:
        if self.config and isinstance(self.config.get("num_hidden_layers"), int):
            return self.config["num_hidden_layers"]
        return None


def _pread_exact(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        try:
            n = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise CheckpointError(f"{path}: read failed ({e.strerror})") from None
        if n == 0:
            raise CheckpointError(f"{path}: file ended early (truncated while reading)")
        done += n


def _inside(folder: Path, fname: str, index_path: Path) -> Path:
    """Resolve an index entry, refusing anything that escapes the model folder.

    A Hugging Face cache snapshot (``<repo>/snapshots/<revision>/``) holds symbolic links into
    the same repository's ``<repo>/blobs/``; those are followed. The path returned keeps the
    entry's own name (a blob's name has no ``.safetensors`` suffix).
    """
    if os.path.isabs(fname) or ".." in Path(fname).parts:
        raise CheckpointError(f"{index_path}: weight_map names {fname!r}, outside the model folder")
    resolved = (folder / fname).resolve()
    allowed = [folder]
    if folder.parent.name == "snapshots":
        allowed.append(folder.parent.parent / "blobs")
    if not any(resolved.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index_path}: weight_map names {fname!r}, outside the model folder")
    return folder / fname


def _present(path: Path) -> bool:
    """Whether anything (a file, a FIFO, a broken link...) is at ``path``; what it is, is for
    ``regular_file`` to judge.
    """
    return path.is_symlink() or path.exists()


def _read_json(path: Path) -> Any:
    regular_file(path)
    try:
        return safejson.loads(path.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_same_tensors(
    ref: Path, a: Mapping[str, torch.Tensor], path: Path, b: Mapping[str, torch.Tensor]
) -> None:
    """One-line error unless ``b`` has every tensor of ``a``, each with the same shape."""
    for k, t in a.items():
        if k not in b:
            raise MerganserError(f"{path}: tensor {k!r} missing (present in {ref})")
        if b[k].shape != t.shape:
            raise MerganserError(
                f"{path}: tensor {k!r} has shape {list(b[k].shape)}, expected {list(t.shape)}"
            )
