"""`merganser extract-lora` (issue 30; spec algorithms-2.md §11.3): an adapter from a full
fine-tune that PEFT loads, exact at full rank, with its per-module error reported truly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as T
from conftest import load_folder

import merganser
from merganser.cli import main
from merganser.pipeline.extract import extract_lora

warnings.filterwarnings("ignore", category=UserWarning)


def _pair(tmp_path: Path, cls_name: str = "LlamaForCausalLM", **extra) -> tuple[Path, Path]:
    """A tiny base and a fine-tune of it: every float tensor moved (norms, embeddings,
    biases included).
    """
    if cls_name == "GPT2LMHeadModel":
        cfg = T.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    else:
        shape = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                 "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                 "tie_word_embeddings": False}  # fmt: skip
        cfg = T.LlamaConfig(**{**shape, **extra})
    cfg.architectures = [cls_name]
    torch.manual_seed(0)
    model = getattr(T, cls_name)(cfg)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft"


def _peft_merged(base: Path, adapter: Path, cls_name: str = "LlamaForCausalLM") -> dict:
    cls = getattr(T, cls_name)
    merged = peft.PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize(
    ("cls_name", "extra"),
    [("LlamaForCausalLM", {}), ("LlamaForCausalLM", {"attention_bias": True}),
     ("GPT2LMHeadModel", {})],
    ids=["llama", "llama with biases", "gpt2 conv1d"],
)  # fmt: skip
def test_full_rank_reproduces_the_fine_tune(tmp_path, cls_name, extra) -> None:
    base, ft = _pair(tmp_path, cls_name, **extra)
    ext = extract_lora(ft, base, tmp_path / "ad", rank=64)
    assert ext.report()["max_relative_error"] < 1e-5
    want = load_folder(ft)
    # PEFT loads it, and its merge is the fine-tune (biases included: lora_bias is set).
    merged = _peft_merged(base, tmp_path / "ad", cls_name)
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-4)
    # merganser's own BASE+ADAPTER reads it back the same.
    ours = load_folder(merganser.merge(
        {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'ad'}"}]},
        tmp_path / "o", merganser.MergeOptions(progress=False)))  # fmt: skip
    for k, v in want.items():
        torch.testing.assert_close(ours[k], v, rtol=0, atol=1e-4)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    gpt2 = cls_name == "GPT2LMHeadModel"
    assert cfg["fan_in_fan_out"] is gpt2 and cfg["lora_bias"] is gpt2  # Conv1D layers: biased
    if extra:  # Llama's MLP has no bias: the attention layers whose bias moved are saved whole
        assert "model.layers.0.self_attn.q_proj" in cfg["modules_to_save"]


def test_low_rank_error_is_what_it_reports(tmp_path) -> None:
    base, ft = _pair(tmp_path)
    ext = extract_lora(ft, base, tmp_path / "ad", rank=2)
    merged = _peft_merged(base, tmp_path / "ad")
    b, f = load_folder(base), load_folder(ft)
    for module, (rank, err) in ext.modules.items():
        name = f"{module}.weight"
        delta = f[name] - b[name]
        got = float(torch.linalg.vector_norm(delta - (merged[name] - b[name])))
        assert rank == 2
        assert got / float(torch.linalg.vector_norm(delta)) == pytest.approx(err, rel=1e-3)
    assert "model.embed_tokens" in ext.saved and "lm_head" in ext.saved


def test_energy_picks_a_rank_per_module_and_peft_follows_the_pattern(tmp_path) -> None:
    base, ft = _pair(tmp_path)
    ext = extract_lora(ft, base, tmp_path / "ad", energy=0.6)
    ranks = {r for r, _ in ext.modules.values()}
    assert len(ranks) > 1 and all(e <= (1 - 0.6) ** 0.5 + 1e-6 for _, e in ext.modules.values())
    ours = load_folder(merganser.merge(
        {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'ad'}"}]},
        tmp_path / "o", merganser.MergeOptions(progress=False)))  # fmt: skip
    theirs = _peft_merged(base, tmp_path / "ad")
    for k, v in ours.items():
        torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-5)


def test_cli_report_and_refusals(tmp_path, capsys) -> None:
    base, ft = _pair(tmp_path)
    assert main(["extract-lora", str(ft), str(tmp_path / "ad"), "--base", str(base),
                 "--rank", "3", "--json"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 3
    # The output may not be an input, and an existing output needs --force.
    for out in (ft, tmp_path / "ad"):
        capsys.readouterr()
        rc = main(["extract-lora", str(ft), str(out), "--base", str(base), "--rank", "3"])
        assert rc == 1 and capsys.readouterr().err.count("\n") == 1
    other, _ = _pair(tmp_path / "wide", intermediate_size=48)
    capsys.readouterr()
    rc = main(["extract-lora", str(ft), str(tmp_path / "x"), "--base", str(other), "--rank", "2"])
    assert rc == 1 and "the base's" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
