"""`merganser moe`: a mixture of experts from dense models of one family, read from
mergekit-moe's YAML unchanged (spec algorithms-2.md §9): the base model's attention, norms,
embeddings and head; each expert's MLP as one expert of every layer (and a shared expert for
Qwen MoE); routers from the prompts (the base model's hidden states or token embeddings) or
random. Written as Mixtral, Qwen MoE (Qwen2-MoE) or Qwen3 MoE, chosen as mergekit-moe chooses,
tensor by tensor, atomically.
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
# mergekit-moe's output architectures, in its order of preference (Mixtral first wherever it fits).
ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")


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
    # merganser: the base's non-MLP tensors (attention, norms, embeddings, head) as a merge of
    # the base and the experts with any method ({merge_method, parameters, ...}; the models are
    # implied). mergekit-moe copies the base's.
    merge_base: dict[str, Any] | None = None


def load_config(path: str | os.PathLike[str], allow_all_same: bool = False) -> MoEConfig:
    """A mergekit-moe YAML, validated; anything merganser cannot build exactly is one line.
    The checks are mergekit-moe's (``random`` routers skip the prompt and same-model checks:
    sparse upcycling); ``allow_all_same`` is its --i-understand-this-is-not-useful-without-training.
    """
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
    if cfg.merge_base is not None:
        implied = sorted({"models", "base_model", "slices", "modules"} & set(cfg.merge_base))
        if implied or "merge_method" not in cfg.merge_base:
            raise RecipeError(
                f"{where}: merge_base: give merge_method (and parameters); the models are the "
                f"base and the experts{f', not {implied[0]}' if implied else ''}"
            )
    if cfg.architecture is not None and not any(
        a.lower().startswith(cfg.architecture.lower()) for a in ARCHITECTURES
    ):
        raise RecipeError(
            f"{where}: architecture: {cfg.architecture!r} names none of {', '.join(ARCHITECTURES)}"
        )
    if cfg.tokenizer_source not in (None, "base", cfg.base_model):
        raise RecipeError(
            f"{where}: tokenizer_source: the MoE takes its embeddings and tokenizer from the "
            "base; for another tokenizer, give tokenizer_source inside merge_base"
        )
    if not 0 <= cfg.random_seed <= MAX_SEED:
        raise RecipeError(f"{where}: random_seed: expected 0 to {MAX_SEED}")
    shared = cfg.shared_experts or []
    if len({bool(x.positive_prompts) for x in shared}) > 1:
        raise RecipeError(f"{where}: shared_experts: prompts for all of them or none")
    for i, x in enumerate([*cfg.experts, *shared]):
        what = f"experts[{i}]" if i < e else f"shared_experts[{i - e}]"
        if x.noise_scale:
            raise RecipeError(
                f"{where}: {what}.noise_scale: not supported (mergekit draws it unseeded)"
            )
        if not x.positive_prompts and cfg.gate_mode != "random" and i < e:
            raise RecipeError(f"{where}: {what}: positive_prompts are required")
    if cfg.gate_mode == "random":
        return cfg  # sparse upcycling: copies of one model, routers trained later
    prompts = {
        (tuple(x.positive_prompts or ()), tuple(x.negative_prompts or ())) for x in cfg.experts
    }
    if len(prompts) == 1 and e > 1:
        raise RecipeError(
            f"{where}: every expert has the same prompts: routing cannot tell them apart"
        )
    if len({x.source_model for x in cfg.experts}) == 1 and e > 1 and not allow_all_same:
        raise RecipeError(
            f"{where}: every expert is the same model: the same output at more cost, unless "
            "trained after (--i-understand-this-is-not-useful-without-training)"
        )
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


def gated(cfg: MoEConfig) -> list[Expert]:
    """The experts that get a router row: every routed expert, then the shared experts where
    they have prompts or the routers are random (mergekit's ``need_gates``).
    """
    shared = cfg.shared_experts or []
    random = cfg.gate_mode in ("random", "uniform_random")
    return [*cfg.experts, *(shared if any(x.positive_prompts for x in shared) or random else [])]


def gate_vectors(cfg: MoEConfig, base: Path, layers: int, width: int) -> torch.Tensor:
    """The routers, [layers, gated experts, hidden] (row e of layer l scores expert e; rows
    after the routed experts are the shared experts' gates).
    """
    n = len(gated(cfg))
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
    for x in gated(cfg):
        v = f(list(x.positive_prompts or ()))
        if x.negative_prompts:
            v = v - f(list(x.negative_prompts))
        rows.append(_normalise(v))
    return torch.stack(rows, dim=1)


def select_architecture(cfg: MoEConfig, kinds: list[str], where: str) -> str:
    """The output architecture, chosen as mergekit-moe chooses: the candidates ``architecture``
    names (a prefix), those that fit the models and shared experts, Mixtral if it fits, else
    the first. DeepSeek MoE is refused: its model class is deepseek-ai's remote code.
    """
    named = [a for a in ARCHITECTURES if a.lower().startswith((cfg.architecture or "").lower())]
    why = {a: _unfit(a, cfg, kinds) for a in named}
    fits = [a for a in named if why[a] is None]
    if not fits:
        reasons = "; ".join(f"{a}: {why[a]}" for a in named)
        raise RecipeError(f"{where}: no MoE architecture fits these models ({reasons})")
    choice = "Mixtral" if "Mixtral" in fits else fits[0]
    if choice == "DeepSeek MoE":
        hint = "; `architecture: qwen` writes Qwen MoE" if "Qwen MoE" in fits else ""
        raise RecipeError(
            f"{where}: mergekit-moe writes DeepSeek MoE for this config, whose model class is "
            f"deepseek-ai's remote code, which merganser never runs{hint}"
        )
    return choice


def _unfit(arch: str, cfg: MoEConfig, kinds: list[str]) -> str | None:
    """Why ``arch`` cannot hold this config (mergekit-moe's supports_config), or None."""
    shared = cfg.shared_experts or []
    same = len(set(kinds)) == 1
    if arch == "Mixtral":
        if shared:
            return "no shared experts"
        return None if set(kinds) <= {"llama", "mistral"} else "Llama or Mistral models only"
    if arch == "DeepSeek MoE":
        if len(shared) > 1 or any(x.positive_prompts or x.negative_prompts for x in shared):
            return "at most one shared expert, without prompts"
        return None if same and kinds[0] in ("llama", "mistral") else "one of Llama or Mistral"
    if arch == "Qwen MoE":
        if len(shared) != 1:
            return "exactly one shared expert"
        if not shared[0].positive_prompts and cfg.gate_mode != "random":
            return "the shared expert needs prompts"
        ok = same and kinds[0] in ("llama", "mistral", "qwen2")
        return None if ok else "one of Llama, Mistral or Qwen2"
    if shared:
        return "no shared experts"
    return None if set(kinds) == {"qwen3"} else "Qwen3 models only"


def _path_of(ref: str, config: str | os.PathLike[str]) -> Path:
    """A model reference of the config: as given, or relative to the config's folder."""
    p = Path(os.path.expanduser(ref))
    return p if p.exists() or p.is_absolute() else Path(config).parent / p


def base_recipe(cfg: MoEConfig, config: str | os.PathLike[str]) -> dict[str, Any]:
    """``merge_base`` as a merge recipe: the base model and each distinct expert."""
    assert cfg.merge_base is not None
    base = str(_path_of(cfg.base_model, config).absolute())
    experts = dict.fromkeys(str(_path_of(x.source_model, config).absolute()) for x in cfg.experts)
    models = [{"model": m} for m in experts if m != base]
    return {**cfg.merge_base, "base_model": base, "models": [{"model": base}, *models]}


def build_moe(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    allow_all_same: bool = False,
    merged_base: Path | None = None,
) -> Path:
    """Write the MoE model ``config`` describes into ``out`` (atomically); ``merged_base``:
    the folder of its merged base (``merge_base``) in place of ``base_model``.
    """
    cfg = load_config(config, allow_all_same)

    def path_of(ref: str) -> Path:
        return _path_of(ref, config)

    base_path = merged_base or path_of(cfg.base_model)
    base = Checkpoint(base_path)
    experts = [Checkpoint(path_of(x.source_model)) for x in cfg.experts]
    shared = [Checkpoint(path_of(x.source_model)) for x in cfg.shared_experts or []]
    try:
        bcfg = base.config or {}
        kinds = [str((c.config or {}).get("model_type")) for c in [base, *experts, *shared]]
        arch = select_architecture(cfg, kinds, str(config))
        layers, width = int(bcfg["num_hidden_layers"]), int(bcfg["hidden_size"])
        out_cfg = _moe_config(arch, bcfg, cfg, len(experts))
        members = [(c, x.residual_scale) for c, x in zip(experts, cfg.experts, strict=True)]
        if shared:
            assert cfg.shared_experts is not None
            members.append((shared[0], cfg.shared_experts[0].residual_scale))
        names = _tensor_plan(arch, base, members, layers, len(experts))
        _zero_biases(names, out_cfg, next(iter(base.tensors.values())).dtype)
        dtype = parse_dtype(cfg.dtype, "dtype") if cfg.dtype else None
        shapes = [(n, shape, dtype or dt) for n, (shape, dt, _) in names.items()]
        inputs = [base_path, *(c.path for c in experts), *(c.path for c in shared)]
        target = guard_output(out, [*inputs, Path(config)], force)
        gates = gate_vectors(cfg, base_path, layers, width)
        template = None
        if cfg.chat_template is not None:
            template = chat_templates.resolve(
                cfg.chat_template, inputs, f"{config}: chat_template"
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
            if dtype is not None:
                out_cfg.pop("torch_dtype", None)
                out_cfg["dtype"] = dtype_name(dtype)
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
        for c in [base, *experts, *shared]:
            c.close()


Source = Any  # a function of the gates [layers, gated experts, hidden] giving one tensor


def _tensor_plan(
    arch: str,
    base: Checkpoint,
    members: list[tuple[Checkpoint, float | None]],
    layers: int,
    routed: int,
) -> dict[str, tuple[tuple[int, ...], torch.dtype, Source]]:
    """Output name -> (shape, stored dtype, source). ``members``: the routed experts, then
    the shared expert if any, each with its residual_scale (its down_proj is multiplied by it).
    """
    plan: dict[str, tuple[tuple[int, ...], torch.dtype, Source]] = {}
    for name, info in base.tensors.items():
        parts = name.split(".")
        if ".mlp." not in name:
            plan[name] = (info.shape, info.dtype, lambda _g, n=name: base.read(n))
            continue
        # model.layers.{l}.mlp.{gate,up,down}_proj.weight -> one expert each
        layer, proj = int(parts[2]), parts[4]
        if proj not in _MLP or parts[-1] != "weight":
            raise CheckpointError(f"{base.path}: tensor {name!r} is no Llama MLP weight")
        for e, (ckpt, scale) in enumerate(members):
            src = ckpt.tensors.get(name)
            if src is None or src.shape != info.shape:
                raise CheckpointError(
                    f"{ckpt.path}: tensor {name!r} is missing or of another shape than the base's"
                )
            mlp = f"model.layers.{layer}.mlp"
            if e == routed:  # the shared expert (Qwen MoE)
                out = f"{mlp}.shared_expert.{proj}.weight"
            elif arch == "Mixtral":
                out = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_MLP[proj]}.weight"
            else:
                out = f"{mlp}.experts.{e}.{proj}.weight"
            s = scale if proj == "down_proj" else None
            plan[out] = (info.shape, info.dtype, lambda _g, c=ckpt, n=name, s=s: _expert(c, n, s))
        if proj == "gate_proj":
            width = info.shape[1]
            router = (
                f"model.layers.{layer}.block_sparse_moe.gate.weight"
                if arch == "Mixtral"
                else f"model.layers.{layer}.mlp.gate.weight"
            )
            plan[router] = ((routed, width), info.dtype, lambda g, at=layer: g[at, :routed])
            if len(members) > routed:
                gate = f"model.layers.{layer}.mlp.shared_expert_gate.weight"
                plan[gate] = ((1, width), info.dtype, lambda g, at=layer: g[at, routed:])
    routers = {int(n.split(".")[2]) for n in plan if n.endswith("gate.weight") and ".mlp." in n}
    routers |= {int(n.split(".")[2]) for n in plan if "block_sparse_moe.gate" in n}
    missing = [i for i in range(layers) if i not in routers]
    if missing:
        raise CheckpointError(f"{base.path}: no MLP found for model.layers.{missing[0]}.mlp")
    return plan


def _zero_biases(plan: dict[str, Any], out_cfg: dict[str, Any], dtype: torch.dtype) -> None:
    """Attention biases the output class has and the inputs lack (Qwen MoE from Llama or
    Mistral models) are zeros, as mergekit-moe writes them.
    """
    model = hf.meta_model(out_cfg)
    if model is None:
        return
    for key, t in model.state_dict().items():
        if key.endswith("_proj.bias") and ".self_attn." in key and key not in plan:
            plan[key] = (tuple(t.shape), dtype, lambda _g, n=t.shape: torch.zeros(n))


def _expert(ckpt: Checkpoint, name: str, scale: float | None) -> torch.Tensor:
    t = ckpt.read(name)
    return t if scale is None else (t.float() * scale).to(t.dtype)


def _moe_config(arch: str, base: dict[str, Any], cfg: MoEConfig, experts: int) -> dict[str, Any]:
    """The output's config.json: the base's, with the MoE architecture's fields (as
    mergekit-moe sets them).
    """
    per_token = cfg.experts_per_token
    if arch == "Mixtral":
        return _mixtral_config(base, experts, per_token)
    out = {k: v for k, v in base.items() if k not in ("architectures", "auto_map")}
    out.update(
        num_experts=experts,
        num_experts_per_tok=per_token,
        decoder_sparse_step=1,
        norm_topk_prob=True,
        moe_intermediate_size=base["intermediate_size"],
    )
    if arch == "Qwen MoE":
        out.update(
            model_type="qwen2_moe",
            architectures=["Qwen2MoeForCausalLM"],
            sliding_window=None,
            use_sliding_window=False,
            shared_expert_intermediate_size=base["intermediate_size"],
        )
    else:
        out.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    return out


def _mixtral_config(base: dict[str, Any], experts: int, per_token: int) -> dict[str, Any]:
    keep = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_theta",
        "rope_parameters", "rope_scaling", "tie_word_embeddings", "bos_token_id", "eos_token_id",
        "pad_token_id", "attention_dropout", "dtype", "torch_dtype",
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
    if "torch_dtype" in cfg:
        cfg.setdefault("dtype", cfg.pop("torch_dtype"))
    return cfg
