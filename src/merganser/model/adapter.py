"""PEFT LoRA adapters as merge inputs: ``model: BASE+ADAPTER`` (mergekit's syntax), or an
adapter folder under a recipe's ``base_model``. The adapted model is read tensor by tensor as
W₀ + ΔW, exactly as ``PeftModel.merge_and_unload`` computes it (spec algorithms-2.md §11.1),
with no merged copy written first; merging such inputs merges their ΔWs, never A and B factor
by factor. What merganser cannot apply exactly is refused in one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merganser.errors import CheckpointError
from merganser.model import lora
from merganser.storage import safejson
from merganser.storage.checkpoint import Checkpoint, ReadMode
from merganser.storage.inputs import read_text
from merganser.storage.safetensors_header import TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
# Adapter tensor names after the prefix: <module>.<part>.
_PART = re.compile(
    r"(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector|base_layer\.weight|base_layer\.bias|weight|bias)$"
)


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (its adapter_config.json)."""
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors in the adapter file and how they combine."""

    a: str
    b: str
    scale: float
    transposed: bool  # ΔWᵀ: Conv1D weights ([in, out]) and embeddings
    magnitude: str | None = None  # DoRA


@dataclass
class Adapter:
    """A LoRA adapter: the base tensors it changes and how."""

    path: Path
    config: dict[str, Any]
    file: Checkpoint
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight -> factors
    bias: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # base bias -> (lora_B.bias, s)
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor -> full tensor in file

    @property
    def rank(self) -> int:
        """The largest rank of its modules."""
        return max((self.file.tensors[m.a].shape[0] for m in self.modules.values()), default=0)


def read_adapter(folder: Path, read_mode: ReadMode = "auto") -> Adapter:
    """The adapter in ``folder``; one line for anything merganser cannot apply exactly."""
    cfg_path = folder / ADAPTER_CONFIG
    try:
        cfg = safejson.loads(read_text(cfg_path, "adapter config", 1 << 20, CheckpointError))
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{folder}: a {kind} adapter; merganser applies LoRA adapters only")
    for key in ("layer_replication",):
        if cfg.get(key):
            raise CheckpointError(f"{cfg_path}: {key} is not supported")
    files = [folder / f for f in ADAPTER_FILES if (folder / f).is_file()]
    if not files:
        raise CheckpointError(f"{folder}: no {' or '.join(ADAPTER_FILES)}")
    adapter = Adapter(folder, cfg, Checkpoint(files[0]))
    _plan_modules(adapter)
    return adapter


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """A per-module override (PEFT's rank_pattern / alpha_pattern: a key matches a module
    whose name ends with it as whole components, or as a regular expression).
    """
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _plan_modules(ad: Adapter) -> None:
    cfg, where = ad.config, ad.path
    parts: dict[str, dict[str, str]] = {}
    for name in ad.file.tensors:
        m = _PART.match(name[len(_PREFIX) :]) if name.startswith(_PREFIX) else None
        if m is None:
            raise CheckpointError(f"{where}: adapter tensor {name!r} is not one merganser knows")
        parts.setdefault(m["module"], {})[m["part"]] = name
    rslora = bool(cfg.get("use_rslora"))
    fan = bool(cfg.get("fan_in_fan_out"))
    dora = bool(cfg.get("use_dora"))
    for module, p in parts.items():
        if "base_layer.weight" in p:  # saved embedding layers (a resized vocabulary, say)
            ad.replaced[f"{module}.weight"] = p["base_layer.weight"]
        if "base_layer.bias" in p:
            ad.replaced[f"{module}.bias"] = p["base_layer.bias"]
        for full in ("weight", "bias"):  # modules_to_save: the module's own tensors
            if full in p:
                ad.replaced[f"{module}.{full}"] = p[full]
        linear = "lora_A.weight" in p or "lora_B.weight" in p
        embed = "lora_embedding_A" in p or "lora_embedding_B" in p
        if not (linear or embed):
            if "lora_B.bias" in p or "lora_magnitude_vector" in p:
                raise CheckpointError(f"{where}: module {module} has no lora_A/lora_B")
            continue
        a = p.get("lora_A.weight") or p.get("lora_embedding_A")
        b = p.get("lora_B.weight") or p.get("lora_embedding_B")
        if a is None or b is None:
            raise CheckpointError(f"{where}: module {module} lacks one of its two LoRA factors")
        ia, ib = ad.file.tensors[a], ad.file.tensors[b]
        rank = ia.shape[0]
        if len(ia.shape) != 2 or len(ib.shape) != 2 or ib.shape[1] != rank:
            raise CheckpointError(
                f"{where}: module {module}: factors {list(ia.shape)} and {list(ib.shape)} do "
                "not make a rank-r product (a corrupt adapter?)"
            )
        r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r"))
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha"))
        if r != rank or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise CheckpointError(
                f"{where}: module {module}: rank {rank} in the file, {r} in {ADAPTER_CONFIG} "
                f"(lora_alpha {alpha!r})"
            )
        scale = lora.scaling(float(alpha), rank, rslora)
        magnitude = p.get("lora_magnitude_vector")
        if dora and (magnitude is None or embed or fan):
            raise CheckpointError(
                f"{where}: module {module}: DoRA is applied exactly to Linear layers only"
            )
        ad.modules[f"{module}.weight"] = LoraModule(a, b, scale, embed or fan, magnitude)
        if "lora_B.bias" in p:
            ad.bias[f"{module}.bias"] = (p["lora_B.bias"], scale)


class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint read as base + adapter: tensors the adapter changes are float32
    W₀ + ΔW (or the adapter's own copy, for modules_to_save); the rest as stored.
    """

    def __init__(self, base: Path, adapter: Path, read_mode: ReadMode = "auto"):
        super().__init__(base, read_mode)
        self.adapter = read_adapter(adapter, read_mode)
        self._stored = dict(self.tensors)
        ad = self.adapter
        for name in [*ad.modules, *ad.bias, *ad.replaced]:
            if name not in self._stored:
                raise CheckpointError(
                    f"{adapter}: adapts {name!r}, which base {base} does not have (an adapter "
                    "of another model?)"
                )
        for name, src in ad.replaced.items():
            if ad.file.tensors[src].shape != self._stored[name].shape:
                raise CheckpointError(
                    f"{adapter}: tensor {src!r} has shape {list(ad.file.tensors[src].shape)}, base "
                    f"{base} has {list(self._stored[name].shape)} for {name!r}"
                )
        for name, mod in ad.modules.items():
            info = self._stored[name]
            out, inn = ad.file.tensors[mod.b].shape[0], ad.file.tensors[mod.a].shape[1]
            want = (inn, out) if mod.transposed else (out, inn)
            if tuple(info.shape) != want:
                raise CheckpointError(
                    f"{adapter}: module {name.removesuffix('.weight')} makes a {list(want)} "
                    f"delta, base {base} has {list(info.shape)} (an adapter of another model?)"
                )
        for name in [*ad.modules, *ad.bias, *ad.replaced]:
            if not self._stored[name].dtype.is_floating_point or self._stored[name].dtype in (
                torch.float8_e4m3fn,
                torch.float8_e5m2,
            ):
                raise CheckpointError(
                    f"{base}: tensor {name!r} is stored as {self._stored[name].dtype}; an adapter "
                    "is applied to float16/bfloat16/float32 bases only"
                )
            self.tensors[name] = replace(self._stored[name], dtype=torch.float32)
        self.adapter_path = adapter

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._stored[name].dtype

    def read(
        self,
        name: str,
        start: int = 0,
        count: int | None = None,
        out: torch.Tensor | None = None,
        again: bool = False,
    ) -> torch.Tensor:
        ad = self.adapter
        if name not in ad.modules and name not in ad.bias and name not in ad.replaced:
            return super().read(name, start, count, out, again)
        info = self._stored[name]
        whole = start == 0 and (count is None or count == info.numel)
        count = info.numel - start if count is None else count
        cols = info.numel // info.shape[0] if info.shape and info.shape[0] else 1
        r0, r1 = start // cols, -(-(start + count) // cols)
        rows = self._rows(name, info, r0, r1)
        flat = rows.reshape(-1)[start - r0 * cols : start - r0 * cols + count]
        if out is not None:
            flat = out.view(torch.uint8)[: count * 4].view(torch.float32).copy_(flat)
        return flat.reshape(info.shape) if whole else flat

    def _rows(self, name: str, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the adapted tensor, float32."""
        ad, cols = self.adapter, info.numel // max(1, info.shape[0]) if info.shape else 1
        src = ad.replaced.get(name)
        if src is not None:
            stored = ad.file.tensors[src]
            w = ad.file._read_stored(stored, src, r0 * cols, (r1 - r0) * cols)
        else:
            w = self._read_stored(info, name, r0 * cols, (r1 - r0) * cols)
        w = w.float().reshape(r1 - r0, *info.shape[1:]) if info.shape else w.float()
        if name in ad.bias:
            b_name, scale = ad.bias[name]
            return w + scale * ad.file.read(b_name).float()[r0:r1]
        mod = ad.modules.get(name)
        if mod is None:
            return w
        a, b = ad.file.read(mod.a).float(), ad.file.read(mod.b).float()
        w = w + lora.delta_rows(a, b, mod.scale, slice(r0, r1), mod.transposed)
        if mod.magnitude is not None:
            w = lora.dora(w, ad.file.read(mod.magnitude).float()[r0:r1])
        return w

    def close(self) -> None:
        self.adapter.file.close()
        super().close()


def check_base(adapter: Adapter, base_ref: str, base_path: Path) -> None:
    """One line unless the adapter names no base, or names this one (its
    ``base_model_name_or_path``: the same folder, or the same hub id / folder name).
    """
    named = adapter.config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        return
    if Path(named).exists():
        same = Path(named).resolve() == base_path.resolve()
    else:
        last = named.rstrip("/").split("/")[-1].lower()
        ours = {base_ref.split("@")[0].rstrip("/").split("/")[-1].lower(), base_path.name.lower()}
        same = last in ours
    if not same:
        raise CheckpointError(
            f"{adapter.path}: made for {named} ({ADAPTER_CONFIG} base_model_name_or_path), "
            f"not {base_ref}"
        )


def split_ref(ref: str) -> tuple[str, str] | None:
    """``BASE+ADAPTER`` as its two references (mergekit's syntax), or None."""
    base, plus, adapter = ref.partition("+")
    return (base, adapter) if plus and base and adapter else None
