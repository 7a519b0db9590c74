"""Calling transformers' loaders on local folders, with their failures as one line.

transformers raises whatever its loaders meet (OSError for a missing file, ValueError for a
tokenizer it cannot build, pickle.UnpicklingError for a .bin that holds more than tensors,
RuntimeError, KeyError...), with multi-line texts. A user's folder is input: each failure
becomes one line naming the folder. Remote code is never run (trust_remote_code stays off).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from merganser.errors import CheckpointError, MerganserError
from merganser.inputs import check_folder

T = TypeVar("T")

# A model's tokenizer and generation files, copied beside merged weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load(path: str | Path, what: str, loader: Callable[[], T]) -> T:
    """``loader()``, or one line naming ``path`` and ``what`` could not be loaded."""
    check_folder(Path(path))  # a FIFO or device in the folder would hang the loader
    try:
        return loader()
    except MerganserError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load {what}: the pickle holds more than plain tensors "
            f"(weights_only=True: {_first_line(e)})"
        ) from None
    except Exception as e:  # transformers' own failures, whatever their type
        raise CheckpointError(
            f"{path}: cannot load {what} with transformers ({type(e).__name__}: {_first_line(e)})"
        ) from None


def require_tokenizer(path: str | Path, why: str) -> None:
    """One line unless the folder has tokenizer files (``why``: what needs them)."""
    p = Path(path)
    if not any((p / f).is_file() for f in TOKENIZER_MARKERS):
        raise MerganserError(f"{p}: no tokenizer files; {why} needs the model's tokenizer")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no details"
