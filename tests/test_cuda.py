"""--device cuda runs the arithmetic on a GPU and gives the CPU's results (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_folder, write_model

import merganser

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "della",
    "breadcrumbs",
    "slerp",
    "model_stock",
    "sce",
    "dppa",
    "karcher",
]


@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(tmp_path, method) -> None:
    g = torch.Generator().manual_seed(0)

    def t():
        return {
            "model.layers.0.mlp.weight": torch.randn(64, 32, generator=g),
            "model.layers.1.mlp.weight": torch.randn(64, 32, generator=g),
            "model.norm.weight": torch.randn(32, generator=g),
        }

    paths = [write_model(tmp_path / f"m{i}", t(), {"num_hidden_layers": 2}) for i in range(3)]
    needs_base = method not in ("linear", "karcher")
    recipe = {
        "merge_method": method,
        "random_seed": 1,
        "models": [{"model": str(p)} for p in (paths[1:] if needs_base else paths)][
            : 1 if method == "slerp" else None
        ],
    }
    if needs_base:
        recipe["base_model"] = str(paths[0])
    if method in ("ties", "dare_ties", "breadcrumbs"):
        recipe["parameters"] = {"density": 0.5}
    if method == "della":
        recipe["parameters"] = {"density": 0.5, "epsilon": 0.1}
    cpu = load_folder(merganser.merge(recipe, tmp_path / "cpu"))
    gpu = load_folder(
        merganser.merge(recipe, tmp_path / "gpu", merganser.MergeOptions(device="cuda"))
    )
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5)
