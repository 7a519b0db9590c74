"""What every search strategy is handed: a batch scorer on the dev split and a report hook."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

StateDict = Mapping[str, torch.Tensor]


class Scorer(Protocol):
    def __call__(self, candidates: Sequence[StateDict]) -> list[float]:
        """Dev-split fitness of each candidate (higher is better), evaluated in parallel."""
        ...

    def generation(self, gen: int, best: StateDict, best_dev: float) -> None:
        """Called after every generation with the best candidate so far (by dev)."""
        ...


class Flat:
    """The floating-point tensors of a state dict as one float32 vector, and back."""

    def __init__(self, like: StateDict):
        self.like = like
        self.keys = [k for k, v in like.items() if v.is_floating_point()]
        self.shapes = [like[k].shape for k in self.keys]
        self.sizes = [like[k].numel() for k in self.keys]
        self.size = sum(self.sizes)

    def flatten(self, sd: StateDict) -> torch.Tensor:
        return torch.cat([sd[k].reshape(-1).float() for k in self.keys])

    def unflatten(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in self.like.items() if not v.is_floating_point()}
        for k, part, shape in zip(self.keys, vec.split(self.sizes), self.shapes, strict=True):
            out[k] = part.view(shape)
        return out


@dataclass
class SearchResult:
    """The best candidate by dev, the dev score it started from, and what happened on the way."""

    best: dict[str, torch.Tensor]
    dev: float
    start_dev: float
    evaluations: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
