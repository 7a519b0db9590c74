"""`merganser zip` and `merganser align`: models from different initialisations, end to end.

Load → check (shapes, vocabularies, known tensors) → features on shared data (activation
matchers) or weights only (Git Re-Basin weight matching) → unmerges per merge point → merged
tensors (align.py) → optionally their least-squares refit on the data (refit.py) → one model
folder, written atomically: a plain Llama when every block is zipped into one model, a
multi-head model (multihead.py) for a partial zip.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import load_model
from merganser.model import hf
from merganser.model.hf import TOKENIZER_FILES
from merganser.model.multihead import save_multihead, trunk_names
from merganser.model.naming import layer_of
from merganser.storage.checkpoint import Checkpoint, check_same_tensors
from merganser.storage.writer import guard_output, publish
from merganser.zipping.align import (
    MATCHERS,
    Alignment,
    Shape,
    activation_unmerges,
    identity_unmerges,
    roles,
    weight_unmerges,
)
from merganser.zipping.features import collect_features
from merganser.zipping.refit import fit_unmerges, refit_layers

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ZipOptions:
    matcher: str = "zipit"  # zipit | permute (activations) | weights (Re-Basin) | identity
    alpha: float = 0.3  # ZipIt: decay of a merged feature's correlations
    beta: float = 0.125  # ZipIt: share of merges that may be within one model
    layers: int | None = None  # blocks zipped into the shared trunk (None: all)
    heads: tuple[str, ...] | None = None  # multi-head output, one head name per model
    batch: int = 16
    max_iter: int = 100  # weight matching rounds
    seed: int = 0
    refit: bool = False  # least-squares refit of the zipped linears on the data (PLeaS)
    ridge: float = 1e-4  # the refit's ridge, relative to the mean input energy


def _read(path: Path) -> tuple[StateDict, Any]:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise MerganserError(f"{path}: not a model folder (no config.json)")
    config = hf.load(path, "the config", lambda: AutoConfig.from_pretrained(path))
    with Checkpoint(path) as c:
        return {k: c.read(k) for k in c}, config


def _check(paths: Sequence[Path], states: Sequence[StateDict], configs: Sequence[Any]) -> Shape:
    """One-line errors before any heavy work: architecture, shapes, tensors, vocabularies."""
    shapes = []
    for p, c in zip(paths, configs, strict=True):
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        if not all(hasattr(c, a) for a in need):
            raise MerganserError(f"{p}: not a Llama-style model (config lacks {need})")
        shapes.append(Shape.of(c))
    for p, s, shape in zip(paths[1:], states[1:], shapes[1:], strict=True):
        for f in fields(Shape):
            got, want = getattr(shape, f.name), getattr(shapes[0], f.name)
            if got != want:
                raise MerganserError(f"{p}: {f.name} is {got}, expected {want} (as {paths[0]})")
        check_same_tensors(paths[0], states[0], p, s)
        extra = sorted(set(s) - set(states[0]))
        if extra:
            raise MerganserError(f"{p}: tensor {extra[0]!r} not in {paths[0]}")
    for k in states[0]:
        roles(k)  # an unknown tensor is an error naming it
    return shapes[0]


def _same_vocab(paths: Sequence[Path]) -> None:
    from transformers import AutoTokenizer

    for p in paths:
        hf.require_tokenizer(p, "zip and align (they check the vocabularies agree)")
    vocabs = [
        hf.load(p, "the tokenizer", lambda p=p: AutoTokenizer.from_pretrained(p)).get_vocab()
        for p in paths
    ]
    for p, v in zip(paths[1:], vocabs[1:], strict=True):
        if v != vocabs[0]:
            raise MerganserError(f"{p}: tokenizer vocabulary differs from {paths[0]}'s")


def _write_folder(out: Path, source: Path, force: bool, write: Any, config: bool = True) -> None:
    """Fill a temporary sibling of ``out`` with ``write(tmp)`` and the source's tokenizer, then
    rename it into place: ``out`` is either untouched or complete."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        names = ("config.json", *TOKENIZER_FILES) if config else TOKENIZER_FILES
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _models(paths: Sequence[Path], texts: Sequence[str] | None, o: ZipOptions) -> list[Any]:
    """The models loaded for evaluation when matching or refitting runs them on data."""
    if o.matcher in ("zipit", "permute") and not texts:
        raise MerganserError(f"--match {o.matcher}: needs data (--tasks or --data)")
    if o.refit and not texts:
        raise MerganserError("--refit: needs data (--tasks or --data)")
    runs = o.matcher in ("zipit", "permute") or o.refit
    return [load_model(p) for p in paths] if runs else []


def _alignment(
    models: Sequence[Any],
    states: Sequence[StateDict],
    shape: Shape,
    texts: Sequence[str] | None,
    o: ZipOptions,
    residual_states: int,
) -> tuple[Alignment, int]:
    if o.matcher == "identity":
        return identity_unmerges(shape, len(states)), 0
    if o.matcher == "weights":
        floats = [{k: t.float() for k, t in s.items()} for s in states]
        return weight_unmerges(floats, shape, o.max_iter, o.seed), 0
    assert texts
    feats = collect_features(models, texts, o.batch)
    return (
        activation_unmerges(
            feats, shape, len(states), o.matcher, o.alpha, o.beta, residual_states=residual_states
        ),
        feats.tokens,
    )


def _refit(
    models: Sequence[Any], config: Any, alignment: Alignment, merged: StateDict,
    unmerges: list[torch.Tensor], texts: Sequence[str], o: ZipOptions, blocks: int,
) -> tuple[StateDict, list[torch.Tensor]]:  # fmt: skip
    """The zipped tensors with the trunk's linears refit (and lm_head for one model), and
    each model's unmerge fitted to the refit trunk (PLeaS, see refit.py)."""
    from transformers import LlamaForCausalLM

    net = LlamaForCausalLM(config).float().eval()
    net.load_state_dict({n: t.float() for n, t in merged.items()})
    lm = models[0]
    seqs = [[*lm.bos, *lm.encode(t), lm.eos] for t in texts]
    pad = lm.tokenizer.pad_token_id or 0
    sources = [m.model for m in models]
    refit_layers(sources, net, alignment, seqs, pad, blocks, o.heads is None, o.ridge, o.batch)
    fitted = net.state_dict()
    out = {n: fitted[n].to(t.dtype) for n, t in merged.items()}
    if o.heads is not None:
        unmerges = fit_unmerges(sources, net, seqs, pad, blocks, unmerges, o.ridge, o.batch)
    return out, unmerges


def zip_models(
    paths: Sequence[str | os.PathLike[str]],
    texts: Sequence[str] | None,
    out: str | os.PathLike[str],
    options: ZipOptions | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Zip models from different initialisations into ``out`` (ZipIt!, spec §8.2).

    Every block zipped and no heads: a plain Llama folder, every tensor merged. Otherwise a
    multi-head model: the zipped trunk (embeddings and the first ``layers`` blocks) and, per
    model, its residual unmerge, later blocks, final norm and lm_head.
    """
    o = options or ZipOptions()
    if o.matcher not in MATCHERS:
        raise MerganserError(f"--match: expected one of {', '.join(MATCHERS)}, got {o.matcher!r}")
    ps = [Path(p) for p in paths]
    if len(ps) < 2:
        raise MerganserError("zip: needs at least two models")
    out = guard_output(out, ps, force)
    read = [_read(p) for p in ps]
    states, configs = [s for s, _ in read], [c for _, c in read]
    shape = _check(ps, states, configs)
    _same_vocab(ps)
    k = shape.layers if o.layers is None else o.layers
    if not 0 <= k <= shape.layers:
        raise MerganserError(f"--layers: expected 0..{shape.layers}, got {k}")
    if o.heads is not None and len(o.heads) != len(ps):
        raise MerganserError(f"--heads: {len(o.heads)} names for {len(ps)} models")
    if o.heads is None and k < shape.layers:
        raise MerganserError("a partial zip (--layers < all) is a multi-head model: name --heads")
    if o.heads is not None and len(set(o.heads)) != len(o.heads):
        raise MerganserError(f"--heads: names must differ, got {','.join(o.heads)}")
    if o.heads is not None and getattr(configs[0], "model_type", "") != "llama":
        raise MerganserError(f"{ps[0]}: multi-head output is built for Llama models only")
    if o.heads is not None and not all(re.fullmatch(r"[\w-]+", h) for h in o.heads):
        raise MerganserError(
            f"--heads: names are letters, digits, _ and -, got {','.join(o.heads)}"
        )
    tied = getattr(configs[0], "tie_word_embeddings", False)
    if (o.matcher == "zipit" or o.heads or o.refit) and tied:
        raise MerganserError(
            f"{ps[0]}: zipping, refitting or splitting into heads needs untied embeddings "
            "(lm_head ≠ embed_tokens)"
        )
    if o.ridge < 0:
        raise MerganserError(f"--ridge: expected ≥ 0, got {o.ridge}")
    models = _models(ps, texts, o)
    alignment, tokens = _alignment(models, states, shape, texts, o, k)
    names = list(states[0])
    keep = set(names if o.heads is None else trunk_names(names, k))
    # the refit runs the whole merged model, so it needs every tensor merged
    merged = {
        n: alignment.merge_tensor(n, [s[n] for s in states]) for n in names if o.refit or n in keep
    }
    unmerges = [alignment.u("res", i).float() for i in range(len(ps))]
    if o.refit:
        assert texts
        merged, unmerges = _refit(models, configs[0], alignment, merged, unmerges, texts, o, k)
    if o.heads is None:

        def write(tmp: Path) -> None:
            save_file(merged, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        _write_folder(out, ps[0], force, write)
    else:
        tensors = {n: merged[n] for n in names if n in keep}
        for i, head in enumerate(o.heads):
            tensors[f"heads.{head}.unmerge"] = unmerges[i].float()
            for n in names:
                if n not in keep:
                    tensors[f"heads.{head}.{n}"] = states[i][n]

        def write(tmp: Path) -> None:
            save_multihead(tmp, configs[0], k, tensors, o.heads or ())

        _write_folder(out, ps[0], force, write, config=False)
    return {
        "models": [str(p) for p in ps],
        "matcher": o.matcher,
        "layers": k,
        "of": shape.layers,
        "heads": list(o.heads) if o.heads else None,
        "refit": o.refit,
        "tokens": tokens,
        "out": str(out),
    }


def align_models(
    ref: str | os.PathLike[str],
    other: str | os.PathLike[str],
    out: str | os.PathLike[str],
    texts: Sequence[str] | None = None,
    matcher: str = "weights",
    force: bool = False,
    options: ZipOptions | None = None,
) -> dict[str, Any]:
    """Permute ``other`` into ``ref``'s basis (Git Re-Basin); it computes the same function.

    The result can then be merged with ``ref`` by any recipe method (linear, SLERP, ...).
    """
    if matcher not in ("weights", "permute"):
        raise MerganserError(
            f"--match: align permutes: expected weights or permute, got {matcher!r}"
        )
    o = replace(options or ZipOptions(), matcher=matcher)
    ps = [Path(ref), Path(other)]
    out = guard_output(out, ps, force)
    read = [_read(p) for p in ps]
    states = [s for s, _ in read]
    shape = _check(ps, states, [c for _, c in read])
    _same_vocab(ps)
    alignment, tokens = _alignment(_models(ps, texts, o), states, shape, texts, o, shape.layers)
    aligned = {n: alignment.align_tensor(n, t, 1) for n, t in states[1].items()}
    moved = sum(
        int(not torch.equal(aligned[n], t)) for n, t in states[1].items() if layer_of(n) is not None
    )

    def write(tmp: Path) -> None:
        save_file(aligned, str(tmp / "model.safetensors"), metadata={"format": "pt"})

    _write_folder(out, ps[1], force, write)
    return {"ref": str(ps[0]), "other": str(ps[1]), "matcher": matcher, "tokens": tokens,
            "tensors_moved": moved, "out": str(out)}  # fmt: skip
