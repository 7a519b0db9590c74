"""LoRA adapters as merge inputs (issue 30; spec algorithms-2.md §11): BASE+ADAPTER equals
PEFT's merge_and_unload, adapters merge by their ΔW (never A and B separately), and what
cannot be applied exactly is one line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as T
from conftest import load_folder, write_recipe

import merganser
from merganser.cli import main
from merganser.model import lora

warnings.filterwarnings("ignore", category=UserWarning)


def _llama(folder: Path, seed: int = 0, **extra) -> Path:
    shape = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
             "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
             "tie_word_embeddings": False}  # fmt: skip
    cfg = T.LlamaConfig(**{**shape, **extra})
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _adapter(base: Path, folder: Path, seed: int = 1, cls=None, **config) -> Path:
    """A PEFT adapter with random (non-zero) factors, saved as PEFT saves it."""
    cls = cls or T.LlamaForCausalLM
    torch.manual_seed(seed)
    targets = config.pop("target_modules", ["q_proj", "v_proj"])
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                         **config)  # fmt: skip
    model = peft.get_peft_model(cls.from_pretrained(base), lc)
    with torch.no_grad():  # a trained modules_to_save copy differs from the base's
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    model.save_pretrained(folder)
    return folder


def _unloaded(base: Path, adapter: Path, cls=None) -> dict[str, torch.Tensor]:
    cls = cls or T.LlamaForCausalLM
    merged = peft.PeftModel.from_pretrained(cls.from_pretrained(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    return load_folder(merganser.merge(recipe, out, merganser.MergeOptions(progress=False)))


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"target_modules": ["q_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
        {"use_dora": True},
        {"rank_pattern": {"v_proj": 3}, "alpha_pattern": {"q_proj": 8}},
    ],
    ids=["lora", "rslora", "embedding+modules_to_save", "dora", "rank/alpha patterns"],
)
def test_base_plus_adapter_is_peft_merge_and_unload(tmp_path, config) -> None:
    base = _llama(tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad", **config)
    got = _merge({"merge_method": "linear", "models": [{"model": f"{base}+{ad}"}]}, tmp_path / "o")
    want = _unloaded(base, ad)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    changed = [k for k in want if not torch.equal(want[k], load_folder(base)[k])]
    assert changed  # the adapter did change the model


def test_lora_bias_and_gpt2_conv1d(tmp_path) -> None:
    base = _llama(tmp_path / "base", attention_bias=True)
    ad = _adapter(base, tmp_path / "ad", lora_bias=True)
    got = _merge({"merge_method": "linear", "models": [{"model": f"{base}+{ad}"}]}, tmp_path / "o")
    for k, v in _unloaded(base, ad).items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5)
    cfg = T.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    cfg.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    T.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "g")
    gad = _adapter(tmp_path / "g", tmp_path / "gad", cls=T.GPT2LMHeadModel,
                   target_modules=["c_attn"], fan_in_fan_out=True)  # fmt: skip
    got = _merge({"merge_method": "linear", "models": [{"model": f"{tmp_path / 'g'}+{gad}"}]},
                 tmp_path / "og")  # fmt: skip
    want = _unloaded(tmp_path / "g", gad, T.GPT2LMHeadModel)
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)


def test_adapters_merge_by_their_deltas(tmp_path) -> None:
    """Task arithmetic over two adapter folders under base_model equals the same recipe over
    the two merged-and-unloaded models; PEFT's own add_weighted_adapter(linear) does not.
    """
    base = _llama(tmp_path / "base")
    ads = [_adapter(base, tmp_path / f"ad{i}", seed=i + 1) for i in range(2)]
    weights = [0.7, 0.4]
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [{"model": str(a), "parameters": {"weight": w}}
                         for a, w in zip(ads, weights, strict=True)]}  # fmt: skip
    got = _merge(recipe, tmp_path / "o")
    full = []
    for i, a in enumerate(ads):
        m = T.LlamaForCausalLM.from_pretrained(base)
        peft.PeftModel.from_pretrained(m, a).merge_and_unload().save_pretrained(tmp_path / f"f{i}")
        full.append(tmp_path / f"f{i}")
    recipe_full = {**recipe, "models": [{"model": str(f), "parameters": {"weight": w}}
                                        for f, w in zip(full, weights, strict=True)]}  # fmt: skip
    want = _merge(recipe_full, tmp_path / "o_full")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5)
    # PEFT's linear combination mixes A and B factor by factor: its cross terms are off.
    m = peft.PeftModel.from_pretrained(T.LlamaForCausalLM.from_pretrained(base), ads[0],
                                       adapter_name="a0")  # fmt: skip
    m.load_adapter(ads[1], adapter_name="a1")
    m.add_weighted_adapter(["a0", "a1"], weights, "mix", combination_type="linear")
    m.set_adapter("mix")
    peft_out = m.merge_and_unload(adapter_names=["mix"]).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert float((peft_out[name] - want[name]).abs().max()) > 1e-3
    assert float((got[name] - want[name]).abs().max()) <= 1e-5


def test_spec_11_1_worked_example() -> None:
    a = torch.tensor([[1.0, 0, 2], [0, 1, -1]])
    b = torch.tensor([[1.0, 0.5], [0, 2]])
    rows = slice(0, 2)
    assert lora.delta_rows(a, b, lora.scaling(4, 2), rows).tolist() == [[2, 1, 3], [0, 4, -4]]
    rs = lora.delta_rows(a, b, lora.scaling(4, 2, rslora=True), rows)
    torch.testing.assert_close(rs, torch.tensor([[2.828427, 1.414214, 4.242641],
                                                 [0, 5.656854, -5.656854]]))  # fmt: skip
    w0 = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    dora = lora.dora(w0 + lora.delta_rows(a, b, 2.0, rows), torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(dora, torch.tensor([[1.376494, 0.458831, 1.376494],
                                                   [0, 0.857493, -0.514496]]))  # fmt: skip


def _one_line(capsys, recipe: dict, tmp_path: Path) -> str:
    capsys.readouterr()
    rc = main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe)), str(tmp_path / "out"),
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_bad_adapters_are_one_line(tmp_path, capsys) -> None:
    base = _llama(tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad")
    capsys.readouterr()
    # A base of another shape.
    other = _llama(tmp_path / "wide", intermediate_size=48, hidden_size=24)
    err = _one_line(capsys, {"merge_method": "linear", "models": [{"model": f"{other}+{ad}"}]},
                    tmp_path)  # fmt: skip
    assert "an adapter of another model?" in err
    # An adapter naming another base.
    cfg = json.loads((ad / "adapter_config.json").read_text())
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_model.safetensors").write_bytes(
        (ad / "adapter_model.safetensors").read_bytes()
    )
    (named / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"})
    )
    err = _one_line(capsys, {"merge_method": "linear", "models": [{"model": f"{base}+{named}"}]},
                    tmp_path)  # fmt: skip
    assert "made for meta-llama/Llama-3.1-8B" in err
    # A truncated adapter file.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes(
        (ad / "adapter_model.safetensors").read_bytes()[:-40]
    )
    _one_line(capsys, {"merge_method": "linear", "models": [{"model": f"{base}+{bad}"}]}, tmp_path)
    # A pickle that builds more than tensors.
    pick = tmp_path / "pick"
    pick.mkdir()
    (pick / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save({"x": Path("/")}, pick / "adapter_model.bin")
    err = _one_line(capsys, {"merge_method": "linear", "models": [{"model": f"{base}+{pick}"}]},
                    tmp_path)  # fmt: skip
    assert "pickle" in err or "weights_only" in err
    # Another PEFT type.
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    (ia3 / "adapter_model.safetensors").write_bytes((ad / "adapter_model.safetensors").read_bytes())
    err = _one_line(capsys, {"merge_method": "linear", "models": [{"model": f"{base}+{ia3}"}]},
                    tmp_path)  # fmt: skip
    assert "a IA3 adapter; merganser applies LoRA adapters only" in err
    # An adapter folder with no base to apply it to.
    err = _one_line(capsys, {"merge_method": "linear", "models": [{"model": str(ad)}]}, tmp_path)
    assert "is a PEFT LoRA adapter: name its base" in err


def test_merged_adapters_written_as_an_adapter(tmp_path, capsys) -> None:
    """--output adapter: task arithmetic over two rank-2 adapters, factored at rank 4 (their
    ranks summed), is exact: PEFT's merge of the written adapter is the full-model merge.
    """
    base = _llama(tmp_path / "base")
    ads = [_adapter(base, tmp_path / f"ad{i}", seed=i + 1) for i in range(2)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(a), "parameters": {"weight": w}}
                    for a, w in zip(ads, (0.7, 0.4), strict=True)]},
    )  # fmt: skip
    full = load_folder(merganser.merge(recipe, tmp_path / "full"))
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(tmp_path / "ad_out"), "--output", "adapter",
               "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 0 and "at rank 4" in err, err
    cfg = json.loads((tmp_path / "ad_out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    merged = _unloaded(base, tmp_path / "ad_out")
    for k, v in full.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-5)
    assert (
        "| `model.layers.0.self_attn.q_proj` | 4 |"
        in (tmp_path / "ad_out" / "README.md").read_text()
    )
    # A plain model among the inputs cannot be written as an adapter of the base.
    plain = write_recipe(
        tmp_path / "p.yaml",
        {"merge_method": "linear", "models": [{"model": str(tmp_path / "full")},
                                              {"model": f"{base}+{ads[0]}"}]},
    )  # fmt: skip
    capsys.readouterr()
    rc = main(["merge", str(plain), str(tmp_path / "p_out"), "--output", "adapter"])
    assert (
        rc == 1 and "needs every input to be a LoRA adapter of one base" in capsys.readouterr().err
    )


def test_plan_finds_base_plus_adapter_inputs(tmp_path, capsys) -> None:
    """`merganser plan` reported BASE+ADAPTER references as missing inputs."""
    base = _llama(tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad")
    one = {"merge_method": "linear", "models": [{"model": f"{base}+{ad}"}]}
    recipe = write_recipe(tmp_path / "r.yaml", one)
    capsys.readouterr()
    assert main(["plan", str(recipe), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["missing"] == [] and plan["inputs"][0]["status"] == "found"
    assert plan["output_tensors"] > 0
    # A missing adapter is listed as missing.
    missing = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'no'}"}]}
    gone = write_recipe(tmp_path / "g.yaml", missing)
    assert main(["plan", str(gone), "--json"]) == 1


def test_the_card_names_base_and_adapter(tmp_path) -> None:
    """The card named a BASE+ADAPTER input by the adapter's folder alone."""
    base = _llama(tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad")
    out = merganser.merge({"merge_method": "linear", "models": [{"model": f"{base}+{ad}"}]},
                          tmp_path / "o", merganser.MergeOptions(progress=False))  # fmt: skip
    card = (out / "README.md").read_text()
    assert '- "base+ad"' in card and str(tmp_path) not in card


def test_output_adapter_applies_to_the_final_merge_of_a_multi_document_recipe(tmp_path) -> None:
    """--output adapter was ignored for multi-document recipes (the final merge wrote a model)."""
    import yaml

    base = _llama(tmp_path / "base")
    ads = [_adapter(base, tmp_path / f"ad{i}", seed=i + 1) for i in range(2)]
    docs = [
        {"name": "one", "merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(ads[0])}]},
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(ads[1])}]},
    ]  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    out = merganser.merge(path, tmp_path / "out", merganser.MergeOptions(output="adapter"))
    assert (out / "adapter_config.json").is_file()
    assert (tmp_path / "out.intermediate" / "one" / "model.safetensors").is_file()


def test_merge_json_reports_an_adapter_output(tmp_path, capsys) -> None:
    """merge --json read the model manifest, which an adapter output does not have."""
    base = _llama(tmp_path / "base")
    ad = _adapter(base, tmp_path / "ad")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(ad)}],
        },
    )
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(tmp_path / "o"), "--output", "adapter", "--json",
               "--no-progress"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["kind"] == "adapter" and report["bytes"] > 0
