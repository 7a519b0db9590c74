"""Merge methods. Importing this package registers every built-in method.

Each method is a module of this package that calls ``register``; the modules are discovered,
not listed, so adding a method is adding its file. Modules whose names start with ``_`` (the
fused kernels and their codes) are helpers that a method imports itself.
"""

import importlib
import pkgutil

from merganser.methods.registry import (
    IGNORED_PARAMS,
    Method,
    Param,
    all_methods,
    as_bool,
    get_method,
    markdown_table,
    method_json,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "IGNORED_PARAMS",
    "Method",
    "Param",
    "all_methods",
    "as_bool",
    "get_method",
    "markdown_table",
    "method_json",
]
