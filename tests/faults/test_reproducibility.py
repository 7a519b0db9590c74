"""Same recipe and seed: byte-identical output across runs, thread counts and memory budgets;
the model card records the version, the recipe hash and content checksums of the inputs."""

from __future__ import annotations

import hashlib
import json

import torch
import yaml
from conftest import load_folder, tree_digest, write_model, write_recipe

import merganser


def _setup(tmp_path):
    g = torch.Generator().manual_seed(0)

    def mk() -> dict[str, torch.Tensor]:
        return {
            "model.layers.0.w": torch.randn(64, 96, generator=g).to(torch.bfloat16),
            "model.layers.1.w": torch.randn(64, 96, generator=g),
            "model.embed_tokens.weight": torch.randn(40, 96, generator=g).half(),
        }

    paths = [write_model(tmp_path / f"m{i}", mk(), {"num_hidden_layers": 2}) for i in range(3)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "dare_ties",
            "base_model": str(paths[0]),
            "random_seed": 9,
            "models": [
                {"model": str(p), "parameters": {"density": 0.4, "weight": [0.3, 0.9]}}
                for p in paths[1:]
            ],
        },
    )
    return paths, recipe


def test_byte_identical_across_runs_threads_and_budgets(tmp_path) -> None:
    _, recipe = _setup(tmp_path)
    runs = [
        merganser.MergeOptions(threads=1),
        merganser.MergeOptions(threads=1),
        merganser.MergeOptions(threads=4, torch_threads=2),
    ]
    digests = [
        tree_digest(merganser.merge(recipe, tmp_path / f"o{i}", o)) for i, o in enumerate(runs)
    ]
    assert all(d == digests[0] for d in digests), digests
    # An elementwise method under a tiny budget reads in chunks: same bytes, same input digests.
    ta = yaml.safe_load(recipe.read_text()) | {"merge_method": "task_arithmetic"}
    whole = merganser.merge(ta, tmp_path / "whole")
    chunked = merganser.merge(
        ta, tmp_path / "chunked", merganser.MergeOptions(memory_budget=20_000)
    )
    assert tree_digest(whole) == tree_digest(chunked)


def test_card_and_manifest_record_provenance(tmp_path) -> None:
    paths, recipe = _setup(tmp_path)
    out = merganser.merge(recipe, tmp_path / "o")
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "merganser_manifest.json").read_text())
    recipe_hash = hashlib.sha256(recipe.read_text().encode()).hexdigest()
    assert manifest["version"] == merganser.__version__ and merganser.__version__ in card
    assert manifest["recipe_sha256"] == recipe_hash and recipe_hash in card
    for p in paths:
        digest = manifest["inputs"][str(p)]
        assert len(digest) == 64 and digest in card
    assert len(set(manifest["inputs"].values())) == 3  # different models, different digests
    # The digest is of tensor content: the same tensors saved in another order keep it.
    tensors = load_folder(paths[1])
    again = write_model(
        tmp_path / "copy", dict(reversed(list(tensors.items()))), {"num_hidden_layers": 2}
    )
    moved = yaml.safe_load(recipe.read_text().replace(str(paths[1]), str(again)))
    out2 = merganser.merge(moved, tmp_path / "o2")
    m2 = json.loads((out2 / "merganser_manifest.json").read_text())
    assert m2["inputs"][str(again)] == manifest["inputs"][str(paths[1])]


def test_nonfinite_results_are_named_or_written_on_request(tmp_path) -> None:
    a = write_model(tmp_path / "a", {"ok": torch.ones(3), "bad.weight": torch.ones(3)})
    b = write_model(
        tmp_path / "b", {"ok": torch.ones(3), "bad.weight": torch.tensor([1.0, float("nan"), 2.0])}
    )
    recipe = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    try:
        merganser.merge(recipe, tmp_path / "o")
        raise AssertionError("NaN was written silently")
    except merganser.MerganserError as e:
        assert "tensor bad.weight: merge produced NaN or Inf" in str(e)
    assert not (tmp_path / "o").exists()
    out = merganser.merge(recipe, tmp_path / "o", merganser.MergeOptions(allow_nonfinite=True))
    assert torch.isnan(load_folder(out)["bad.weight"][1])
