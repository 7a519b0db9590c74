"""`merganser calibrate`: run a model over data and keep what data-aware merges need.

Forward hooks on every ``nn.Linear`` accumulate the Gram matrix XᵀX of the layer's input
(RegMean, spec §9), summed in float64 and divided by the number of rows; one backward pass
per example accumulates the diagonal Fisher (spec §10). Only these per-layer statistics are
held, never activations per example, so memory is bounded by the model plus the Grams.

Statistics go to one safetensors file per model: ``gram.<weight name>`` (in × in) and
``fisher.<parameter name>`` (the parameter's shape), with the counts in its metadata, so they
can be reused across merges.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import LoadedModel, load_model, pad_batches, read_jsonl
from merganser.pipeline.device import check_device
from merganser.storage.inputs import read_text
from merganser.storage.writer import guard_output, publish

FORMAT = "merganser-statistics-1"


@dataclass(frozen=True)
class CalibrationOptions:
    examples: int = 256  # sequences read at most
    batch: int = 16
    grams: bool = True
    fisher: bool = False
    fisher_labels: str = "sampled"  # sampled from the model (true Fisher) | empirical (data)
    mask_padding: bool = True  # False reproduces the RegMean code (padding rows counted)
    seed: int = 0
    progress: bool | None = None
    device: str = "cpu"  # where the forward/backward passes and the sums run (cpu, cuda[:N])
    force: bool = False  # replace an existing statistics file


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """Calibration texts: JSONL of ``{prompt, answer}`` or ``{text}`` objects, or lines of text."""
    p = Path(path)
    if p.suffix != ".jsonl":
        return [line for line in read_text(p, "data file").splitlines() if line.strip()]
    out = []
    for where, obj in read_jsonl(p):
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            out.append(obj["text"])
        elif (
            isinstance(obj, dict)
            and isinstance(obj.get("prompt"), str)
            and isinstance(obj.get("answer"), str)
        ):
            out.append(obj["prompt"] + obj["answer"])
        else:
            raise MerganserError(f'{where}: expected {{"text"}} or {{"prompt", "answer"}} strings')
    return out


def calibrate(
    model: str | os.PathLike[str] | LoadedModel,
    texts: Sequence[str],
    out: str | os.PathLike[str] | None = None,
    options: CalibrationOptions | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Input Grams of every linear layer and/or the diagonal Fisher of a causal LM on ``texts``.

    Returns ``(tensors, metadata)`` and, given ``out``, writes them atomically as safetensors.
    """
    o = options or CalibrationOptions()
    if not (o.grams or o.fisher):
        raise MerganserError("calibrate: nothing to compute (enable grams or fisher)")
    if o.fisher_labels not in ("sampled", "empirical"):
        raise MerganserError(
            f"--fisher-labels: expected sampled or empirical, got {o.fisher_labels!r}"
        )
    if out is not None:
        inputs = [] if isinstance(model, LoadedModel) else [model]
        out = guard_output(out, inputs, o.force, kind="file")
    texts = list(texts)[: o.examples]
    if not texts:
        raise MerganserError("calibrate: no calibration examples")
    dev = check_device(o.device)
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    net = lm.model.eval()
    home = next(net.parameters()).device
    net.to(dev)
    grams: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    # The rows to keep of the batch being run (None: all), and whether the hooks record.
    mask_rows: list[torch.Tensor | None] = [None]
    recording = [False]

    def hook(name: str) -> Any:
        def fn(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if not recording[0]:
                return
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]) if mask_rows[0] is None else x[mask_rows[0]]
            x = x.double()
            g = grams.get(name)
            grams[name] = x.T @ x if g is None else g.addmm_(x.T, x)
            rows[name] = rows.get(name, 0) + x.shape[0]

        return fn

    handles = []
    if o.grams:
        for mname, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear):
                handles.append(mod.register_forward_pre_hook(hook(f"{mname}.weight")))
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = (
        {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()} if o.fisher else {}
    )
    gen = torch.Generator().manual_seed(o.seed)
    enabled = sys.stderr.isatty() if o.progress is None else o.progress
    bar = tqdm(
        total=len(texts),
        desc=f"calibrating {lm.name}",
        unit="ex",
        disable=not enabled,
        file=sys.stderr,
    )
    tokens = 0
    try:
        seqs = [[*lm.bos, *lm.encode(t), lm.eos] for t in texts]
        for ids, mask in pad_batches(seqs, lm.tokenizer.pad_token_id or 0, o.batch):
            ids, mask = ids.to(dev), mask.to(dev)
            tokens += int(mask.sum())
            mask_rows[0] = mask.bool() if o.mask_padding else None
            if o.grams:
                recording[0] = True
                with torch.no_grad():
                    net(input_ids=ids, attention_mask=mask)
                recording[0] = False
            if o.fisher:
                for r in range(ids.shape[0]):
                    _fisher_step(net, ids[r : r + 1], mask[r : r + 1], params, fisher, o, gen)
            bar.update(ids.shape[0])
    finally:
        bar.close()
        for h in handles:
            h.remove()
        net.zero_grad(set_to_none=True)
        net.to(home)

    tensors: dict[str, torch.Tensor] = {}
    for name, g in grams.items():
        tensors[f"gram.{name}"] = (g / max(1, rows[name])).float().cpu()
    norm_sq = 0.0
    for name, f in fisher.items():
        f = f / len(texts)
        norm_sq += float(f.square().sum())
        tensors[f"fisher.{name}"] = f.float().cpu()
    meta = {
        "format": FORMAT,
        "model": str(lm.name),
        "examples": str(len(texts)),
        "tokens": str(tokens),
        "mask_padding": json.dumps(o.mask_padding),
        "kinds": ",".join(k for k, on in (("gram", o.grams), ("fisher", o.fisher)) if on),
    }
    if o.fisher:
        meta["fisher_labels"] = o.fisher_labels
        meta["fisher_norm"] = repr(math.sqrt(norm_sq))
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            publish(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return tensors, meta


def _fisher_step(
    net: torch.nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    params: dict[str, torch.nn.Parameter],
    fisher: dict[str, torch.Tensor],
    o: CalibrationOptions,
    gen: torch.Generator,
) -> None:
    """One example's squared gradient of Σₜ log p(yₜ | x<ₜ) over its real (unpadded) tokens."""
    n = int(mask.sum())
    logits = net(input_ids=ids[:, :n]).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    if o.fisher_labels == "sampled":
        with torch.no_grad():
            # Drawn on the CPU generator so a seed gives the same labels on any device.
            y = torch.multinomial(logp.exp().cpu(), 1, generator=gen).squeeze(1).to(ids.device)
    else:
        y = ids[0, 1:n]
    net.zero_grad(set_to_none=True)
    logp.gather(1, y[:, None]).sum().backward()
    for name, p in params.items():
        if p.grad is not None:
            fisher[name].add_(p.grad.double().square())
