"""RegMean++ (Nguyen, Dang, Suzuki, Nguyen 2025, arXiv 2508.03121; spec-2 §5): RegMean whose
Grams come from the merged model's own stream.

RegMean merges each linear layer in closed form, W* = (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢᵀ, from the Grams of
the layer's inputs in each candidate model run alone. RegMean++ merges block by block: block
l's input for task i is what the *already merged* blocks 0..l-1 make of task i's data
(cross-layer), and inside the block each candidate's own sub-layers feed its later linears
(intra-layer). So it needs every candidate in memory and runs sequentially; it is a procedure
on modules, not a per-tensor method, and the tensor math is ``methods.regmean``'s.

Outside the blocks, the official code keeps the merged model's start (the pretrained model) for
everything after the blocks and averages what comes before (embeddings, pre-norm):
``tail="base"`` does that, ``tail="mean"`` averages everything (as FusionBench's RegMean).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from merganser.errors import MerganserError
from merganser.evaluation.forward import Batch, GramRecorder, call, linear_layers
from merganser.methods.regmean import regmean


class _Stop(Exception):
    """Ends a forward pass once the block being merged has its input."""


def find_blocks(model: nn.Module) -> str:
    """The name of the model's stack of blocks: its longest ``nn.ModuleList`` (the first of
    equal length), e.g. ``model.layers`` or ``vit.encoder.layer``."""
    best, size = "", 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > size:
            best, size = name, len(mod)
    if size == 0:
        raise MerganserError(
            "regmean_plusplus: the model has no nn.ModuleList of blocks; name one with blocks="
        )
    return best


def regmean_plusplus(
    models: Sequence[nn.Module],
    batches: Sequence[Sequence[Batch]],
    base: nn.Module | None = None,
    blocks: str | None = None,
    alpha: float = 0.95,
    ridge: float = 1e-6,
    tail: Literal["base", "mean"] | None = None,
    mask_padding: bool = True,
) -> dict[str, torch.Tensor]:
    """Merge ``models`` (one per task, same architecture) with RegMean++ on each task's
    ``batches`` (Nguyen et al. 2025, arXiv 2508.03121); returns the merged state dict.

    ``blocks`` names the ``nn.ModuleList`` merged sequentially (default: the longest). The
    official defaults are α = 0.95 (off-diagonal Gram scale) and 256 examples per task;
    ``ridge`` is ``methods.regmean``'s (0 reproduces ``torch.inverse`` where it exists).
    ``tail``: parameters after the blocks stay ``base``'s (official; the default with a base)
    or are averaged (the default without one).
    """
    if len(models) < 1 or len(batches) != len(models):
        raise MerganserError(
            f"regmean_plusplus: {len(models)} models need as many task batch lists "
            f"(got {len(batches)})"
        )
    if any(len(b) == 0 for b in batches):
        raise MerganserError("regmean_plusplus: every task needs at least one batch")
    tail = tail or ("base" if base is not None else "mean")
    if tail == "base" and base is None:
        raise MerganserError("regmean_plusplus: tail='base' needs base=")
    stack = blocks or find_blocks(models[0])
    n = len(models)
    weight = [1.0] * n
    merged = copy.deepcopy(base if base is not None else models[0]).eval()
    for m in models:
        m.eval()
    states = [dict(m.state_dict()) for m in models]
    prefix = f"{stack}."
    order = list(merged.state_dict())
    first = next((i for i, k in enumerate(order) if k.startswith(prefix)), None)
    if first is None:
        raise MerganserError(f"regmean_plusplus: {stack!r} holds no parameters")
    outside = {}
    for i, k in enumerate(order):
        if k.startswith(prefix) or not states[0][k].is_floating_point():
            continue
        if i < first or tail == "mean":
            outside[k] = torch.stack([s[k].float() for s in states]).mean(0).to(states[0][k].dtype)
    merged.load_state_dict(outside, strict=False)

    merged_blocks = merged.get_submodule(stack)
    own_blocks = [m.get_submodule(stack) for m in models]
    for layer in range(len(merged_blocks)):
        grams = []
        for task, own in zip(batches, own_blocks, strict=True):
            grams.append(_block_grams(merged, merged_blocks[layer], own[layer], task, mask_padding))
        block_states = [dict(own[layer].state_dict()) for own in own_blocks]
        lin = linear_layers(own_blocks[0][layer])
        new = {}
        for k, first_t in block_states[0].items():
            if not first_t.is_floating_point():
                continue
            ts = [s[k].float() for s in block_states]
            if k in lin and ts[0].dim() == 2:
                stats = [g.get(k) for g in grams]
                if any(g is None for g in stats):
                    raise MerganserError(
                        f"regmean_plusplus: {prefix}{layer}.{k} saw no input on some task"
                    )
                out = regmean(ts, weight, alpha, ridge, stats, in_out=lin[k][1])
            else:
                out = torch.stack(ts).mean(0)
            new[k] = out.to(first_t.dtype)
        merged_blocks[layer].load_state_dict(new, strict=False)
    return dict(merged.state_dict())


def _block_grams(
    merged: nn.Module,
    merged_block: nn.Module,
    own_block: nn.Module,
    task: Sequence[Batch],
    mask_padding: bool,
) -> dict[str, torch.Tensor]:
    """Mean input Grams of ``own_block``'s linears when it reads what the merged model feeds
    ``merged_block`` on ``task``'s batches."""
    recorder = GramRecorder(own_block, mask_padding)
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = merged_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in task:
                captured.clear()
                with contextlib.suppress(_Stop):
                    call(merged, batch)
                if not captured:
                    raise MerganserError("regmean_plusplus: a batch never reached the block")
                args, kwargs = captured[0]
                recorder.batch = batch
                own_block(*args, **kwargs)
                recorder.batch = None
    finally:
        handle.remove()
        recorder.close()
    return recorder.means()
