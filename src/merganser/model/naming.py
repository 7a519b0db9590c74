"""Conventions read off tensor names: layer index and depth within the layer stack."""

from __future__ import annotations

import re

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
# A Llama decoder block's tensor, exactly: what alignment and zipping move block by block.
LLAMA_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def depth(name: str, num_layers: int) -> float:
    """mergekit 0.1.5's t for gradients: idx/(L−1) inside the layer stack (1 for a single layer)
    and 0 for every tensor outside it (embeddings, final norm and head alike).
    """
    idx = layer_index(name)
    if idx is None:
        return 0.0
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def is_layer_linear(name: str, ndim: int) -> bool:
    """A 2-D weight inside the layer stack (attention and MLP projections)."""
    return ndim == 2 and name.endswith("weight") and layer_index(name) is not None


def layer_of(name: str) -> int | None:
    """Llama block index of a tensor, or None for embeddings, final norm and lm_head."""
    m = LLAMA_BLOCK.fullmatch(name)
    return int(m.group(1)) if m else None
