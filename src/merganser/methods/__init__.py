"""Merge methods. Importing this package registers every built-in method."""

from merganser.methods import linear, passthrough, task_arithmetic
from merganser.methods.registry import IGNORED_PARAMS, Method, Param, all_methods, get_method

__all__ = [
    "IGNORED_PARAMS",
    "Method",
    "Param",
    "all_methods",
    "get_method",
    "linear",
    "passthrough",
    "task_arithmetic",
]
