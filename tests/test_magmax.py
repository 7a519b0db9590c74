"""MagMax (spec algorithms-2.md §7): its worked example, and merging through a recipe."""

from __future__ import annotations

import torch
from conftest import load_folder, write_model, write_recipe

import merganser


def test_magmax_spec_7_2_worked_example() -> None:
    base = torch.zeros(4)
    t1 = torch.tensor([0.3, -0.5, 0.2, 0.0])
    t2 = torch.tensor([-0.4, 0.5, 0.1, 0.0])  # index 1: |τ| tie -> the later model
    out = merganser.merge_tensors("magmax", [t1, t2], base=base)
    assert torch.allclose(out, torch.tensor([-0.2, 0.25, 0.1, 0.0]))
    assert torch.equal(merganser.merge_tensors("magmax", [t1, t2], base=base, **{"lambda": 1.0}),
                       torch.tensor([-0.4, 0.5, 0.2, 0.0]))  # fmt: skip


def test_magmax_one_model_with_lambda_one_is_that_model(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    base = write_model(tmp_path / "base", {"w": torch.randn(8, 8, generator=g)})
    ft = write_model(tmp_path / "ft", {"w": torch.randn(8, 8, generator=g)})
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "magmax", "base_model": str(base), "models": [{"model": str(ft)}],
         "parameters": {"lambda": 1.0}},
    )  # fmt: skip
    out = load_folder(merganser.merge(recipe, tmp_path / "o"))
    # θ₀ + (θ − θ₀) is θ up to one float32 rounding.
    torch.testing.assert_close(out["w"], load_folder(ft)["w"], rtol=0, atol=1e-6)
