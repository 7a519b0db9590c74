"""Parameter definitions shared by several methods (same names and defaults as mergekit)."""

from __future__ import annotations

from merganser.methods.registry import Param

WEIGHT = Param("weight", "model", 1.0, doc="scale of this model's contribution")
DENSITY = Param("density", "model", 1.0, low=0.0, high=1.0, doc="fraction of the task vector kept")
LAMBDA = Param("lambda", "global", 1.0, doc="scale of the merged task vector")


def normalize(default: bool, paper: bool | None = None) -> Param:
    """``normalize`` with mergekit's default for the method and, where it differs, the paper's."""
    return Param(
        "normalize",
        "global",
        default,
        kind=bool,
        paper=paper,
        doc="divide by the summed weight of the contributing models",
    )


def rescale(default: str, paper: str | None = None) -> Param:
    """``rescale`` with mergekit's default for the method and, where it differs, the paper's."""
    return Param(
        "rescale",
        "global",
        default,
        kind=str,
        paper=paper,
        choices=("l1", "inverse", "none"),
        bool_map=("none", "l1"),
        doc="after dropping: l1 = match the L1 norm (mergekit), inverse = divide by the keep "
        "probability (paper), none",
    )
