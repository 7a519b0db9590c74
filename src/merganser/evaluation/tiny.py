"""Small random Llama checkpoints built locally, for the demo and the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(
    vocab_size: int = 128,
    hidden_size: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    tie_word_embeddings: bool = False,
):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=tie_word_embeddings,
    )


def build_family(
    out: str | Path,
    experts: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    delta_scale: float = 0.02,
    **config_kwargs: int | bool,
) -> list[Path]:
    """Write ``base`` and ``expert_1..k`` (base plus a random delta each) under ``out``."""
    from transformers import LlamaForCausalLM

    out = Path(out)
    cfg = tiny_llama_config(**config_kwargs)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg).to(dtype)
    paths = [out / "base"]
    base.save_pretrained(paths[0])
    state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i in range(1, experts + 1):
        with torch.no_grad():
            for k, v in base.state_dict().items():
                noise = torch.randn(v.shape, generator=gen, dtype=torch.float32) * delta_scale
                v.copy_((state[k].float() + noise).to(dtype))
        paths.append(out / f"expert_{i}")
        base.save_pretrained(paths[-1])
    return paths
