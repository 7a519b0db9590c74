"""Merge methods. Importing this package registers every built-in method."""

from merganser.methods import (
    breadcrumbs,
    dare,
    della,
    dppa,
    fisher,
    karcher,
    linear,
    model_stock,
    passthrough,
    reborn,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from merganser.methods.registry import IGNORED_PARAMS, Method, Param, all_methods, get_method

__all__ = [
    "IGNORED_PARAMS",
    "Method",
    "Param",
    "all_methods",
    "breadcrumbs",
    "dare",
    "della",
    "dppa",
    "fisher",
    "get_method",
    "karcher",
    "linear",
    "model_stock",
    "passthrough",
    "reborn",
    "regmean",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]
