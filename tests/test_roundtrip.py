"""A sharded merge of real Llama folders loads back in transformers with the predicted logits."""

from __future__ import annotations

import json

import torch
from conftest import load_folder, write_recipe
from safetensors.torch import load_file

import merganser


def test_sharded_merge_loads_in_transformers_with_predicted_logits(tiny_family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base, e1, e2 = tiny_family
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [
                {"model": str(e1), "parameters": {"weight": 0.7}},
                {"model": str(e2), "parameters": {"weight": [0.2, 0.9]}},
            ],
            "parameters": {"lambda": 0.8},
        },
    )
    out = tmp_path / "merged"
    merganser.merge(recipe, out, merganser.MergeOptions(out_shard_size=60_000))

    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for name in (
        "config.json",
        "generation_config.json",
        "README.md",
        "merganser_recipe.yaml",
        "merganser_manifest.json",
    ):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".merged*")), "temporary folder left behind"

    # What the tensors should be, computed independently of the engine's planner.
    sd = [load_file(str(p / "model.safetensors")) for p in (base, e1, e2)]
    num_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    expected = {}
    for k, b in sd[0].items():
        if ".layers." in k:
            tdepth = int(k.split(".layers.")[1].split(".")[0]) / (num_layers - 1)
        else:
            tdepth = 0.0  # mergekit 0.1.5: every tensor outside the layer stack
        w2 = 0.2 + (0.9 - 0.2) * tdepth
        expected[k] = b + 0.8 * (0.7 * (sd[1][k] - b) + w2 * (sd[2][k] - b))
    got = load_folder(out)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = LlamaForCausalLM(loaded.config).eval()
    reference.load_state_dict(expected)
    ids = torch.randint(
        0, loaded.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_out_dtype_updates_config_and_tensors(tiny_family, tmp_path) -> None:
    base, e1, _ = tiny_family
    out = merganser.merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(base)}, {"model": str(e1)}],
            "out_dtype": "bfloat16",
        },
        tmp_path / "o",
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_folder(out).values())


def test_tokenizer_files_come_from_the_base(tiny_family, tmp_path) -> None:
    base, e1, _ = tiny_family
    (base / "tokenizer.json").write_text('{"version": "1.0"}')
    (base / "special_tokens_map.json").write_text("{}")
    out = merganser.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(e1)}],
        },
        tmp_path / "o",
    )
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "special_tokens_map.json").is_file()
