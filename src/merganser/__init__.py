"""merganser: merge the weights of fine-tuned neural networks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from merganser.api import MergeOptions, merge, merge_tensors
    from merganser.errors import MerganserError

__all__ = ["MerganserError", "MergeOptions", "__version__", "merge", "merge_tensors"]

_LAZY = {
    "MergeOptions": "merganser.api",
    "merge": "merganser.api",
    "merge_tensors": "merganser.api",
    "MerganserError": "merganser.errors",
}


def __getattr__(name: str) -> Any:
    # The API imports torch (about a second): `import merganser.cli` and `merganser --help`
    # must not pay for it before they know they need it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'merganser' has no attribute {name!r}")
