"""Files the user names, read safely: regular files only, with a size limit.

A FIFO in place of a file blocks the first read forever, and a device such as /dev/zero never
ends; either one turned a command into a hang. Everything merganser reads that a user names
(weights, configs, recipes, data) is checked here first. No torch (the prefetch runs before
torch is imported).
"""

from __future__ import annotations

import stat
from pathlib import Path

from merganser.errors import CheckpointError, MerganserError

MAX_TEXT_BYTES = 1 << 30  # a JSONL or text data file; larger is refused, not read into memory


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def regular_file(path: Path, error: type[MerganserError] = CheckpointError) -> int:
    """The size of ``path``, or one line unless it is a regular file (or a link to one)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: is {_kind(st.st_mode)}, expected a regular file")
    return st.st_size


def check_folder(folder: Path) -> None:
    """One line if any entry of ``folder`` other than a sub-folder is not a regular file:
    a loader that reads the folder (transformers) would hang on it.
    """
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            regular_file(p)


def read_text(
    path: str | Path,
    what: str = "file",
    limit: int = MAX_TEXT_BYTES,
    error: type[MerganserError] = MerganserError,
) -> str:
    """A UTF-8 text file's contents; any problem is one line naming the file."""
    p = Path(path)
    size = regular_file(p, error)
    if size > limit:
        raise error(f"{p}: {what} is larger than {limit >> 20} MiB")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{p}: cannot read {what} ({getattr(e, 'strerror', None) or e})") from None
