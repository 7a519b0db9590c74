"""Worked examples of spec §1 (model soups) and §2 (task arithmetic), in memory and via files."""

from __future__ import annotations

import pytest
import torch
from conftest import load_folder, write_model

import merganser


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def test_uniform_soup_spec_1_1() -> None:
    out = merganser.merge_tensors("linear", [t(1, 0), t(0, 1), t(2, 2)])
    assert torch.equal(out, t(1, 1))


def test_weighted_soup_normalizes_by_weight_sum() -> None:
    out = merganser.merge_tensors("linear", [t(1, 0), t(0, 1)], weight=[3.0, 1.0])
    assert torch.equal(out, t(0.75, 0.25))
    raw = merganser.merge_tensors("linear", [t(1, 0), t(0, 1)], weight=[3.0, 1.0], normalize=False)
    assert torch.equal(raw, t(3, 1))


def test_task_arithmetic_addition_spec_2() -> None:
    base = t(1, 1, 1)
    m1, m2 = base + t(0.2, 0, -0.1), base + t(0, 0.4, 0.1)
    out = merganser.merge_tensors("task_arithmetic", [m1, m2], base=base, **{"lambda": 0.5})
    torch.testing.assert_close(out, t(1.1, 1.2, 1.0), rtol=0, atol=1e-6)


def test_task_arithmetic_negation_spec_2() -> None:
    base = t(1, 1, 1)
    m1 = base + t(0.2, 0, -0.1)
    out = merganser.merge_tensors("task_arithmetic", [m1], base=base, weight=[-1.0])
    torch.testing.assert_close(out, t(0.8, 1.0, 1.1), rtol=0, atol=1e-6)


def test_task_arithmetic_normalize_divides_by_weight_sum() -> None:
    base = t(0, 0)
    out = merganser.merge_tensors(
        "task_arithmetic", [t(2, 0), t(0, 4)], base=base, weight=[1.0, 3.0], normalize=True
    )
    torch.testing.assert_close(out, t(0.5, 3.0))


def test_passthrough_scale() -> None:
    assert torch.equal(merganser.merge_tensors("passthrough", [t(1, -2)], scale=[2.0]), t(2, -4))


@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("linear", {}, [1.0, 1.0]),
        ("task_arithmetic", {"lambda": 0.5}, [1.1, 1.2, 1.0]),
    ],
)
def test_spec_examples_through_files(tmp_path, method, params, expected) -> None:
    """The same numbers come out of the full recipe → plan → engine → writer pipeline."""
    if method == "linear":
        inputs = {"a": t(1, 0), "b": t(0, 1), "c": t(2, 2)}
        base = None
    else:
        base = write_model(tmp_path / "base", {"w": t(1, 1, 1)})
        inputs = {"a": t(1.2, 1, 0.9), "b": t(1, 1.4, 1.1)}
    models = [write_model(tmp_path / k, {"w": v}) for k, v in inputs.items()]
    recipe = {
        "merge_method": method,
        "models": [{"model": str(m)} for m in models],
        "parameters": params,
    }
    if base is not None:
        recipe["base_model"] = str(base)
    merganser.merge(recipe, tmp_path / "out")
    got = load_folder(tmp_path / "out")["w"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-6)
