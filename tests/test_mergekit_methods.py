"""mergekit 0.1.5's arcee_fusion, multislerp, nearswap, ram and ramplus_tl (spec
algorithms-2.md §8): the worked examples, their properties, and merging through recipes.
Parity with mergekit itself is in test_mergekit_compat.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_folder, write_model, write_recipe

import merganser
from merganser.errors import RecipeError

T = torch.tensor


def test_arcee_fusion_spec_8_1_worked_example() -> None:
    base = T([[0, 0.1, 0.2, 0.3], [1, 0, -1, 0.5]])
    ft = T([[0.05, 0.1, 0.9, 0.3], [1, 0.2, -1, 0.45]])
    out = merganser.merge_tensors("arcee_fusion", [ft], base=base)
    # threshold 0.001182: only row 0's changes (importance 0.002694, 0.037716) pass.
    assert torch.allclose(out, T([[0.05, 0.1, 0.9, 0.3], [1, 0, -1, 0.5]]))


def test_arcee_fusion_threshold_collapse_gives_the_fine_tuned_tensor() -> None:
    """Over 75 % of entries unchanged: q1 = med = q3 = 0, so every entry passes (pitfall 2)."""
    base = torch.zeros(2, 8)
    ft = base.clone()
    ft[0, 0], ft[1, 3] = 0.5, -0.25
    assert torch.equal(merganser.merge_tensors("arcee_fusion", [ft], base=base), ft)


def test_multislerp_spec_8_2_worked_examples() -> None:
    out = merganser.merge_tensors(
        "multislerp", [T([2.0, 1, 1]), T([1.0, 3, 1]), T([1, 1, 0.5])], base=T([1.0, 1, 1]),
        weight=[1, 1, 2],
    )  # fmt: skip
    assert torch.allclose(out, T([1.408248, 1.408248, 0.183503]), atol=1e-6)
    two = merganser.merge_tensors("multislerp", [T([1.0, 0]), T([0.0, 1])], weight=[0.75, 0.25])
    assert torch.allclose(two, T([0.948683, 0.316228]), atol=1e-6)
    # It is nlerp, not slerp: slerp at t = 0.25 lands at 22.5°, not 18.43°.
    slerp = merganser.merge_tensors("slerp", [T([0.0, 1])], base=T([1.0, 0]), t=0.25)
    assert torch.allclose(slerp, T([0.92388, 0.382683]), atol=1e-6)
    assert not torch.allclose(two, slerp, atol=1e-3)


def test_multislerp_one_model_is_that_model_and_weight_is_required() -> None:
    x = T([0.5, -2.0, 3.0])
    one = merganser.merge_tensors("multislerp", [x], base=torch.zeros(3), weight=[7])
    assert torch.equal(one, x)
    with pytest.raises(RecipeError, match="weight is required for multislerp"):
        merganser.merge_tensors("multislerp", [x, x])
    with pytest.raises(ValueError, match="antipodal"):
        merganser.merge_tensors("multislerp", [x, -x, 2 * x, -2 * x], weight=[1, 1, 1, 1])
    # Two opposite directions fall back to the weighted sum, as mergekit does.
    assert torch.equal(merganser.merge_tensors("multislerp", [x, -x], weight=[1, 1]), 0 * x)


def test_nearswap_spec_8_3_worked_example() -> None:
    out = merganser.merge_tensors(
        "nearswap", [T([5e-5, -2e-4, 1e-3, 0, 0.99])], base=T([0.0, 0, 0, 0, 1]), t=1e-4
    )
    assert torch.allclose(out, T([5e-5, -1e-4, 1e-4, 0, 0.9999]), atol=1e-8)
    with pytest.raises(RecipeError, match="t is required for nearswap"):
        merganser.merge_tensors("nearswap", [T([1.0])], base=T([0.0]))


@pytest.mark.parametrize("t", [0.0, 1e-3, 10.0])
def test_nearswap_moves_the_base_at_most_t(t) -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    out = merganser.merge_tensors("nearswap", [b], base=a, t=t)
    torch.testing.assert_close(out, a + (b - a).clamp(-t, t), rtol=0, atol=1e-6)


def test_ram_and_ramplus_tl_spec_8_4_worked_example() -> None:
    taus = [
        T([0.2, 0, 0.1, 0.3, 5e-6, 0]), T([0.4, 0, 0, -0.1, 0.2, 0]), T([0, 0.5, 0, 0.1, 0, 0]),
    ]  # fmt: skip
    base = torch.zeros(6)
    ram = merganser.merge_tensors("ram", taus, base=base)
    assert torch.allclose(ram, T([0.3, 0.5, 0.1, 0.1, 0.2, 0.0]))
    plus = merganser.merge_tensors("ramplus_tl", taus, base=base)
    assert torch.allclose(plus, T([0.3, 0.51, 0.102, 0.1, 0.204, 0.0]))
    # r = 0 switches the rescale off: RAM+ is RAM.
    assert torch.allclose(merganser.merge_tensors("ramplus_tl", taus, base=base, r=0.0), ram)


@pytest.mark.parametrize(
    ("method", "params"),
    [("arcee_fusion", {}), ("nearswap", {"t": 1e-4}), ("ram", {}), ("ramplus_tl", {}),
     ("multislerp", {"weight": [1.0]})],
)  # fmt: skip
def test_fine_tune_equal_to_base_gives_the_base(tmp_path, method, params) -> None:
    """One model identical to the base: every method returns the base, through real files."""
    g = torch.Generator().manual_seed(0)
    w = {"layers.0.w": torch.randn(8, 8, generator=g), "norm": torch.randn(8, generator=g)}
    base = write_model(tmp_path / "base", w)
    ft = write_model(tmp_path / "ft", w)
    model = {"model": str(ft)}
    if "weight" in params:
        model["parameters"] = {"weight": params.pop("weight")[0]}
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": method, "base_model": str(base), "models": [model], "parameters": params},
    )
    out = load_folder(merganser.merge(recipe, tmp_path / "o"))
    for k, v in w.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=0)


def test_two_model_methods_refuse_a_third(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    ms = [write_model(tmp_path / f"m{i}", {"w": torch.randn(4, generator=g)}) for i in range(3)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "nearswap", "base_model": str(ms[0]),
         "models": [{"model": str(m)} for m in ms[1:]], "parameters": {"t": 0.1}},
    )  # fmt: skip
    with pytest.raises(RecipeError, match="nearswap"):
        merganser.merge(recipe, tmp_path / "o")
