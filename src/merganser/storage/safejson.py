"""Strict JSON for files a user (or an attacker) controls: one-line errors, explicit limits.

Python's ``json`` lets the last of two equal keys win, recurses until ``RecursionError`` on a
nesting bomb, and refuses integers of more than 4300 digits with a bare ``ValueError``. Each of
those is either a silent misreading or a traceback; here each is a ``ValueError`` whose message
fits in one line, for the caller to prefix with the file's name. No torch (pagecache uses this
before torch is imported).
"""

from __future__ import annotations

import json
from typing import Any

# Deeper than any real config, index, header or data line; far below Python's recursion limit.
MAX_DEPTH = 64


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def depth(value: Any) -> int:
    """How deeply lists and mappings nest in ``value`` (a scalar is 0); iterative, so a deep
    value cannot exhaust the stack.
    """
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items = list(v.values())
        elif isinstance(v, (list, tuple)):
            items = list(v)
        else:
            continue
        deepest = max(deepest, d)
        stack.extend((x, d + 1) for x in items)
    return deepest


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """``ValueError`` if ``value`` nests deeper than ``limit``."""
    if depth(value) > limit:
        raise ValueError(f"nested deeper than {limit} levels")


def loads(raw: str | bytes, limit: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """Parse JSON text, refusing duplicate keys, nesting deeper than ``limit``, NaN/Infinity
    literals (unless ``allow_nan``) and oversized integers, each with a one-line ``ValueError``.
    """

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    hooks: dict[str, Any] = {} if allow_nan else {"parse_constant": constant}
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates, **hooks)
    except RecursionError:
        raise ValueError(f"nested deeper than {limit} levels") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    except ValueError as e:  # duplicate keys, constants, integers over the digit limit
        raise ValueError(str(e).splitlines()[0] if str(e) else "not valid JSON") from None
    check_depth(value, limit)
    return value
