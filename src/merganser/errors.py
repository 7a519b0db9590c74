"""User-facing errors: each one is a single line naming the file or key and what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MerganserError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class RecipeError(MerganserError):
    """The recipe is malformed or asks for something impossible."""


class CheckpointError(MerganserError):
    """A checkpoint is missing, unreadable, inconsistent or unsafe."""


def size_text(n: float) -> str:
    """A byte count for a message, in the unit that shows it: 512 B, 3.0 KiB, 12.4 MiB,
    1.25 GiB (never "0.00 GiB" for a small size).
    """
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return (
                f"{n / scale:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n / scale:.1f} {unit}"
            )
    return f"{int(n)} B"


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or nothing."""
    close = difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
