"""Calling transformers' loaders on local folders, with their failures as one line.

transformers raises whatever its loaders meet (OSError for a missing file, ValueError for a
tokenizer it cannot build, pickle.UnpicklingError for a .bin that holds more than tensors,
RuntimeError, KeyError...), with multi-line texts. A user's folder is input: each failure
becomes one line naming the folder. Remote code is never run (trust_remote_code stays off).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from merganser.errors import CheckpointError, MerganserError
from merganser.storage.inputs import check_folder

T = TypeVar("T")

# A model's tokenizer and generation files, copied beside merged weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load(path: str | Path, what: str, loader: Callable[[], T]) -> T:
    """``loader()``, or one line naming ``path`` and ``what`` could not be loaded."""
    check_folder(Path(path))  # a FIFO or device in the folder would hang the loader
    try:
        return loader()
    except MerganserError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load {what}: the pickle holds more than plain tensors "
            f"(weights_only=True: {_first_line(e)})"
        ) from None
    except Exception as e:  # transformers' own failures, whatever their type
        raise CheckpointError(
            f"{path}: cannot load {what} with transformers ({type(e).__name__}: {_first_line(e)})"
        ) from None


def require_tokenizer(path: str | Path, why: str) -> None:
    """One line unless the folder has tokenizer files (``why``: what needs them)."""
    p = Path(path)
    if not any((p / f).is_file() for f in TOKENIZER_MARKERS):
        raise MerganserError(f"{p}: no tokenizer files; {why} needs the model's tokenizer")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else "no details"


def meta_model(config: Mapping[str, Any]) -> Any:
    """The transformers model ``config`` names, built on the meta device (no memory, nothing
    read); None where transformers cannot build it here (no ``architectures``, remote code,
    an unknown class or model type). Errors of the config itself propagate.
    """
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or "auto_map" in config:
        return None  # remote code is never run, so its classes are never built
    try:
        import torch
        import transformers
    except ImportError:
        return None
    cls = getattr(transformers, str(archs[0]), None)
    model_type = config.get("model_type")
    if cls is None or model_type not in transformers.CONFIG_MAPPING:
        return None
    cfg = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
    with torch.device("meta"):
        return cls(cfg)


def key_problems(
    shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]
) -> set[str] | None:
    """What transformers would report loading these tensors into the model ``config`` names,
    found on the meta device (no memory, no data read): ``missing:<key>``, ``unexpected:<key>``
    and ``shape:<key>`` entries. None where transformers cannot build the class here (no
    ``architectures``, remote code, an unknown class or model type).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:
        return None
    try:
        model = meta_model(config)
        if model is None:
            return None
        conversions = get_model_conversion_mapping(model)
    except Exception as e:  # a config this class cannot be built from
        return {f"build:{type(e).__name__}: {_first_line(e)}"}
    want = model.state_dict()
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    found: set[str] = set()
    problems: set[str] = set()
    for name, shape in shapes.items():
        key, fused = rename_source_key(name, renamings, converters, model.base_model_prefix, want)
        found.add(key)
        if key not in want:
            ignored = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
            if not any(re.search(p, key) for p in ignored):
                problems.add(f"unexpected:{name}")
        elif fused is None and tuple(want[key].shape) != tuple(shape):
            problems.add(f"shape:{name} {tuple(shape)}, the class wants {tuple(want[key].shape)}")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    problems.update(f"missing:{k}" for k in want if k not in found and k not in tied)
    return problems


def module_kinds(config: Mapping[str, Any]) -> dict[str, str] | None:
    """Each module of the model ``config`` names, by kind: ``linear``, ``conv1d`` (GPT-2's,
    weights stored [in, out]), ``embedding``, ``head`` (the output embedding, a Linear) or
    ``other``; built on the meta device (no memory). None where transformers cannot build the
    class here (as key_problems).
    """
    try:
        import torch
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    model = meta_model(config)
    if model is None:
        return None
    kinds = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head and isinstance(module, torch.nn.Linear):
            kinds[name] = "head"
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = "linear"
        elif isinstance(module, Conv1D):
            kinds[name] = "conv1d"
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif any(True for _ in module.parameters(recurse=False)):
            kinds[name] = "other"
    return kinds
