"""`merganser moe`: a Mixtral-style mixture of experts from dense models of one family,
read from mergekit-moe's YAML unchanged (spec algorithms-2.md §9): the base model's attention,
norms, embeddings and head; each expert's MLP as one expert of every layer; routers from the
prompts (the base model's hidden states or token embeddings) or random. Written tensor by
tensor, atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from merganser.errors import CheckpointError, RecipeError
from merganser.model import chat_templates, hf
from merganser.model.hf import TOKENIZER_FILES
from merganser.pipeline.recipe import MAX_SEED, format_error, read_yaml
from merganser.storage.checkpoint import Checkpoint
from merganser.storage.dtypes import dtype_name, parse_dtype
from merganser.storage.writer import AtomicOutput, guard_output, layout

GATE_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed", "random", "uniform_random")
_MLP = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # Mixtral's names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = None
    residual_scale: float | None = None


class MoEConfig(_Strict):
    """mergekit-moe's config (moe/config.py), plus merganser's ``random_seed``."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    random_seed: int = 0


def load_config(path: str | os.PathLike[str]) -> MoEConfig:
    """A mergekit-moe YAML, validated; anything merganser cannot build exactly is one line."""
    _, data = read_yaml(path, "MoE config")
    where = str(path)
    try:
        cfg = MoEConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{where}: {format_error(e.errors()[0])}") from None
    e, k = len(cfg.experts), cfg.experts_per_token
    if cfg.gate_mode not in GATE_MODES:
        raise RecipeError(f"{where}: gate_mode: expected one of {', '.join(GATE_MODES)}")
    if not 1 <= k <= e:
        raise RecipeError(f"{where}: experts_per_token: {k} with {e} experts")
    if cfg.shared_experts:
        raise RecipeError(f"{where}: shared_experts (Qwen2-MoE) are not supported yet")
    if cfg.architecture is not None and not "mixtral".startswith(cfg.architecture.lower()):
        raise RecipeError(f"{where}: architecture: merganser writes Mixtral only for now")
    if cfg.tokenizer_source not in (None, "base", cfg.base_model):
        raise RecipeError(f"{where}: tokenizer_source: only the base model's tokenizer")
    if not 0 <= cfg.random_seed <= MAX_SEED:
        raise RecipeError(f"{where}: random_seed: expected 0 to {MAX_SEED}")
    for i, x in enumerate(cfg.experts):
        if x.noise_scale:
            raise RecipeError(
                f"{where}: experts[{i}].noise_scale: not supported (mergekit draws it unseeded)"
            )
        if not x.positive_prompts and cfg.gate_mode != "random":
            raise RecipeError(f"{where}: experts[{i}]: positive_prompts are required")
    prompts = {
        (tuple(x.positive_prompts or ()), tuple(x.negative_prompts or ())) for x in cfg.experts
    }
    if cfg.gate_mode not in ("random", "uniform_random") and len(prompts) == 1 and e > 1:
        raise RecipeError(
            f"{where}: every expert has the same prompts: routing cannot tell them apart"
        )
    if len({x.source_model for x in cfg.experts}) == 1 and e > 1:
        raise RecipeError(f"{where}: every expert is the same model (useless without training)")
    return cfg


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(1e-8)


def cheap_embed_vector(embed: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over prompts and tokens of the masked token embeddings, unit length (spec §9.3)."""
    e = (embed[ids] * mask[..., None]).sum(dim=(0, 1))
    return e / max(float(torch.linalg.vector_norm(e)), 1e-8)


def _tokenize(tok: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """mergekit's batch: BOS text before each prompt, left padding with BOS (or EOS) as pad."""
    tok.padding_side = "left"
    if tok.bos_token_id is not None:
        tok.pad_token_id = tok.bos_token_id
    elif tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(
        [(tok.bos_token or "") + p for p in prompts],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def gate_vectors(cfg: MoEConfig, base: Path, layers: int, width: int) -> torch.Tensor:
    """The routers, [layers, experts, hidden] (row e of layer l scores expert e)."""
    n = len(cfg.experts)
    g = torch.Generator().manual_seed(cfg.random_seed)
    if cfg.gate_mode == "random":
        return torch.randn(layers, n, width, generator=g)
    if cfg.gate_mode == "uniform_random":
        bound = 1 / width**0.5
        return (torch.rand(layers, n, width, generator=g) * 2 - 1) * bound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf.require_tokenizer(base, "gate_mode " + cfg.gate_mode)
    tok = hf.load(base, "its tokenizer", lambda: AutoTokenizer.from_pretrained(base))
    if cfg.gate_mode == "cheap_embed":
        with Checkpoint(base) as ckpt:
            name = next((k for k in ckpt.tensors if k.endswith("embed_tokens.weight")), None)
            if name is None:
                raise CheckpointError(f"{base}: no embed_tokens.weight for gate_mode cheap_embed")
            embed = ckpt.read(name).float()

        def f(prompts: list[str]) -> torch.Tensor:
            return cheap_embed_vector(embed, *_tokenize(tok, prompts)).expand(layers, -1)

    else:
        model = hf.load(
            base,
            "the model",
            lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        ).eval()

        def f(prompts: list[str]) -> torch.Tensor:
            ids, mask = _tokenize(tok, prompts)
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            h = torch.stack(out.hidden_states[:-1])  # (L, B, S, d): each layer's input
            h = h.mean(dim=2) if cfg.gate_mode == "hidden_avg" else h[:, :, -1]
            return h.mean(dim=1)

    rows = []
    for x in cfg.experts:
        v = f(list(x.positive_prompts or ()))
        if x.negative_prompts:
            v = v - f(list(x.negative_prompts))
        rows.append(_normalise(v))
    return torch.stack(rows, dim=1)


def build_moe(
    config: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False
) -> Path:
    """Write the MoE model ``config`` describes into ``out`` (atomically)."""
    cfg = load_config(config)
    rec_dir = Path(config).parent

    def path_of(ref: str) -> Path:
        p = Path(os.path.expanduser(ref))
        return p if p.exists() or p.is_absolute() else rec_dir / p

    base_path = path_of(cfg.base_model)
    base = Checkpoint(base_path)
    experts = [Checkpoint(path_of(x.source_model)) for x in cfg.experts]
    try:
        bcfg = base.config or {}
        for c in [base, *experts]:
            kind = (c.config or {}).get("model_type")
            if kind not in ("llama", "mistral"):
                raise CheckpointError(
                    f"{c.path}: model_type {kind!r}; a Mixtral MoE is built from Llama or "
                    "Mistral models"
                )
        layers, width = int(bcfg["num_hidden_layers"]), int(bcfg["hidden_size"])
        scales = [x.residual_scale for x in cfg.experts]
        names = _tensor_plan(base, experts, layers, scales)
        dtype = parse_dtype(cfg.dtype, "dtype") if cfg.dtype else None
        shapes = [(n, shape, dtype or dt) for n, (shape, dt, _) in names.items()]
        target = guard_output(out, [base_path, *(e.path for e in experts), Path(config)], force)
        gates = gate_vectors(cfg, base_path, layers, width)
        template = None
        if cfg.chat_template is not None:
            template = chat_templates.resolve(
                cfg.chat_template,
                [base_path, *(e.path for e in experts)],
                f"{config}: chat_template",
            )[0]
        written = AtomicOutput(target, force=force)
        try:
            shards, slots = layout(shapes, 5 * 10**9)
            written.open_shards(shards, slots)
            for name, (_, _, source) in names.items():
                t = source(gates)
                written.write(name, t.to(slots[name].dtype))
            written.close_shards()
            written.verify_and_index()
            out_cfg = _mixtral_config(bcfg, len(experts), cfg.experts_per_token, dtype)
            written.write_file("config.json", json.dumps(out_cfg, indent=2) + "\n")
            for f in TOKENIZER_FILES:
                if (base_path / f).is_file():
                    written.copy_file(base_path / f)
            if template is not None:
                chat_templates.write(written, template)
            written.write_file("merganser_moe.yaml", Path(config).read_text())
            written.commit()
        except BaseException:
            written.abort()
            raise
        return target
    finally:
        base.close()
        for e in experts:
            e.close()


def _tensor_plan(
    base: Checkpoint, experts: list[Checkpoint], layers: int, scales: list[float | None]
) -> dict[str, tuple[tuple[int, ...], torch.dtype, Any]]:
    """Output name -> (shape, stored dtype, a function of the gates giving the tensor);
    ``scales``: each expert's residual_scale (its down_proj is multiplied by it).
    """
    plan: dict[str, tuple[tuple[int, ...], torch.dtype, Any]] = {}
    for name, info in base.tensors.items():
        parts = name.split(".")
        if ".mlp." not in name:
            plan[name] = (info.shape, info.dtype, lambda _g, n=name: base.read(n))
            continue
        # model.layers.{l}.mlp.{gate,up,down}_proj.weight -> one expert each
        layer, proj = int(parts[2]), parts[4]
        if proj not in _MLP or parts[-1] != "weight":
            raise CheckpointError(f"{base.path}: tensor {name!r} is no Llama MLP weight")
        for e, ckpt in enumerate(experts):
            src = ckpt.tensors.get(name)
            if src is None or src.shape != info.shape:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {name!r} is missing or of another shape than the base's"
                )
            out = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MLP[proj]}.weight"
            scale = scales[e] if proj == "down_proj" else None
            plan[out] = (
                info.shape,
                info.dtype,
                lambda _g, c=ckpt, n=name, s=scale: _expert(c, n, s),
            )
        if proj == "gate_proj":
            gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
            shape = (len(experts), info.shape[1])
            plan[gate] = (shape, info.dtype, lambda g, at=layer: g[at].float())
    missing = [f"model.layers.{i}.mlp" for i in range(layers)
               if f"model.layers.{i}.block_sparse_moe.gate.weight" not in plan]  # fmt: skip
    if missing:
        raise CheckpointError(f"{base.path}: no MLP found for {missing[0]}")
    return plan


def _expert(ckpt: Checkpoint, name: str, scale: float | None) -> torch.Tensor:
    t = ckpt.read(name)
    return t if scale is None else (t.float() * scale).to(t.dtype)


def _mixtral_config(
    base: dict[str, Any], experts: int, per_token: int, dtype: torch.dtype | None
) -> dict[str, Any]:
    keep = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta",
        "rope_parameters", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_dropout",
    )  # fmt: skip
    cfg = {k: base[k] for k in keep if k in base}
    cfg.update(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        num_local_experts=experts,
        num_experts_per_tok=per_token,
        sliding_window=None,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
    )
    if dtype is not None:
        cfg["dtype"] = dtype_name(dtype)
    elif "dtype" in base or "torch_dtype" in base:
        cfg["dtype"] = base.get("dtype", base.get("torch_dtype"))
    return cfg
