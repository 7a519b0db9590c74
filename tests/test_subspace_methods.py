"""TSV-M, Iso-C, Iso-CTS, WUDI, Consensus/TALL and PCB (issue 34; spec algorithms-2.md §1-4
and §6): each worked example, and merging through a recipe.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_folder, write_model, write_recipe

import merganser
from merganser.errors import MerganserError

T = torch.tensor
TAU1 = T([[4.0, 0], [0, 1], [0, 0]])
TAU2 = T([[1.0, 2], [2, 1], [0, 1]])


def _merge(method: str, taus: list[torch.Tensor], **params) -> torch.Tensor:
    """The merged task vector (the base is zero)."""
    base = torch.zeros_like(taus[0])
    return merganser.merge_tensors(method, list(taus), base=base, **params)


def test_tsv_m_spec_1_4_worked_example() -> None:
    got = _merge("tsv_m", [TAU1, TAU2])
    want = T([[3.876551, -0.218354], [-0.379324, 3.017104], [-0.137160, 1.090954]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    bias = _merge("tsv_m", [T([0.2, -0.4]), T([0.6, 0.0])])  # not a matrix: the mean
    torch.testing.assert_close(bias, T([0.4, -0.2]))
    # matrix: false averages a 2-D tensor too (for heads, via a filter).
    torch.testing.assert_close(_merge("tsv_m", [TAU1, TAU2], matrix=False), (TAU1 + TAU2) / 2)


def test_tsv_m_refuses_a_matrix_it_would_zero() -> None:
    """⌊r/T⌋ = 0 singular vectors per task: the official code silently zeroes the delta."""
    with pytest.raises(ValueError, match="matrix: false"):
        _merge("tsv_m", [TAU1, TAU2, TAU1 + TAU2])


def test_iso_c_spec_2_5_worked_example() -> None:
    got = _merge("iso_c", [TAU1, TAU2])
    want = T([[3.554295, 0.255792], [0.379826, 2.860521], [-0.868243, 2.298504]])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_iso_cts_spec_2_5_worked_example() -> None:
    t1 = T([[1, 0.5, 0, 0], [0, 2, 0, 0.5], [0.5, 0, 0, 0], [0, 0, 0, 0.5]])
    t2 = T([[0.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.5], [1, 0, 0, 0]])
    got = _merge("iso_cts", [t1, t2], common_space_fraction=0.5)
    want = T([[1.665921, 0.323079, 0.334559, -0.431199],
              [-0.322972, 1.721551, 0.239714, 0.228087],
              [0.517306, -0.074136, -0.356338, 1.666570],
              [-0.174144, -0.322368, 1.697400, 0.402644]])  # fmt: skip
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # No room for task-specific vectors (round(0.5) = 0, half to even): Iso-CTS is Iso-C.
    torch.testing.assert_close(_merge("iso_cts", [t1, t2]), _merge("iso_c", [t1, t2]),
                               rtol=0, atol=1e-5)  # fmt: skip


WT1, WT2 = T([[1.0, 0], [0, 0.5]]), T([[0.5, 0.5], [0, 1]])


def test_wudi_spec_3_4_worked_example() -> None:
    one = _merge("wudi", [WT1, WT2], steps=1)
    torch.testing.assert_close(one, T([[1.49999, 0.49999], [-0.00001, 1.49999]]), rtol=0, atol=2e-6)
    many = _merge("wudi", [WT1, WT2])
    want = T([[1.497004, 0.497009], [-0.002974, 1.497004]])
    torch.testing.assert_close(many, want, rtol=0, atol=2e-6)
    exact = _merge("wudi", [WT1, WT2], solver="closed_form")
    torch.testing.assert_close(exact, T([[0.942792, 0.331808], [0.017162, 0.900458]]),
                               rtol=0, atol=1e-5)  # fmt: skip
    # Other tensors: the mean task vector, or the base as the official code leaves them.
    assert torch.equal(_merge("wudi", [T([1.0, 2]), T([3.0, 0])]), T([2.0, 1.0]))
    assert torch.equal(_merge("wudi", [T([1.0, 2]), T([3.0, 0])], non_matrix="base"), T([0.0, 0]))


def test_consensus_spec_4_3_worked_example() -> None:
    taus = [T([0.5, 0.0, -0.3, 0.2, 0.1, 0.0]), T([0.4, 0.2, 0.3, -0.1, 0.0, 0.05]),
            T([-0.1, 0.3, 0.0, 0.2, 0.1, -0.02])]  # fmt: skip
    got = _merge("consensus", taus, mask_lambda=0.5, k=2, alpha=0.4)
    torch.testing.assert_close(got, T([0.32, 0.2, 0.0, 0.12, 0.08, 0.0]))
    # k = 1 keeps every entry some task uses: here all of them, the task-arithmetic sum.
    torch.testing.assert_close(_merge("consensus", taus, mask_lambda=0.5, k=1, alpha=1.0),
                               taus[0] + taus[1] + taus[2])  # fmt: skip


def test_pcb_spec_6_3_worked_example() -> None:
    t1 = T([0.9, -0.2, 0.1, 0.4, -0.5, 0.05, 0.3, -0.1, 0.2, 0.0])
    t2 = T([0.3, 0.4, -0.2, 0.5, 0.1, -0.3, 0.6, 0.2, -0.05, 0.1])
    got = _merge("pcb", [t1, t2], pcb_ratio=0.5, **{"lambda": 1.0})
    want = T([0.474972, 0.4, 0.0, 0.480475, -0.5, 0.0, 0.484168, 0.0, 0.0, 0.0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    vision = _merge("pcb", [t1, t2], pcb_ratio=0.5, clamp=0.01, **{"lambda": 1.0})
    assert torch.isfinite(vision).all()
    # The reference's 0/0 (d = 5, ratio 0.1) keeps each task's largest β instead of NaN.
    small = _merge("pcb", [t1[:5], t2[:5]])
    assert torch.isfinite(small).all()


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "wudi", "consensus", "pcb"])
def test_merging_models_through_a_recipe(tmp_path, method) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"layers.0.w": torch.randn(8, 6, generator=g), "norm": torch.randn(6, generator=g)}
    paths = [write_model(tmp_path / "base", base)]
    for i in range(2):
        paths.append(write_model(tmp_path / f"e{i}",
                                 {k: v + 0.1 * torch.randn(v.shape, generator=g)
                                  for k, v in base.items()}))  # fmt: skip
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": method, "base_model": str(paths[0]),
         "models": [{"model": str(p)} for p in paths[1:]]},
    )  # fmt: skip
    out = load_folder(merganser.merge(recipe, tmp_path / "o"))
    models = [load_folder(p) for p in paths]
    want = merganser.merge_tensors(method, [m["layers.0.w"] for m in models[1:]],
                                   base=models[0]["layers.0.w"])  # fmt: skip
    torch.testing.assert_close(out["layers.0.w"], want, rtol=0, atol=1e-6)
    # One model equal to the base: every method returns the base.
    twins = [write_model(tmp_path / f"twin{i}", base) for i in range(2)]
    same = write_recipe(
        tmp_path / "s.yaml",
        {"merge_method": method, "base_model": str(paths[0]),
         "models": [{"model": str(t)} for t in twins]},
    )  # fmt: skip
    got = load_folder(merganser.merge(same, tmp_path / "same"))
    for k, v in models[0].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_tsv_m_error_names_the_tensor(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    ms = [write_model(tmp_path / f"m{i}", {"w": torch.randn(2, 1, generator=g)}) for i in range(4)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "tsv_m", "base_model": str(ms[0]),
         "models": [{"model": str(m)} for m in ms[1:]]},
    )  # fmt: skip
    with pytest.raises(MerganserError, match="'w'"):
        merganser.merge(recipe, tmp_path / "o")
