"""Pieces shared by the singular-vector methods (tsv_m.py, iso.py)."""

from __future__ import annotations

import torch

from merganser.methods.registry import Param

MATRIX = Param(
    "matrix",
    "global",
    True,
    kind=bool,
    doc="merge 2-D tensors by their singular vectors; false (set with a filter, e.g. for "
    "heads or text_projection) averages the task vectors instead",
)


def polar(x: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows): u·vh of x's SVD (orthogonal
    Procrustes).
    """
    u, _, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ vh
