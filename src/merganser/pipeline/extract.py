"""`merganser extract-lora`: a PEFT LoRA adapter from a full fine-tune, by truncated SVD of
each linear layer's ΔW = W_ft − W_base (spec algorithms-2.md §11.3; mergekit-extract-lora's
layout, with its bias pitfall fixed). Tensor by tensor: one module's ΔW in memory at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from merganser.errors import CheckpointError, MerganserError
from merganser.model import hf, lora
from merganser.model.adapter import ADAPTER_CONFIG
from merganser.storage.checkpoint import Checkpoint
from merganser.storage.writer import AtomicOutput, guard_output

PREFIX = "base_model.model."


@dataclass
class Extraction:
    """What was extracted, per module: its rank and relative error (for the report)."""

    modules: dict[str, tuple[int, float]] = field(default_factory=dict)
    saved: list[str] = field(default_factory=list)  # modules_to_save (full rank)
    out: Path | None = None
    bytes: int = 0

    def report(self) -> dict[str, Any]:
        errors = [e for _, e in self.modules.values()]
        return {
            "output": str(self.out),
            "modules": {
                m: {"rank": r, "relative_error": round(e, 6)} for m, (r, e) in self.modules.items()
            },
            "modules_to_save": self.saved,
            "max_relative_error": round(max(errors), 6) if errors else 0.0,
            "bytes": self.bytes,
        }


def extract_lora(
    finetune: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = False,
    force: bool = False,
    card: str | None = None,
) -> Extraction:
    """A LoRA adapter in ``out`` whose merge into ``base`` approximates ``finetune``: rank
    ``rank`` per module, or as few as keep ``energy`` of each ΔW's squared norm. Embeddings
    and the head are saved whole (``modules_to_save``) unless ``embeddings``; other changed
    weights (norms) are saved whole; unchanged modules are left out. The adapter config sets
    s = 1 per module (``rank_pattern`` = ``alpha_pattern``) and ``lora_bias`` where biases
    changed.
    """
    if (rank is None) == (energy is None):
        raise MerganserError("extract-lora: give --rank or --energy (one of them)")
    if rank is not None and rank < 1:
        raise MerganserError("extract-lora: --rank must be 1 or more")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise MerganserError("extract-lora: --energy must be in (0, 1]")
    ft, bs = Checkpoint(finetune), Checkpoint(base)
    try:
        if ft.config is None:
            raise CheckpointError(
                f"{finetune}: no config.json (extract-lora needs the model's class)"
            )
        model_cfg = ft.config
        kinds = hf.load(Path(finetune), "its model class", lambda: hf.module_kinds(model_cfg))
        if kinds is None:
            raise CheckpointError(
                f"{finetune}: transformers cannot build {ft.config.get('architectures')}; "
                "extract-lora needs its module classes"
            )
        target = guard_output(out, [Path(finetune), Path(base)], force)
        tensors, ext = _extract(ft, bs, kinds, rank, energy, embeddings)
        config = _config(ext, tensors, kinds, str(base), ft.config)
        written = AtomicOutput(target, force=force)
        try:
            written.write_file("adapter_model.safetensors", save(tensors))
            written.write_file(ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
            if card is not None:
                written.write_file("README.md", _card(ext, card))
            written.commit()
        except BaseException:
            written.abort()
            raise
        ext.out = target
        ext.bytes = (target / "adapter_model.safetensors").stat().st_size
        return ext
    finally:
        ft.close()
        bs.close()


def _card(ext: Extraction, recipe: str) -> str:
    """The adapter's README.md: the recipe it was merged from and each module's error."""
    rows = "\n".join(f"| `{m}` | {r} | {e:.3g} |" for m, (r, e) in sorted(ext.modules.items()))
    saved = ", ".join(f"`{m}`" for m in ext.saved) or "none"
    return (
        "---\nlibrary_name: peft\ntags:\n- merge\n- merganser\n---\n\n"
        "# A merged LoRA adapter\n\nMerged with merganser, then factored per module "
        "(truncated SVD of the merged ΔW).\n\n```yaml\n"
        f"{recipe.strip()}\n```\n\n| module | rank | relative error |\n|---|---|---|\n{rows}\n\n"
        f"Saved whole (modules_to_save): {saved}.\n"
    )


def _module(name: str, kinds: dict[str, str]) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _extract(
    ft: Checkpoint,
    bs: Checkpoint,
    kinds: dict[str, str],
    rank: int | None,
    energy: float | None,
    embeddings: bool,
) -> tuple[dict[str, torch.Tensor], Extraction]:
    ext = Extraction()
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    if set(ft.tensors) != set(bs.tensors):
        only = sorted(set(ft.tensors) ^ set(bs.tensors))[0]
        raise CheckpointError(f"{ft.path}: tensor {only!r} is in one of the two models only")
    for name in ft.tensors:
        a, b = ft.tensors[name], bs.tensors[name]
        if a.shape != b.shape:
            raise CheckpointError(
                f"{ft.path}: tensor {name!r} is {list(a.shape)}, the base's {list(b.shape)}"
            )
        if not a.dtype.is_floating_point:
            continue
        w_ft, w_b = ft.read(name), bs.read(name)
        if torch.equal(w_ft, w_b):
            continue
        module, leaf = _module(name, kinds)
        kind = kinds.get(module)
        if kind is None:
            raise CheckpointError(
                f"{ft.path}: tensor {name!r} belongs to no module of "
                f"{ft.config.get('architectures')} (renamed on load?)"  # type: ignore[union-attr]
            )
        delta = w_ft.float() - w_b.float()
        if kind == "head" and embeddings:
            kind = "linear"
        if kind in ("linear", "conv1d") and leaf == "weight":
            d = delta.T if kind == "conv1d" else delta  # PEFT's factors are [out, r], [r, in]
            fb, fa, err = lora.factorize(d, rank, energy)
            out[f"{PREFIX}{module}.lora_A.weight"] = fa.to(a.dtype)
            out[f"{PREFIX}{module}.lora_B.weight"] = fb.to(a.dtype)
            ext.modules[module] = (fa.shape[0], err)
        elif kind in ("linear", "conv1d") and leaf == "bias":
            biases[module] = delta.to(a.dtype)
        elif kind == "embedding" and embeddings and leaf == "weight":
            fb, fa, err = lora.factorize(delta.T, rank, energy)  # ΔWᵀ = B·A, A [r, V]
            out[f"{PREFIX}{module}.lora_embedding_A"] = fa.to(a.dtype)
            out[f"{PREFIX}{module}.lora_embedding_B"] = fb.to(a.dtype)
            ext.modules[module] = (fa.shape[0], err)
        else:  # embeddings, the head (a Linear named as such), norms: saved whole
            ext.saved.append(module)
    # PEFT keeps bias deltas (lora_B.bias) only when every target layer has a bias; else a
    # module whose bias changed is saved whole, so that no delta is lost (mergekit's is).
    factored = [m for m in ext.modules if f"{PREFIX}{m}.lora_A.weight" in out]
    every = all(f"{m}.bias" in ft.tensors for m in factored)
    for module, delta in biases.items():
        if module in ext.modules and every:
            out[f"{PREFIX}{module}.lora_B.bias"] = delta
        else:
            ext.modules.pop(module, None)
            out.pop(f"{PREFIX}{module}.lora_A.weight", None)
            out.pop(f"{PREFIX}{module}.lora_B.weight", None)
            ext.saved.append(module)
    for module in dict.fromkeys(ext.saved):
        for leaf in ("weight", "bias"):
            name = f"{module}.{leaf}"
            if name in ft.tensors:
                out[f"{PREFIX}{name}"] = ft.read(name).clone()
    ext.saved = list(dict.fromkeys(ext.saved))
    return out, ext


def _config(
    ext: Extraction,
    tensors: dict[str, torch.Tensor],
    kinds: dict[str, str],
    base: str,
    model_config: dict[str, Any],
) -> dict[str, Any]:
    ranks = {m: r for m, (r, _) in ext.modules.items()}
    top = max(ranks.values(), default=1)
    conv = {kinds[m] == "conv1d" for m in ranks if kinds.get(m) != "embedding"}
    if len(conv) > 1:
        raise MerganserError("extract-lora: the model mixes Linear and Conv1D layers")
    arch = str((model_config.get("architectures") or [""])[0])
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base,
        "task_type": "CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": {m: r for m, r in ranks.items() if r != top},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != top},
        "target_modules": sorted(ranks),
        "modules_to_save": ext.saved or None,
        "fan_in_fan_out": conv == {True},
        "lora_bias": any(k.endswith(".lora_B.bias") for k in tensors),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
    }
