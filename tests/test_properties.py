"""Properties every merge must keep, checked in memory (hypothesis) and through real files."""

from __future__ import annotations

import torch
from conftest import load_folder, write_model
from hypothesis import given, settings
from hypothesis import strategies as st

import merganser

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tensor(seed: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    method=st.sampled_from(["linear", "passthrough"]),
)
def test_merging_one_model_returns_it_bit_for_bit(seed, shape, dtype, method) -> None:
    x = _tensor(seed, shape, dtype)
    out = merganser.merge_tensors(method, [x])
    assert out.dtype == dtype
    assert torch.equal(out, x)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=shapes,
    n=st.integers(2, 5),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_identical_models_merge_to_themselves_half_precision(seed, shape, n, dtype) -> None:
    x = _tensor(seed, shape, dtype)
    assert torch.equal(merganser.merge_tensors("linear", [x] * n), x)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, n=st.integers(2, 5))
def test_identical_models_merge_to_themselves_float32(seed, shape, n) -> None:
    # In float32 the sum of n copies then /n may round by one ulp; nothing more is allowed.
    x = _tensor(seed, shape, torch.float32)
    torch.testing.assert_close(merganser.merge_tensors("linear", [x] * n), x, rtol=3e-7, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=shapes,
    n=st.integers(1, 4),
    lam=st.floats(-2, 2, allow_nan=False),
    dtype=st.sampled_from(DTYPES),
)
def test_task_arithmetic_of_copies_of_the_base_is_the_base(seed, shape, n, lam, dtype) -> None:
    base = _tensor(seed, shape, dtype)
    out = merganser.merge_tensors(
        "task_arithmetic", [base.clone()] * n, base=base, **{"lambda": lam}
    )
    assert torch.equal(out, base)


def test_one_model_through_files_is_bit_identical(tmp_path) -> None:
    tensors = {f"t{i}.{d}": _tensor(i, (5, 3), d) for i, d in enumerate(DTYPES)} | {
        "ids": torch.arange(6)
    }
    m = write_model(tmp_path / "m", tensors)
    merganser.merge({"merge_method": "linear", "models": [{"model": str(m)}]}, tmp_path / "o")
    got = load_folder(tmp_path / "o")
    assert got.keys() == tensors.keys()
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_identical_models_through_files(tmp_path) -> None:
    tensors = {"w": _tensor(0, (9, 4), torch.bfloat16), "b": _tensor(1, (4,), torch.float16)}
    paths = [write_model(tmp_path / f"m{i}", tensors) for i in range(3)]
    merganser.merge(
        {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}, tmp_path / "o"
    )
    got = load_folder(tmp_path / "o")
    for k, v in tensors.items():
        assert torch.equal(got[k], v), k


def test_mixed_input_dtypes_are_upcast_then_written_in_the_base_dtype(tmp_path) -> None:
    base = _tensor(0, (4, 4), torch.float32)
    a = write_model(tmp_path / "a", {"w": base.to(torch.bfloat16)})
    b = write_model(tmp_path / "b", {"w": base.to(torch.float16)})
    c = write_model(tmp_path / "c", {"w": base})
    merganser.merge(
        {"merge_method": "linear", "models": [{"model": str(p)} for p in (c, a, b)]}, tmp_path / "o"
    )
    got = load_folder(tmp_path / "o")["w"]
    expected = (base + base.to(torch.bfloat16).float() + base.to(torch.float16).float()) / 3
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
