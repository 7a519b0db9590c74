"""Properties across methods (hypothesis): merging a model with itself or with its base is the
identity, and the special cases collapse to task arithmetic."""

from __future__ import annotations

import itertools
from unittest import mock

import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import merganser
from merganser.methods import all_methods

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=2).map(tuple)
seeds = st.integers(0, 2**31)


def _rand(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


BASE_METHODS = sorted(m.name for m in all_methods() if m.needs_base)
EXTRA = {"reborn": 2, "model_stock": 2, "nuslerp": 2}
REQUIRED = {"nearswap": {"t": 0.01}}  # parameters without a default (as in mergekit)


@settings(max_examples=25, deadline=None)
@given(seed=seeds, shape=shapes, method=st.sampled_from(BASE_METHODS), density=st.floats(0.1, 1.0))
def test_models_equal_to_the_base_return_the_base(seed, shape, method, density) -> None:
    base = _rand(seed, shape)
    n = EXTRA.get(method, 1)
    params = (
        {"density": density}
        if method in {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"}
        else {}
    )
    params.update(REQUIRED.get(method, {}))
    models = [base.clone() for _ in range(n)]
    if method == "dppa":  # DPPA prunes by layer: it needs a layer's linear weight (issue 26)
        name = "model.layers.0.mlp.up_proj.weight"
        base2 = base.reshape(1, -1) if base.dim() == 1 else base
        out = merganser.merge_tensors(
            method, [{name: base2.clone()} for _ in range(n)], base={name: base2}
        )
        assert torch.equal(out[name], base2), method
        return
    out = merganser.merge_tensors(method, models, base=base, **params)
    assert torch.equal(out, base), method


IDENTITY_METHODS = ["linear", "karcher", "model_stock", "slerp", "nuslerp", "ties"]


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, method=st.sampled_from(IDENTITY_METHODS), n=st.integers(2, 4))
def test_identical_fine_tuned_models_merge_to_themselves(seed, shape, method, n) -> None:
    base = _rand(seed, shape)
    x = base + _rand(seed + 1, shape, 0.1)
    if method == "model_stock":
        # Model Stock divides by the task vectors' norm product clamped at 1e-6 (spec 13.4, as
        # mergekit), so below it the cosine of identical models is not 1: the clamp's own
        # numbers are tested in test_methods_spec.
        assume(float((x - base).norm()) ** 2 >= 1e-6)
    if method == "slerp":
        models = [x]
    elif method == "nuslerp":
        models = [x, x.clone()]
    else:
        models = [x.clone() for _ in range(n)]
    if method == "slerp":  # both endpoints of the interpolation are the same model
        base = x.clone()
    kwargs = {} if method in {"linear", "karcher"} else {"base": base}
    out = merganser.merge_tensors(method, models, **kwargs)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, w=st.floats(0.1, 2.0), lam=st.floats(0.1, 2.0))
def test_ties_with_density_one_and_one_model_is_task_arithmetic(seed, shape, w, lam) -> None:
    base, x = _rand(seed, shape), _rand(seed + 1, shape)
    ties = merganser.merge_tensors(
        "ties", [x], base=base, density=1.0, weight=[w], normalize=False, **{"lambda": lam}
    )
    ta = merganser.merge_tensors("task_arithmetic", [x], base=base, weight=[w], **{"lambda": lam})
    torch.testing.assert_close(ties, ta, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    seed=seeds,
    shape=shapes,
    n=st.integers(1, 3),
    method=st.sampled_from(["dare_linear", "della_linear"]),
    rescale=st.sampled_from(["l1", "inverse", "none"]),
)
def test_dare_without_drop_is_task_arithmetic(seed, shape, n, method, rescale) -> None:
    base = _rand(seed, shape)
    models = [_rand(seed + i + 1, shape) for i in range(n)]
    weights = [0.5 + i for i in range(n)]
    dare = merganser.merge_tensors(
        method, models, base=base, density=1.0, weight=weights, rescale=rescale, seed=seed
    )
    ta = merganser.merge_tensors("task_arithmetic", models, base=base, weight=weights)
    torch.testing.assert_close(dare, ta, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, shape=shapes, density=st.floats(0.05, 0.95))
def test_ties_trim_keeps_exactly_the_density_count(seed, shape, density) -> None:
    base = torch.zeros(shape)
    x = _rand(seed, shape)
    out = merganser.merge_tensors("ties", [x], base=base, density=density)
    assert int((out != 0).sum()) == int(density * x.numel())


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    shape=shapes,
    weight=st.lists(st.sampled_from([1.0, 0.3, 0.7, 2.0, 0.0, -0.5]), min_size=1, max_size=4),
    method=st.sampled_from(["mass", "frequency"]),
    normalize=st.booleans(),
)
@example(seed=0, shape=(64,), weight=[1.0, 0.0], method="mass", normalize=True)
@example(seed=0, shape=(64,), weight=[1.0, -0.5, 0.3], method="frequency", normalize=True)
def test_disjoint_merge_is_the_boolean_consensus_rule(
    seed, shape, weight, method, normalize
) -> None:
    from merganser.methods.task_vectors import consensus_mask, disjoint_merge

    g = torch.Generator().manual_seed(seed)
    # Small integers: exact zeros (trimmed entries) and sums that cancel to 0 are common.
    stacked = torch.randint(-2, 3, (len(weight), *shape), generator=g).float()
    w = torch.tensor(weight).view(-1, *([1] * len(shape)))
    weighted = stacked * w
    agree = consensus_mask(weighted, method)
    want = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (agree * w).sum(dim=0)
        divisor[divisor == 0] = 1
        want = want / divisor
    got = disjoint_merge(stacked.clone(), weight, method, normalize)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _streamed_trim(delta: torch.Tensor, density: float, blocks: list[int], miss: bool = False):
    from merganser.methods.sparsify import StreamingTopK

    mag = delta.abs()
    s = StreamingTopK(mag.numel(), density)
    cuts = [0, *sorted(blocks), mag.numel()]
    spans = [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a]
    p = 0
    while s.wants_pass(p):
        for a, n in spans:
            if p == 0:
                idx, slots = s.want(a, n)
                s.take_sample(slots, mag[a + idx])
            else:
                s.observe(p, mag[a : a + n])
        s.end_pass(p)
        if p == 0 and miss:
            s.lo = s.hi = mag.max() + 1  # a bracket that misses: pass 2 must decide
        p += 1
    return torch.cat([s.trim_(delta[a : a + n].clone()) for a, n in spans]), p


@settings(max_examples=20, deadline=None)
@given(
    seed=seeds,
    density=st.floats(0.0, 1.0),
    levels=st.sampled_from([7, 1000, 0]),
    cuts=st.lists(st.integers(0, 300_000), max_size=4),
    miss=st.booleans(),
    keep_buffer=st.sampled_from([1 << 20, 4096]),  # 4096: kept values get folded into counts
)
def test_streaming_topk_keeps_exactly_the_entries_topk_mask_keeps(
    seed, density, levels, cuts, miss, keep_buffer
) -> None:
    from merganser.methods import sparsify
    from merganser.methods.sparsify import topk_mask

    g = torch.Generator().manual_seed(seed)
    n = 300_000  # above 4 samples, so the sample bracket is used
    mag = torch.rand(n, generator=g)
    if levels:  # few distinct values: many ties at the threshold, kept lowest index first
        mag = (mag * levels).floor()
    # Magnitudes >= 1, so a kept entry is never 0; random signs, which the trim must keep.
    delta = (mag + 1) * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    with mock.patch.object(sparsify, "KEEP_BUFFER", keep_buffer):
        got, passes = _streamed_trim(delta, density, cuts, miss)
    keep = topk_mask(delta, density)
    assert torch.equal(got != 0, keep)
    assert torch.equal(got, delta * keep)
    assert int(keep.sum()) == int(density * n)
    if miss and 0 < int(density * n) < n:
        assert passes == 3


def test_streaming_topk_counts_a_bracket_of_one_value_without_keeping_it() -> None:
    """Equal magnitudes (an untouched tensor's zero deltas, here ±1) bracket the threshold with
    one value: its members are counted, never kept and sorted, and the trim is still exactly
    topk_mask's, ties lowest index first."""
    from merganser.methods import sparsify
    from merganser.methods.sparsify import StreamingTopK, topk_mask

    g = torch.Generator().manual_seed(0)
    n = 300_000
    delta = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    with (
        mock.patch.object(sparsify, "KEEP_BUFFER", 4096),
        mock.patch.object(StreamingTopK, "_keep", side_effect=AssertionError("kept")),
    ):
        got, passes = _streamed_trim(delta, 0.3, [100_000, 150_001])
    keep = topk_mask(delta, 0.3)
    assert passes == 2 and torch.equal(got, delta * keep)
    assert int(keep.sum()) == int(0.3 * n) and bool(keep[: int(0.3 * n)].all())


def test_every_paper_convention_is_a_valid_value_that_differs_from_the_default() -> None:
    """A parameter's ``paper`` value is the paper's behaviour one parameter away: it must be
    accepted by the parameter's own check and differ from mergekit's default.
    """
    from merganser.methods import all_methods

    seen = []
    for m in all_methods():
        for p in m.params:
            if p.paper is not None:
                assert p.check(p.paper, f"{m.name}.{p.name}") == p.paper
                assert p.paper != p.default, (m.name, p.name)
                seen.append((m.name, p.name))
    assert ("ties", "scope") in seen and ("dare_ties", "rescale") in seen
