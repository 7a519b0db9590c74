"""`merganser moe` (issue 31; spec algorithms-2.md §9): mergekit-moe's YAML, a Mixtral that
transformers loads, routers from the prompts as mergekit computes them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from conftest import load_folder, write_tokenizer

from merganser.cli import main
from merganser.pipeline.moe import cheap_embed_vector

warnings.filterwarnings("ignore", category=UserWarning)
WORDS = ["<unk>", "<s>", "</s>", "add", "two", "numbers", "reverse", "the", "text", "please"]


def _dense(folder: Path, seed: int, like: Path | None, family: str) -> Path:
    """A tiny dense model; an expert (``like`` given) is the base with its own MLPs."""
    cfg_cls, cls, extra = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 8}),
    }[family]
    cfg = cfg_cls(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **extra)  # fmt: skip
    cfg.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(cfg)
    if like is not None:
        base = cls.from_pretrained(like)
        state = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
        model.load_state_dict(state, strict=False)
    model.save_pretrained(folder)
    write_tokenizer(folder, WORDS, bos_token="<s>", eos_token="</s>")
    return folder


def _copies(root: Path, base: Path, cls, n: int = 2) -> list[Path]:
    """``n`` experts that are the base itself, saved anew."""
    out = []
    for i in range(n):
        folder = root / f"copy{i}"
        cls.from_pretrained(base).save_pretrained(folder)
        write_tokenizer(folder, WORDS, bos_token="<s>", eos_token="</s>")
        out.append(folder)
    return out


def _llama(folder: Path, seed: int, like: Path | None = None) -> Path:
    return _dense(folder, seed, like, "llama")


def _config(tmp_path: Path, experts: list[Path], base: Path, **extra) -> Path:
    prompts = [["add two numbers"], ["reverse the text"], ["please add"]]
    cfg = {"base_model": str(base), "gate_mode": "cheap_embed", "experts_per_token": 2,
           "experts": [{"source_model": str(e), "positive_prompts": prompts[i]}
                       for i, e in enumerate(experts)], **extra}  # fmt: skip
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    "mode", ["cheap_embed", "hidden", "hidden_avg", "random", "uniform_random"]
)
def test_moe_loads_as_mixtral_with_the_experts_mlps(tmp_path, capsys, mode) -> None:
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(3)]
    cfg = _config(tmp_path, experts, base, gate_mode=mode)
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    model, info = T.MixtralForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    out = load_folder(tmp_path / "out")
    for e, folder in enumerate(experts):
        src = load_folder(folder)
        for proj, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            got = out[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"]
            assert torch.equal(got, src[f"model.layers.1.mlp.{proj}.weight"])
    b = load_folder(base)
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"],
                       b["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    gate = out["model.layers.0.block_sparse_moe.gate.weight"]
    assert gate.shape == (3, 16) and torch.isfinite(gate).all()
    if mode not in ("random", "uniform_random"):  # unit rows, as mergekit normalises them
        torch.testing.assert_close(gate.norm(dim=1), torch.ones(3))
    ids = torch.tensor([[1, 3, 4, 5]])
    assert torch.isfinite(model(ids).logits).all()


def test_a_moe_of_copies_of_the_base_is_the_base(tmp_path, capsys) -> None:
    """Every expert the base's own MLP: whatever the routing, the output is the base's."""
    base = _llama(tmp_path / "base", 0)
    copies = _copies(tmp_path, base, T.LlamaForCausalLM)
    cfg = _config(tmp_path, copies, base, gate_mode="hidden")
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    want = T.LlamaForCausalLM.from_pretrained(base)(ids).logits
    got = T.MixtralForCausalLM.from_pretrained(tmp_path / "out")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cheap_embed_spec_9_3_worked_example() -> None:
    e = torch.tensor([[0.0, 0, 0], [0.1, 0.1, 0.1], [1, 0, 0], [0, 2, 0], [0, 0, 3]])
    pos = cheap_embed_vector(e, torch.tensor([[1, 2, 3], [1, 1, 2]]),
                             torch.tensor([[1.0, 1, 1], [0, 1, 1]]))  # fmt: skip
    neg = cheap_embed_vector(e, torch.tensor([[1, 4]]), torch.tensor([[1.0, 1]]))
    torch.testing.assert_close(pos, torch.tensor([0.70565, 0.70565, 0.06415]), atol=1e-5, rtol=0)
    row = pos - neg
    row = row / row.norm()
    torch.testing.assert_close(row, torch.tensor([0.50463, 0.50463, -0.700498]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"experts_per_token": 4}, "experts_per_token: 4 with 3 experts"),
        ({"gate_mode": "softmax"}, "gate_mode: expected one of"),
        ({"shared_experts": [{"source_model": "@e0"}]}, "deepseek-ai's remote code"),
        ({"architecture": "qwen"}, "no MoE architecture fits these models (Qwen MoE: exactly"),
        ({"architecture": "falcon"}, "names none of Mixtral"),
    ],
)
def test_bad_moe_configs_are_one_line(tmp_path, capsys, extra, message) -> None:
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(3)]
    extra = yaml.safe_load(yaml.safe_dump(extra).replace("'@e0'", str(experts[0])))
    cfg = _config(tmp_path, experts, base, **extra)
    capsys.readouterr()
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_same_prompts_or_same_model_are_refused(tmp_path, capsys) -> None:
    base = _llama(tmp_path / "base", 0)
    e = _llama(tmp_path / "e", 1, like=base)
    cfg = {"base_model": str(base), "gate_mode": "cheap_embed",
           "experts": [{"source_model": str(e), "positive_prompts": ["add"]},
                       {"source_model": str(e), "positive_prompts": ["reverse"]}]}  # fmt: skip
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["moe", str(path), str(tmp_path / "out")]) == 1
    assert "every expert is the same model" in capsys.readouterr().err
    merge_cfg = json.loads(json.dumps(cfg))
    merge_cfg["experts"][1]["source_model"] = str(base)
    merge_cfg["experts"][1]["positive_prompts"] = ["add"]
    path.write_text(yaml.safe_dump(merge_cfg))
    assert main(["moe", str(path), str(tmp_path / "out")]) == 1
    assert "same prompts" in capsys.readouterr().err


def test_a_prompt_routes_to_the_expert_it_named(tmp_path, capsys) -> None:
    """Each expert a copy of the base with its own MLPs; with gate_mode hidden, each expert's
    positive prompt sends its last token to that expert first (layer 0's router).
    """
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(3)]
    cfg = _config(tmp_path, experts, base, gate_mode="hidden")
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    model = T.MixtralForCausalLM.from_pretrained(tmp_path / "out")
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "out")
    prompts = ["add two numbers", "reverse the text", "please add"]
    for k, prompt in enumerate(prompts):
        ids = tok("<s>" + prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():  # the model's own routing, at the prompt's last token
            logits = model(ids, output_router_logits=True).router_logits
        first = [int(layer.reshape(ids.shape[1], -1)[-1].argmax()) for layer in logits]
        assert first[0] == k, (prompt, first)


def test_experts_of_another_shape_are_refused(tmp_path, capsys) -> None:
    base = _llama(tmp_path / "base", 0)
    shape = {"vocab_size": len(WORDS), "hidden_size": 16, "intermediate_size": 48,
             "num_attention_heads": 2, "num_key_value_heads": 1,
             "num_hidden_layers": 2}  # fmt: skip
    cfg_t = T.LlamaConfig(**shape)
    cfg_t.architectures = ["LlamaForCausalLM"]
    T.LlamaForCausalLM(cfg_t).save_pretrained(tmp_path / "wide")
    experts = [_llama(tmp_path / "e0", 1, like=base), tmp_path / "wide"]
    cfg = _config(tmp_path, experts, base)
    capsys.readouterr()
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "of another shape than the base's" in err
    assert not (tmp_path / "out").exists()


def _qwen3(folder: Path, seed: int, like: Path | None = None) -> Path:
    return _dense(folder, seed, like, "qwen3")


def test_qwen3_experts_make_a_qwen3_moe_whose_copies_of_the_base_are_the_base(tmp_path) -> None:
    """Qwen3 models can only become Qwen3 MoE (as mergekit-moe chooses); it loads with no
    missing keys, each expert is its source's MLP, and a mixture of copies of the base
    computes the base's logits (top-k weights renormalised: norm_topk_prob).
    """
    base = _qwen3(tmp_path / "base", 0)
    experts = [_qwen3(tmp_path / f"e{i}", i + 1, like=base) for i in range(3)]
    cfg = _config(tmp_path, experts, base, gate_mode="hidden")
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 0
    model, info = T.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_experts == 3 and model.config.norm_topk_prob
    out = load_folder(tmp_path / "out")
    for e, folder in enumerate(experts):
        src = load_folder(folder)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            got = out[f"model.layers.1.mlp.experts.{e}.{proj}.weight"]
            assert torch.equal(got, src[f"model.layers.1.mlp.{proj}.weight"])
    copies = _copies(tmp_path, base, T.Qwen3ForCausalLM)
    cfg = _config(tmp_path, copies, base, gate_mode="hidden")
    assert main(["moe", str(cfg), str(tmp_path / "same")]) == 0
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    want = T.Qwen3ForCausalLM.from_pretrained(base)(ids).logits
    got = T.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "same")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_a_shared_expert_makes_a_qwen2_moe(tmp_path) -> None:
    """One shared expert with prompts: Qwen MoE (Qwen2-MoE), as mergekit-moe writes it: the
    routed experts, the shared expert's MLP and its sigmoid gate (its prompt vector), and zero
    attention biases where the Llama inputs have none. transformers loads it with no missing
    or unexpected keys.
    """
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(3)]
    shared = _llama(tmp_path / "shared", 9, like=base)
    extra = {"shared_experts": [{"source_model": str(shared), "positive_prompts": ["the"]}]}
    cfg = _config(tmp_path, experts, base, **extra)
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 0
    model, info = T.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_experts == 3
    out = load_folder(tmp_path / "out")
    src = load_folder(shared)
    assert torch.equal(out["model.layers.0.mlp.shared_expert.up_proj.weight"],
                       src["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    assert out["model.layers.0.mlp.gate.weight"].shape == (3, 16)
    gate = out["model.layers.0.mlp.shared_expert_gate.weight"]
    assert gate.shape == (1, 16)
    torch.testing.assert_close(gate.norm(), torch.tensor(1.0))
    assert not out["model.layers.0.self_attn.k_proj.bias"].any()
    assert torch.isfinite(model(torch.tensor([[1, 3, 4, 5]])).logits).all()


def test_merge_base_merges_the_non_mlp_tensors_with_a_registered_method(tmp_path) -> None:
    """``merge_base`` (merganser's key): the base and the experts merged by the streaming
    engine give the MoE's attention, norms, embeddings and head; the experts' MLPs are still
    their own. No temporary folder is left beside the output.
    """
    base = _llama(tmp_path / "base", 0)
    experts = []
    for i in range(2):  # experts whose attention differs from the base's too
        folder = _llama(tmp_path / f"e{i}", i + 1)
        write_tokenizer(folder, WORDS, bos_token="<s>", eos_token="</s>")
        experts.append(folder)
    cfg = _config(tmp_path, experts, base, merge_base={"merge_method": "linear"})
    out = tmp_path / "moe_out"
    assert main(["moe", str(cfg), str(out)]) == 0
    got = load_folder(out)
    srcs = [load_folder(p) for p in (base, *experts)]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight",
                 "model.layers.1.input_layernorm.weight"):  # fmt: skip
        want = sum(s[name].float() for s in srcs) / 3
        torch.testing.assert_close(got[name].float(), want, rtol=0, atol=1e-6)
    assert torch.equal(got["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
                       srcs[2]["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    T.MixtralForCausalLM.from_pretrained(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_merge_base_names_its_own_models_is_one_line(tmp_path, capsys) -> None:
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(2)]
    bad = {"merge_method": "linear", "models": [{"model": str(base)}]}
    cfg = _config(tmp_path, experts, base, merge_base=bad)
    capsys.readouterr()
    assert main(["moe", str(cfg), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "merge_base: give merge_method" in err, err
    assert not (tmp_path / "out").exists()


def test_merge_base_carries_a_tokenizer_source(tmp_path) -> None:
    """A tokenizer other than the base's goes through merge_base (the merge pipeline aligns
    the embeddings); at the top level it is one line pointing there.
    """
    base = _llama(tmp_path / "base", 0)
    experts = [_llama(tmp_path / f"e{i}", i + 1, like=base) for i in range(2)]
    other = tmp_path / "e1"
    write_tokenizer(other, [*WORDS[:-1], "extra"], bos_token="<s>", eos_token="</s>")
    merge = {"merge_method": "linear", "tokenizer_source": "union"}
    cfg = _config(tmp_path, experts, base, merge_base=merge)
    out = tmp_path / "moe_out"
    assert main(["moe", str(cfg), str(out)]) == 0
    got = load_folder(out)
    assert got["model.embed_tokens.weight"].shape[0] == len(WORDS) + 1
    model = T.MixtralForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(WORDS) + 1
    tok = T.AutoTokenizer.from_pretrained(out)
    assert "extra" in tok.get_vocab()
    cfg = _config(tmp_path, experts, base, tokenizer_source="union")
    assert main(["moe", str(cfg), str(tmp_path / "bad")]) == 1
    assert not (tmp_path / "bad").exists()
