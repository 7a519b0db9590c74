"""Tiny random models of many families, built from transformers configs (no downloads), and
dummy inputs to run them: the model-family matrix of tests/test_families.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LAYERS = 4
TEXT = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4}
DECODER = {
    **TEXT,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def _text(ids: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.arange(ids * length).reshape(ids, length) % 100 + 3}


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.linspace(-1, 1, 2 * 3 * size * size).reshape(2, 3, size, size)


def _build(name: str) -> tuple[Any, str, Callable[[], dict[str, torch.Tensor]]]:
    """(config, the architecture class name, dummy inputs) for family ``name``."""
    import transformers as T

    if name == "llama":
        return T.LlamaConfig(**DECODER), "LlamaForCausalLM", _text
    if name == "mistral":
        return T.MistralConfig(**DECODER), "MistralForCausalLM", _text
    if name == "qwen2":
        return T.Qwen2Config(**DECODER), "Qwen2ForCausalLM", _text
    if name == "qwen3":
        return T.Qwen3Config(**DECODER, head_dim=8), "Qwen3ForCausalLM", _text
    if name == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(
            **DECODER, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        )
        return cfg, "Qwen3MoeForCausalLM", _text
    if name == "mixtral":
        cfg = T.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)
        return cfg, "MixtralForCausalLM", _text
    if name == "gemma2":
        return T.Gemma2Config(**DECODER, head_dim=8), "Gemma2ForCausalLM", _text
    if name == "gemma3":
        return T.Gemma3TextConfig(**DECODER, head_dim=8), "Gemma3ForCausalLM", _text
    if name == "phi3":
        cfg = T.Phi3Config(**DECODER, pad_token_id=0)
        return cfg, "Phi3ForCausalLM", _text
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=128, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64)
        return cfg, "GPT2LMHeadModel", _text
    if name == "gpt_neox":
        cfg = T.GPTNeoXConfig(**{**DECODER, "num_key_value_heads": 4})
        return cfg, "GPTNeoXForCausalLM", _text
    if name in ("bert", "roberta"):
        Config = T.BertConfig if name == "bert" else T.RobertaConfig
        cfg = Config(**TEXT, num_hidden_layers=LAYERS, max_position_embeddings=64, pad_token_id=1)
        return cfg, "BertForMaskedLM" if name == "bert" else "RobertaForMaskedLM", _text
    if name == "t5":
        cfg = T.T5Config(
            vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=LAYERS,
            num_decoder_layers=LAYERS, num_heads=4, decoder_start_token_id=0,
        )  # fmt: skip
        return (
            cfg,
            "T5ForConditionalGeneration",
            lambda: {**_text(), "decoder_input_ids": _text()["input_ids"]},
        )
    if name == "clip":
        cfg = T.CLIPConfig(
            text_config={**TEXT, "num_hidden_layers": LAYERS, "max_position_embeddings": 16},
            vision_config={
                "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": LAYERS, "image_size": 32, "patch_size": 8,
            },
            projection_dim=16,
        )  # fmt: skip
        return cfg, "CLIPModel", lambda: {**_text(length=6), "pixel_values": _pixels()}
    if name == "vit":
        cfg = T.ViTConfig(
            hidden_size=32, intermediate_size=64, num_attention_heads=4,
            num_hidden_layers=LAYERS, image_size=32, patch_size=8, num_labels=3,
        )  # fmt: skip
        return cfg, "ViTForImageClassification", lambda: {"pixel_values": _pixels()}
    if name == "qwen2_vl":
        rope = {"rope_type": "default", "mrope_section": [1, 1, 2]}
        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2}
        cfg = T.Qwen2VLConfig(
            text_config={**DECODER, "rope_parameters": rope}, vision_config=vision
        )
        return cfg, "Qwen2VLForConditionalGeneration", _text
    raise KeyError(name)


FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma2", "gemma3", "qwen2_vl",
    "phi3", "gpt2", "gpt_neox", "bert", "roberta", "t5", "clip", "vit",
)  # fmt: skip


def build_family(name: str, root: Path, experts: int = 2, seed: int = 0) -> list[Path]:
    """``root/base`` and ``root/expert_1..k`` of family ``name``: a random model, then the
    same plus small random deltas, each saved with save_pretrained (safetensors, float32).
    """
    import transformers as T

    cfg, arch, _ = _build(name)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(T, arch)(cfg).eval()
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    g = torch.Generator().manual_seed(seed + 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(1, experts + 1):
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(state[k] + 0.02 * torch.randn(v.shape, generator=g))
        paths.append(root / f"expert_{i}")
        model.save_pretrained(paths[-1])
    return paths


def load(folder: Path) -> tuple[Any, dict[str, list[str]]]:
    """The model a folder holds, with the class its config names, and transformers' loading
    report (missing and unexpected keys).
    """
    import json

    import transformers as T

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model, info = getattr(T, arch).from_pretrained(folder, output_loading_info=True)
    return model.eval(), info


def inputs(name: str) -> dict[str, torch.Tensor]:
    return _build(name)[2]()
