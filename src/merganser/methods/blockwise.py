"""Merging one tensor block by block: statistic passes over its blocks, then a merge pass.

The engine feeds a tensor's blocks in order as float32 ``(models, base)``. A method whose result
at an entry depends on whole-tensor quantities (a top-k threshold, an L1 norm) gathers them in
statistic passes first, so no float32 copy of a whole tensor is ever made and the working set
stays in the CPU cache. Each BlockMerge must give exactly the result of its whole-tensor function.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

# Entries per block: the engine feeds a block-wise merge's blocks at multiples of BLOCK, each
# BLOCK long but the tensor's last; a method whose statistics are sums defines them per BLOCK.
# A BlockMerge may ask for other blocks (``BlockMerge.block``: DELLA's hold whole rows).
BLOCK = 1 << 18


def sum64(x: torch.Tensor) -> float:
    """Σ x in float64; on the CPU by numpy's pairwise summation (the fused kernels repeat its
    order), one order whatever the thread settings; a GPU gives the same sum to float64
    rounding. A block statistic that the whole-tensor function must repeat bit for bit."""
    x = x.reshape(-1).double()
    return float(np.add.reduce(x.numpy())) if x.device.type == "cpu" else float(x.sum())


def sum_squares(x: torch.Tensor) -> float:
    """Σ x² of a float64 vector, summed as ``sum64`` sums."""
    return sum64(x.square())


def sum_blocks(
    x: torch.Tensor, part: Callable[[torch.Tensor], float] = sum64, block: int = BLOCK
) -> float:
    """Σ x as a block-by-block merge gathers it: ``part`` (by default ``sum64``) of each
    ``block`` entries of the flattened ``x``, added in order."""
    x = x.reshape(-1)
    total = 0.0
    for a in range(0, x.numel(), block):
        total += part(x[a : a + block])
    return total


# (positions inside the block, or None for all of it) -> the models' and base's values there.
Load = Callable[[torch.Tensor | None], tuple[list[torch.Tensor], torch.Tensor | None]]


class BlockMerge:
    """Base class: ``wants_pass(p)`` says whether statistic pass ``p`` runs; ``observe`` sees each
    block (or segment, see ``sampled``) of that pass in order; ``merge`` then maps each block, in
    order, to its result.
    """

    # Entries per block: blocks start at multiples of it, each this long but the tensor's last.
    block: int = BLOCK

    def wants_pass(self, p: int) -> bool:
        return False

    def sampled(self, p: int) -> bool:
        """Whether pass ``p`` only loads chosen positions: ``observe`` then sees each segment
        whole (fewer, larger gathers), and ``load`` must be given positions.
        """
        return False

    def observe(self, p: int, start: int, count: int, load: Load) -> None:
        raise NotImplementedError

    def end_pass(self, p: int) -> None:
        pass

    def merge(
        self, start: int, tensors: list[torch.Tensor], base: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def fused(self) -> bool:
        """Whether ``observe_raw`` and ``merge_raw`` serve this merge, given bfloat16 inputs
        and output (see methods/fused.py). The engine then calls them instead of ``observe`` and
        ``merge``, for every block (a sampled pass: every segment) of the tensor.
        """
        return False

    def observe_raw(
        self, p: int, start: int, tensors: list[torch.Tensor], base: torch.Tensor
    ) -> None:
        """``observe`` on stored bfloat16 values: a block's in an unsampled pass, the whole
        segment's in a sampled one.
        """
        raise NotImplementedError

    def merge_raw(
        self, start: int, tensors: list[torch.Tensor], base: torch.Tensor, out: torch.Tensor
    ) -> bool:
        """``merge`` of a block's stored bfloat16 values into the bfloat16 ``out``; False if a
        result is not finite.
        """
        raise NotImplementedError
