"""`merganser calibrate`: run a model over data and keep what data-aware merges need.

Any network: a Hugging Face folder of any transformers class (causal LMs on texts; encoders,
encoder-decoders and vision models on texts or input tensors) or, through
:func:`calibrate_module`, any ``torch.nn.Module`` with its batches. Forward hooks on every
``nn.Linear`` (and GPT-2 ``Conv1D``) accumulate the Gram matrix XᵀX of the layer's input
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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import (
    LoadedModel,
    is_causal_lm_folder,
    load_model,
    load_network,
    pad_batches,
    read_jsonl,
)
from merganser.evaluation.forward import (
    Batch,
    GramRecorder,
    Logits,
    LogLikelihood,
    batch_size,
    diagonal_fisher,
    gram_names_on_disk,
    logits_of,
    on_disk,
    rows,
    sampled_log_likelihood,
    to_device,
)
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
    data: Sequence[str] | Mapping[str, torch.Tensor] | str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    options: CalibrationOptions | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Input Grams of every linear layer and/or the diagonal Fisher of a model on data.

    ``model`` is a Hugging Face folder of any transformers class (a causal LM, an encoder such
    as BERT or ViT, an encoder-decoder such as T5) or a loaded causal LM. ``data`` is texts
    (tokenised with the folder's tokenizer) or model inputs: a mapping of tensors, or the path
    of a ``.safetensors`` file of them (``pixel_values`` for a vision model), examples along
    the first axis. Returns ``(tensors, metadata)`` and, given ``out``, writes them atomically.
    """
    o = _check_options(options)
    check_device(o.device)  # before any model is read
    if out is not None:
        inputs = [] if isinstance(model, LoadedModel) else [model]
        if isinstance(data, (str, os.PathLike)):
            inputs.append(data)
        out = guard_output(out, inputs, o.force, kind="file")
    if isinstance(data, (str, os.PathLike)):
        data = read_inputs(data) if Path(data).suffix == ".safetensors" else read_texts(data)
    if isinstance(model, LoadedModel) or (
        not isinstance(data, Mapping) and is_causal_lm_folder(model)
    ):
        if isinstance(data, Mapping):
            raise MerganserError("calibrate: a causal LM calibrates on texts, not input tensors")
        return _calibrate_causal_lm(model, list(data), out, o)
    net, tokenizer = load_network(model)
    if isinstance(data, Mapping):
        batches = tensor_batches(data, o.batch, o.examples)
    else:
        batches = text_batches(net, tokenizer, list(data), o.batch, o.examples, Path(model))
    return _calibrate(net, batches, out, o, logits_of, None, Path(model).name)


def calibrate_module(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    out: str | os.PathLike[str] | None = None,
    options: CalibrationOptions | None = None,
    logits: Logits = logits_of,
    log_likelihood: LogLikelihood | None = None,
    name: str = "model",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Calibration statistics of any ``torch.nn.Module`` (Jin et al. 2023; Matena & Raffel 2022).

    ``batches`` are what the module takes (a mapping of keyword tensors, a tuple, or a tensor;
    examples along the first axis; an ``attention_mask`` marks padding). The Grams cover every
    ``nn.Linear`` and GPT-2 ``Conv1D``. The Fisher is the mean per-example squared gradient of
    ``log_likelihood(model, batch)``, by default the log-probability of labels sampled from
    ``logits(output)`` (``fisher_labels: empirical`` takes the batch's ``labels``).
    """
    o = _check_options(options)
    target = None if out is None else guard_output(out, [], o.force, kind="file")
    return _calibrate(model, batches, target, o, logits, log_likelihood, name)


def _calibrate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    out: Path | None,
    o: CalibrationOptions,
    logits: Logits,
    log_likelihood: LogLikelihood | None,
    name: str,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    dev = check_device(o.device)
    home = next(model.parameters()).device
    was_training = model.training
    model.eval().to(dev)
    gen = torch.Generator().manual_seed(o.seed)
    ll = log_likelihood or sampled_log_likelihood(logits, gen, o.fisher_labels)
    kept: list[Batch] = []
    examples = tokens = 0
    enabled = sys.stderr.isatty() if o.progress is None else o.progress
    bar = tqdm(desc=f"calibrating {name}", unit="ex", disable=not enabled, file=sys.stderr)
    grams: GramRecorder | None = None
    try:
        if o.grams:
            grams = GramRecorder(model, o.mask_padding)
        batch: Batch | None = None
        for batch in _limit(batches, o.examples):
            batch = to_device(batch, dev)
            examples += batch_size(batch)
            tokens += _tokens(batch)
            if grams is not None:
                grams.run(model, batch)
            if o.fisher:
                kept.append(batch)
            bar.update(batch_size(batch) if grams is not None else 0)
        if examples == 0:
            raise MerganserError("calibrate: no calibration examples")
        fisher: dict[str, torch.Tensor] = {}
        if o.fisher:
            fisher, _ = diagonal_fisher(model, kept, ll, lambda: bar.update(1))
    except MerganserError:
        raise
    except Exception as e:  # the model's own failure on inputs it does not take
        given = ", ".join(batch) if isinstance(batch, Mapping) else type(batch).__name__
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MerganserError(
            f"calibrate: {name} ({type(model).__name__}) did not run on the inputs given "
            f"({given}): {type(e).__name__}: {first}; give it the inputs it takes (a "
            ".safetensors of them with --data)"
        ) from None
    finally:
        bar.close()
        if grams is not None:
            grams.close()
        model.to(home).train(was_training)
    meta = {"model": name, "examples": str(examples), "tokens": str(tokens)}
    return _finish(model, grams, fisher, examples, meta, o, out)


def read_inputs(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Model inputs from a ``.safetensors`` file: tensors by keyword, examples first."""
    from merganser.storage.checkpoint import Checkpoint

    p = Path(path)
    with Checkpoint(p) as ckpt:
        tensors = {k: ckpt.read(k) for k in ckpt}
    _check_inputs(tensors, str(p))
    return tensors


def _check_inputs(data: Mapping[str, torch.Tensor], where: str) -> None:
    sizes = {int(t.shape[0]) if t.dim() else 0 for t in data.values()}
    if not data or len(sizes) != 1 or 0 in sizes:
        raise MerganserError(
            f"{where}: expected model inputs with the examples along the first axis of every "
            f"tensor (got {', '.join(f'{k} {list(t.shape)}' for k, t in data.items()) or 'none'})"
        )


def tensor_batches(
    data: Mapping[str, torch.Tensor], size: int, examples: int
) -> list[dict[str, torch.Tensor]]:
    """Keyword batches of ``size`` examples from input tensors (at most ``examples``)."""
    _check_inputs(data, "calibrate")
    n = min(examples, int(next(iter(data.values())).shape[0]))
    return [{k: t[i : i + size] for k, t in data.items()} for i in range(0, n, size)]


def text_batches(
    net: torch.nn.Module,
    tokenizer: Any,
    texts: list[str],
    size: int,
    examples: int,
    where: Path,
) -> list[dict[str, torch.Tensor]]:
    """Padded, tokenised batches for a non-causal text model; an encoder-decoder's decoder reads
    the same text shifted right (its own reconstruction), so both halves see data."""
    if tokenizer is None:
        raise MerganserError(f"{where}: no tokenizer files; texts need the model's tokenizer")
    if tokenizer.pad_token_id is None:
        size = 1  # no padding token: one text per batch needs none
    texts = texts[:examples]
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and 0 < limit <= 1 << 16 else 512
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(
            texts[i : i + size], padding=size > 1, truncation=True, max_length=limit,
            return_tensors="pt",
        )  # fmt: skip
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if getattr(net.config, "is_encoder_decoder", False):
            ids = batch["input_ids"]
            if hasattr(net, "prepare_decoder_input_ids_from_labels"):
                dec = net.prepare_decoder_input_ids_from_labels(labels=ids)
            elif hasattr(net, "_shift_right"):
                dec = net._shift_right(ids)
            else:
                raise MerganserError(
                    f"{where}: an encoder-decoder whose decoder inputs merganser cannot build"
                )
            batch["decoder_input_ids"] = dec
            batch["decoder_attention_mask"] = batch["attention_mask"]
            batch["labels"] = ids  # the reconstruction target (empirical Fisher)
        out.append(batch)
    return out


def _limit(batches: Iterable[Batch], examples: int) -> Iterator[Batch]:
    """Batches up to ``examples`` examples (the last one cut)."""
    left = examples
    for b in batches:
        if left <= 0:
            return
        n = batch_size(b)
        if n > left:
            b = rows(b, 0, left)
            n = left
        left -= n
        yield b


def _tokens(batch: Batch) -> int:
    """Unpadded tokens in a batch with an ``attention_mask`` (0 for other inputs)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else 0


def _check_options(options: CalibrationOptions | None) -> CalibrationOptions:
    o = options or CalibrationOptions()
    if not (o.grams or o.fisher):
        raise MerganserError("calibrate: nothing to compute (enable grams or fisher)")
    if o.fisher_labels not in ("sampled", "empirical"):
        raise MerganserError(
            f"--fisher-labels: expected sampled or empirical, got {o.fisher_labels!r}"
        )
    return o


def _calibrate_causal_lm(
    model: str | os.PathLike[str] | LoadedModel,
    texts: list[str],
    out: Path | None,
    o: CalibrationOptions,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A causal LM on texts: BOS + text + EOS per sequence, Fisher over next-token predictions."""
    texts = texts[: o.examples]
    if not texts:
        raise MerganserError("calibrate: no calibration examples")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    if lm.eos is None:
        raise MerganserError(f"{lm.name}: the tokenizer has no end-of-sequence token")
    seqs = [[*lm.bos, *lm.encode(t), lm.eos] for t in texts]
    batches = [
        {"input_ids": ids, "attention_mask": mask}
        for ids, mask in pad_batches(seqs, lm.tokenizer.pad_token_id or 0, o.batch)
    ]
    gen = torch.Generator().manual_seed(o.seed)
    return _calibrate(lm.model, batches, out, o, logits_of, _next_token_ll(o, gen), str(lm.name))


def _next_token_ll(o: CalibrationOptions, gen: torch.Generator) -> LogLikelihood:
    """One sequence's Σₜ log p(yₜ | x<ₜ) over its real (unpadded) tokens."""

    def ll(net: torch.nn.Module, batch: Batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]  # type: ignore[index, call-overload]
        n = int(mask.sum())
        logits = net(input_ids=ids[:, :n]).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        if o.fisher_labels == "sampled":
            with torch.no_grad():
                # Drawn on the CPU generator so a seed gives the same labels on any device.
                y = torch.multinomial(logp.exp().cpu(), 1, generator=gen).squeeze(1)
            y = y.to(ids.device)
        else:
            y = ids[0, 1:n]
        return logp.gather(1, y[:, None]).sum()

    return ll


def _finish(
    net: torch.nn.Module,
    grams: GramRecorder | None,
    fisher: dict[str, torch.Tensor],
    examples: int,
    meta: dict[str, str],
    o: CalibrationOptions,
    out: Path | None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    in_out: list[str] = []
    if grams is not None:
        means = grams.means()
        names = gram_names_on_disk(net, means)
        for name, g in means.items():
            tensors[f"gram.{names[name]}"] = g.float().cpu()
        in_out = sorted(names[n] for n in grams.in_out())
        # The other matrices (embeddings, position tables) are listed, so that a merge knows a
        # 2-D weight without a Gram is not a linear layer rather than guessing from its name;
        # linear layers the data never reached are listed apart, so that a merge refuses them.
        params = dict(net.named_parameters(remove_duplicate=False))
        unseen = {n: params[n].detach() for n in grams.layers if n not in names and n in params}
        plain = {
            n: p.detach()
            for n, p in params.items()
            if p.dim() == 2 and n not in names and n not in unseen
        }
        meta["not_linear"] = json.dumps(sorted(on_disk(net, plain)))
        meta["no_input"] = json.dumps(sorted(on_disk(net, unseen)))
    norm_sq = 0.0
    for name, f in on_disk(net, fisher).items():
        f = f / examples
        norm_sq += float(f.square().sum())
        tensors[f"fisher.{name}"] = f.float().cpu()
    meta = {
        "format": FORMAT,
        **meta,
        "mask_padding": json.dumps(o.mask_padding),
        "kinds": ",".join(k for k, on in (("gram", o.grams), ("fisher", o.fisher)) if on),
    }
    if in_out:
        meta["in_out"] = json.dumps(in_out)  # Conv1D weights, stored [in, out]
    if o.fisher:
        meta["fisher_labels"] = o.fisher_labels
        meta["fisher_norm"] = repr(math.sqrt(norm_sq))
    return tensors, _write(tensors, meta, out)


def _write(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], out: Path | None
) -> dict[str, str]:
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata=meta)
            publish(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return meta
