"""Layer slicing (frankenmerges) and the vocabulary-size policy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_folder, write_model

import merganser
from merganser.evaluation.tiny import build_family


@pytest.fixture(scope="module")
def four_layer_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam4")
    return build_family(root, experts=1, seed=3, dtype=torch.float32, layers=4)


def test_passthrough_slices_stack_layers_and_load(four_layer_family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    a, b = four_layer_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        ],
    }
    out = merganser.merge(recipe, tmp_path / "frank")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got, sa, sb = load_folder(out), load_folder(a), load_folder(b)
    for k in range(6):
        src, layer = (sa, k) if k < 3 else (sb, k - 3 + 1)
        name = f"model.layers.{k}.mlp.up_proj.weight"
        assert torch.equal(got[name], src[f"model.layers.{layer}.mlp.up_proj.weight"]), k
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])
    assert not any(".layers.6." in n for n in got)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_slerp_slices_use_per_slice_gradients(four_layer_family, tmp_path) -> None:
    a, b = four_layer_family
    recipe = {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [0, 4]},
                    {"model": str(b), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.0}]},
    }
    got, sa, sb = (
        load_folder(merganser.merge(recipe, tmp_path / "o")),
        load_folder(a),
        load_folder(b),
    )
    n = "model.layers.{}.mlp.down_proj.weight"
    assert torch.equal(got[n.format(0)], sa[n.format(0)])  # t = 0 at the first layer
    torch.testing.assert_close(got[n.format(3)], sb[n.format(3)])  # t = 1 at the last
    assert torch.equal(
        got["model.layers.3.self_attn.q_proj.weight"], sa["model.layers.3.self_attn.q_proj.weight"]
    )


def test_slice_layer_range_outside_the_model_is_one_line(four_layer_family, tmp_path) -> None:
    a, _ = four_layer_family
    recipe = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(a), "layer_range": [2, 9]}]}],
    }
    with pytest.raises(
        merganser.MerganserError,
        match=r"slices\[0\]\.sources\[0\]\.layer_range: \[2, 9\] is not within",
    ):
        merganser.merge(recipe, tmp_path / "o")


def _vocab_models(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "lm_head.weight": torch.randn(10, 4, generator=g),
        "w": torch.randn(4, 4, generator=g),
    }
    big = {k: (torch.randn(12, 4, generator=g) if k != "w" else v + 1) for k, v in base.items()}
    return (
        write_model(tmp_path / "base", base, {"vocab_size": 10}),
        write_model(tmp_path / "big", big, {"vocab_size": 12}),
        base,
        big,
    )


def test_vocab_mismatch_is_an_error_by_default(tmp_path) -> None:
    b, big, *_ = _vocab_models(tmp_path)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(b),
        "models": [{"model": str(big)}],
    }
    with pytest.raises(merganser.MerganserError, match=r"vocabulary sizes differ.*vocab_policy"):
        merganser.merge(recipe, tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("policy", ["common_submatrix", "base"])
def test_vocab_policies(tmp_path, policy) -> None:
    b, big, base, bigt = _vocab_models(tmp_path)
    recipe = {
        "merge_method": "linear",
        "vocab_policy": policy,
        "models": [{"model": str(big)}, {"model": str(b)}],
    }
    out = merganser.merge(recipe, tmp_path / "o")
    got = load_folder(out)
    e = "model.embed_tokens.weight"
    if policy == "common_submatrix":
        assert got[e].shape == (10, 4)
        torch.testing.assert_close(got[e], (bigt[e][:10] + base[e]) / 2)
        assert json.loads((out / "config.json").read_text())["vocab_size"] == 10
    else:  # the reference (first model here) keeps its 12 rows; the short model borrows them
        assert got[e].shape == (12, 4)
        torch.testing.assert_close(got[e][:10], (bigt[e][:10] + base[e]) / 2)
        torch.testing.assert_close(got[e][10:], bigt[e][10:])
