"""A model's anatomy, from its config and tensor names alone (no weights read, no torch).

What merging needs to know about structure, asked here instead of assumed Llama:
- the layer stacks (a decoder, an encoder and a decoder, a text model and a vision tower, a
  language model and a visual encoder...), each with its tensor-name prefix, its layer count,
  and the config field that holds that count (``num_hidden_layers``, T5's
  ``num_decoder_layers``, CLIP's ``text_config.num_hidden_layers``, Qwen2-VL's
  ``vision_config.depth``...);
- the per-layer config fields of a stack (``layer_types`` and any other list with one entry per
  layer), which a frankenmerge must rebuild;
- the weight format: plain, or one merganser refuses (quantised, LoRA adapter).

Stacks are found from names: a tensor belongs to the stack whose prefix ends at the first
``layers|h|blocks|block|layer`` followed by an index (``model.layers.3.``, ``encoder.block.0.``,
``vision_model.encoder.layers.1.``, ``transformer.h.2.``). Families transformers does not know
get the same treatment; `merganser inspect` shows what was inferred.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

_STACK_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer))\.(\d+)\.")
COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "depth", "n_layers")


@dataclass(frozen=True)
class Stack:
    """One stack of repeated layers."""

    prefix: str  # tensor names start with f"{prefix}.{index}."
    layers: int  # 1 + the largest index among the tensor names
    indices: frozenset[int]  # the indices present (a well-formed stack has 0..layers-1)
    count_key: (
        tuple[str, ...] | None
    )  # where config.json holds its count, e.g. ("text_config", "num_hidden_layers")


def stack_of(name: str) -> tuple[str, int] | None:
    """(stack prefix, layer index) of a tensor name, or None outside any stack."""
    m = _STACK_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def find_stacks(names: Iterable[str], config: Mapping[str, Any] | None) -> list[Stack]:
    """The layer stacks of a model, in order of first appearance."""
    seen: dict[str, set[int]] = {}
    for n in names:
        s = stack_of(n)
        if s is not None:
            seen.setdefault(s[0], set()).add(s[1])
    cfg = dict(config or {})
    prefixes = list(seen)
    stacks = [
        Stack(p, 1 + max(ix), frozenset(ix), _count_key(p, prefixes, cfg)) for p, ix in seen.items()
    ]
    # Two stacks cannot share one count: it is the largest's (a multi-token-prediction head
    # such as Qwen3-Next's mtp.layers beside model.layers has no count field of its own).
    for key in {st.count_key for st in stacks if st.count_key is not None}:
        sharing = [st for st in stacks if st.count_key == key]
        keep = max(sharing, key=lambda st: st.layers)
        stacks = [
            st if st.count_key != key or st is keep else replace(st, count_key=None)
            for st in stacks
        ]
    return stacks


def _count_at(cfg: Mapping[str, Any], path: tuple[str, ...]) -> tuple[str, ...] | None:
    """``path + (k,)`` for the first count key ``k`` holding an int in ``cfg`` at ``path``."""
    node = get_path(cfg, path)
    if not isinstance(node, Mapping):
        return None
    for k in COUNT_KEYS:
        if isinstance(node.get(k), int) and not isinstance(node.get(k), bool):
            return (*path, k)
    return None


def _count_key(prefix: str, prefixes: list[str], cfg: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The config field that holds this stack's layer count, or None where none is found."""
    low = prefix.lower()
    if "vision" in low or "visual" in low:
        return _count_at(cfg, ("vision_config",))
    if "audio" in low:
        return _count_at(cfg, ("audio_config",))
    if "decoder" in low and any("encoder" in p.lower() for p in prefixes):
        for k in ("num_decoder_layers", "decoder_layers"):
            if isinstance(cfg.get(k), int):
                return (k,)
        return _count_at(cfg, ("decoder",))
    if "encoder" in low and any("decoder" in p.lower() for p in prefixes):
        for k in ("encoder_layers", "num_layers"):
            if isinstance(cfg.get(k), int):
                return (k,)
        return _count_at(cfg, ("encoder",))
    if ("text" in low or "language" in low or len(prefixes) > 1) and isinstance(
        cfg.get("text_config"), Mapping
    ):
        return _count_at(cfg, ("text_config",))
    return _count_at(cfg, ()) or (_count_at(cfg, ("text_config",)) if len(prefixes) == 1 else None)


def get_path(cfg: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path`` in a nested config, or None where any step is missing."""
    node: Any = cfg
    for part in path:
        node = node.get(part) if isinstance(node, Mapping) else None
    return node


def per_layer_fields(cfg: Mapping[str, Any], stack: Stack) -> list[tuple[str, ...]]:
    """Config lists with one entry per layer of ``stack`` (``layer_types``, ...): the lists
    beside its count field whose length is that count.
    """
    if stack.count_key is None:
        return []
    parent = stack.count_key[:-1]
    node = get_path(cfg, parent)
    count = get_path(cfg, stack.count_key)
    if not isinstance(node, Mapping):
        return []
    return [
        (*parent, k) for k, v in node.items() if isinstance(v, list) and len(v) == count and count
    ]


def depth_of(name: str, stacks: list[Stack]) -> float:
    """mergekit's t for layer gradients, within the tensor's own stack: idx/(L−1) (1 for a
    single layer), 0 outside every stack.
    """
    s = stack_of(name)
    if s is None:
        return 0.0
    layers = next((st.layers for st in stacks if st.prefix == s[0]), s[1] + 1)
    return s[1] / (layers - 1) if layers > 1 else 1.0


def check_structure(
    names: Iterable[str], config: Mapping[str, Any] | None, where: str
) -> str | None:
    """A one-line problem with an output's structure, or None: each stack's layers are
    0..n-1, its config count is n, and its per-layer config lists have n entries.
    """
    cfg = dict(config or {})
    for st in find_stacks(names, cfg):
        if st.indices != frozenset(range(st.layers)):
            gaps = sorted(set(range(st.layers)) - st.indices)
            return f"{where}: layer stack {st.prefix} lacks layers {gaps[:5]}"
        if st.count_key is None:
            continue
        count = get_path(cfg, st.count_key)
        key = ".".join(st.count_key)
        # DeepSeek-V3 and GLM store their multi-token-prediction layers after the counted ones.
        extra = get_path(cfg, (*st.count_key[:-1], "num_nextn_predict_layers"))
        if isinstance(extra, int) and isinstance(count, int) and count + extra == st.layers:
            continue
        if count != st.layers:
            return (
                f"{where}: config {key} is {count} but the tensors hold {st.layers} layers of "
                f"{st.prefix}"
            )
        types = get_path(cfg, (*st.count_key[:-1], "layer_types"))
        if isinstance(types, list) and len(types) != st.layers:
            return (
                f"{where}: config {'.'.join((*st.count_key[:-1], 'layer_types'))} has "
                f"{len(types)} entries for {st.layers} layers"
            )
    return None


FP8_SCALE = "_scale_inv"  # DeepSeek-V3 / Qwen FP8: W = fp8 · scale_inv, one scale per block


def fp8_block(config: Mapping[str, Any] | None) -> tuple[int, int] | None:
    """The block size of a block-scaled FP8 checkpoint (``quant_method: fp8`` with
    ``weight_block_size``), which merganser dequantises on read; None for anything else.
    """
    q = (config or {}).get("quantization_config")
    if not isinstance(q, Mapping) or q.get("quant_method") != "fp8":
        return None
    b = q.get("weight_block_size")
    if (
        isinstance(b, list)
        and len(b) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in b)
    ):
        return b[0], b[1]
    return None


def weight_format(
    names: Iterable[str], config: Mapping[str, Any] | None, files: Iterable[str]
) -> str | None:
    """Why merganser cannot merge these weights as plain tensors, or None: a LoRA adapter, or
    quantised weights (GPTQ, AWQ, bitsandbytes, and every quantization_config scheme but
    block-scaled FP8, which is dequantised on read).
    """
    files = set(files)
    names = list(names)
    if "adapter_config.json" in files or any(".lora_A." in n or ".lora_B." in n for n in names):
        return (
            "is a PEFT LoRA adapter: its A and B factors cannot be merged as plain tensors "
            "(merge the adapter into its base first)"
        )
    q = (config or {}).get("quantization_config")
    if fp8_block(config) is not None:
        # Weights are dequantised on read (plan.py, engine.load_inputs); static activation
        # scales (input_scale tensors) would be copied into a plain model meaning nothing.
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            return (
                f"holds FP8 weights with {scheme!r} activation scales, which merganser does not "
                "merge (only activation_scheme: dynamic)"
            )
        return None
    if isinstance(q, Mapping):
        method = q.get("quant_method") or q.get("quant_type") or "unknown"
        return (
            f"holds quantised weights (quantization_config: {method}); merge the unquantised "
            "weights and quantise the result"
        )
    markers = (  # ".weight_scale" also finds FP8's "weight_scale_inv"
        ".qweight",
        ".qzeros",
        ".scales",
        ".SCB",
        ".absmax",
        ".weight_scale",
    )
    hit = next((n for n in names if any(m in n for m in markers)), None)
    if hit is not None:
        return (
            f"holds quantised weights ({hit!r}); merge the unquantised weights and quantise "
            "the result"
        )
    return None


_VISION = ("vision", "visual", "image")
_PROJECTOR = ("projector", "merger", "mm_")


def _is(words: tuple[str, ...], text: str) -> bool:
    return any(w in text.lower() for w in words)


def _module_stack(module: str, stacks: list[Stack]) -> Stack | None:
    """The stack a mergekit module name (``text_decoder``, ``vision_tower``, ``encoder``,
    ``decoder``, or CLIP-style ``text_model``/``vision_model``) stands for, or None.
    """
    low = module.lower()
    if _is(_PROJECTOR, low) or low == "shared":
        return None
    if _is(_VISION, low):
        cands = [s for s in stacks if _is(_VISION, s.prefix)]
    elif _is(("audio",), low):
        cands = [s for s in stacks if _is(("audio",), s.prefix)]
    else:
        cands = [s for s in stacks if not _is((*_VISION, "audio"), s.prefix)]
        if len(cands) > 1 and low in ("encoder", "decoder"):
            other = "decoder" if low == "encoder" else "encoder"
            cands = [s for s in cands if low in s.prefix.lower() and other not in s.prefix.lower()]
        elif len(cands) > 1 and "decoder" in low:
            cands = [s for s in cands if "decoder" in s.prefix.lower()]
    if len(cands) == 1:
        return cands[0]
    return next((s for s in stacks if s.prefix.split(".")[0] == module), None)


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("."), b.split("."), strict=False):
        if x != y:
            break
        n += 1
    return n


def assign_modules(
    names: Iterable[str], config: Mapping[str, Any] | None, modules: list[str]
) -> dict[str, tuple[Stack | None, list[str]]]:
    """Split a model's tensors among mergekit-style ``modules:`` (each a stack and the tensors
    around it, or a stackless part such as a projector); ``ValueError`` naming the tensor or
    module where the split is not clear.
    """
    names = list(names)
    stacks = find_stacks(names, config)
    owner: dict[str, Stack | None] = {}
    for m in modules:
        st = _module_stack(m, stacks)
        if st is None and not (_is(_PROJECTOR, m) or m == "shared"):
            found = ", ".join(s.prefix for s in stacks) or "none"
            raise ValueError(f"module {m!r} matches no layer stack of the model (stacks: {found})")
        if st is not None and st in owner.values():
            raise ValueError(f"modules {m!r} and another both name the stack {st.prefix}")
        owner[m] = st
    out: dict[str, tuple[Stack | None, list[str]]] = {m: (owner[m], []) for m in modules}
    text = [
        m for m in modules if owner[m] is not None and not _is((*_VISION, "audio"), owner[m].prefix)
    ]  # type: ignore[union-attr]
    for n in names:
        s = stack_of(n)
        m = next((m for m in modules if s and owner[m] and owner[m].prefix == s[0]), None)  # type: ignore[union-attr]
        if m is None and s is not None:
            raise ValueError(f"tensor {n!r}: its layer stack {s[0]} is in no module of the recipe")
        if m is None:  # outside every stack: a projector, shared weights, or a stack's ends
            m = next((m for m in modules if _is(_PROJECTOR, m) and _is(_PROJECTOR, n)), None)
        if m is None:
            m = next((m for m in modules if owner[m] is None and n.startswith(m + ".")), None)
        if m is None and n.startswith("lm_head") and "shared" in modules:
            m = "shared"
        if m is None:
            scored = [
                (_shared_prefix(n, owner[m].prefix), m)  # type: ignore[union-attr]
                for m in modules
                if owner[m] is not None
            ]
            best = max((sc for sc, _ in scored), default=0)
            top = [m for sc, m in scored if sc == best]
            if best > 0 and len(top) == 1:
                m = top[0]
            elif _is(_VISION, n):
                m = next((m for m in top if _is(_VISION, owner[m].prefix)), None)  # type: ignore[union-attr]
            elif len(text) == 1:
                m = text[0]
        if m is None:
            raise ValueError(
                f"tensor {n!r} belongs to no module of the recipe ({', '.join(modules)})"
            )
        out[m][1].append(n)
    for m, (_, ns) in out.items():
        if not ns:
            raise ValueError(f"module {m!r} holds no tensor of the model")
    return out


def with_layer(name: str, prefix: str, layer: int) -> str:
    """``name`` (a tensor of stack ``prefix``) renamed to layer ``layer`` of that stack."""
    rest = name[len(prefix) + 1 :].split(".", 1)[1]
    return f"{prefix}.{layer}.{rest}"


_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED_EXPERTS = re.compile(r"\.experts\.(?!\d)")


def experts(names: Iterable[str]) -> dict[str, Any] | None:
    """How a mixture-of-experts model stores its experts: ``per_expert`` (each expert's
    projections tensors of their own: ``experts.3.w1.weight``) with their count, or ``fused``
    (one tensor for all experts of a layer: ``experts.gate_up_proj``); None for a dense model.
    """
    per: set[int] = set()
    fused = False
    for n in names:
        m = _EXPERT.search(n)
        if m:
            per.add(int(m.group(1)))
        elif _FUSED_EXPERTS.search(n):
            fused = True
    if per:
        return {"layout": "per_expert", "experts": max(per) + 1}
    return {"layout": "fused", "experts": None} if fused else None


def tied_embeddings(names: Iterable[str], config: Mapping[str, Any] | None) -> bool:
    """Whether the output head shares the input embedding (no head tensor of its own)."""
    names = set(names)
    cfg = config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else {}
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings"))
    has_head = any(n.startswith("lm_head.") or n.endswith(".lm_head.weight") for n in names)
    return bool(tie) and not has_head


def describe(names: Iterable[str], config: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The stacks for `merganser inspect`: prefix, layers, and the config field of the count."""
    return [
        {
            "prefix": st.prefix,
            "layers": st.layers,
            "config": ".".join(st.count_key) if st.count_key else None,
        }
        for st in find_stacks(names, config)
    ]
