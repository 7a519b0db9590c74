"""Stored weight formats that are not plain floats, turned into float32 as they are read."""

from __future__ import annotations

import torch


def dequantize_fp8_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]
) -> torch.Tensor:
    """W = fp8 · scale_inv, one scale per ``block`` of rows × columns (the last blocks may be
    partial), as DeepSeek-V3 and Qwen FP8 checkpoints store it; float32 out.
    """
    rows, cols = weight.shape
    b0, b1 = block
    s = scale_inv.float()
    s = s.repeat_interleave(b0, dim=0)[:rows].repeat_interleave(b1, dim=1)[:, :cols]
    return weight.float() * s
