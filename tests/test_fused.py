"""The fused numba kernels (methods/fused.py) give the torch path's bits, on bfloat16 merges."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import load_folder, write_model

import merganser
from merganser.errors import MerganserError
from merganser.methods import dare, della, fused, sparsify
from merganser.methods.blockwise import sum64, sum_blocks
from merganser.methods.slerp import _dot64, slerp_coefficients
from merganser.methods.sparsify import BlockBernoulli
from merganser.methods.task_vectors import ordered_sum
from merganser.pipeline.engine import block_merge, blockwise, fusable
from merganser.pipeline.plan import build_plan
from merganser.pipeline.recipe import parse_recipe

CASES = [
    ("ties", {"density": 0.5}),
    ("ties", {"density": [0.3, 0.7, 0.5], "weight": [0.5, 1.2, 0.3], "lambda": 1.3}),
    ("ties", {"density": [1.0, 0.0, 0.4], "sign_method": "frequency", "normalize": False}),
    ("ties", {"density": 0.4, "rescale": "inverse", "weight": [1.0, -0.5, 2.0]}),
    ("dare_ties", {"density": 0.5}),
    ("dare_ties", {"density": [0.3, 1.0, 0.0], "rescale": "inverse", "normalize": True}),
    ("dare_linear", {"density": 0.7, "weight": [0.3, 0.3, 0.4], "lambda": 0.8}),
    ("dare_linear", {"density": [0.5, 0.2, 0.9], "rescale": "none", "normalize": True}),
    ("della", {"density": 0.5, "epsilon": 0.1}),
    ("della", {"density": [0.3, 1.0, 0.6], "epsilon": 0.2, "weight": [0.5, 1.2, 0.3]}),
    ("della_linear", {"density": 0.7, "epsilon": 0.1, "rescale": "none", "lambda": 1.3}),
]


def _family(tmp_path, rows: int = 611, cols: int = 1031):
    """A base and three experts in bfloat16 that stress the kernels' corner cases: deltas that
    repeat (ties at the top-k threshold), zero deltas, ±0 in the base and the experts.
    """
    g = torch.Generator().manual_seed(3)
    base = torch.randn(rows, cols, generator=g) * 0.05
    base[:, 7] = -0.0
    base[:, 8] = 0.0
    experts = []
    for i in range(3):
        step = torch.randint(-6, 7, base.shape, generator=g).float() * 2e-3  # few values
        e = base + step * (i + 1)
        e[3 * i : 3 * i + 40] = base[3 * i : 3 * i + 40]  # unchanged rows
        e[:, 9 + i] = -0.0
        experts.append({"w": e.to(torch.bfloat16), "b": e[0, :50].to(torch.bfloat16)})
    bdict = {"w": base.to(torch.bfloat16), "b": base[0, :50].to(torch.bfloat16)}
    return write_model(tmp_path / "base", bdict), [
        write_model(tmp_path / f"e{i}", e) for i, e in enumerate(experts)
    ]


def _recipe(method, params, base, experts):
    params = dict(params)
    weight = params.pop("weight", None)
    models = [{"model": str(p)} for p in experts]
    if weight is not None:
        for m, w in zip(models, weight, strict=True):
            m["parameters"] = {"weight": w}
    return {
        "merge_method": method,
        "base_model": str(base),
        "random_seed": 11,
        "dtype": "bfloat16",
        "models": models,
        "parameters": params,
    }


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
@pytest.mark.parametrize(("method", "params"), CASES)
def test_fused_kernels_give_the_torch_path_bits(tmp_path, method, params, budget) -> None:
    base, experts = _family(tmp_path)
    recipe = _recipe(method, params, base, experts)
    plan = build_plan(parse_recipe(recipe))
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        opts = merganser.MergeOptions(memory_budget=budget, threads=2)
        eo = opts.engine_options()
        bm = block_merge(plan, task)
        assert blockwise(plan, task, eo.device) and fusable(plan, task, eo) and bm is not None
        assert bm.fused()  # the case really runs the kernels
    finally:
        plan.close()
    runs = {}
    for on in (True, False):
        o = merganser.MergeOptions(memory_budget=budget, threads=2, fused=on)
        runs[on] = load_folder(merganser.merge(recipe, tmp_path / f"out_{on}", o))
    assert runs[True].keys() == runs[False].keys()
    for k in runs[True]:
        a, b = runs[True][k], runs[False][k]
        assert a.dtype == torch.bfloat16
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), k  # bits, ±0 included


def test_fused_ties_equals_the_whole_tensor_function(tmp_path) -> None:
    """An anchor outside the engine: the method's own function on the whole tensor."""
    base, experts = _family(tmp_path)
    recipe = _recipe("ties", {"density": 0.35, "lambda": 0.9}, base, experts)
    got = load_folder(merganser.merge(recipe, tmp_path / "out"))["w"]
    plan = build_plan(parse_recipe(recipe))
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        tensors = [plan.checkpoints[ci].read(n).float() for ci, n in task.sources]
        b = plan.checkpoints[task.base[0]].read(task.base[1]).float()
        want = plan.method(tensors, b, **task.params).to(torch.bfloat16)
    finally:
        plan.close()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_fused_merge_stops_on_a_non_finite_result(tmp_path) -> None:
    base, experts = _family(tmp_path)
    bad = load_folder(experts[1])
    bad["w"][5, 5] = float("inf")
    write_model(experts[1], bad)
    recipe = _recipe("ties", {"density": 0.5}, base, experts)
    for on in (True, False):
        with pytest.raises(MerganserError, match="tensor w: merge produced NaN or Inf"):
            merganser.merge(recipe, tmp_path / f"o{on}", merganser.MergeOptions(fused=on))
        assert not (tmp_path / f"o{on}").exists()


def test_fused_paths_are_taken_only_where_they_give_the_same_bits(tmp_path) -> None:
    base, experts = _family(tmp_path)
    checks = [
        ("bfloat16", {}, False, True),
        ("bfloat16", {}, True, False),  # --allow-nonfinite: NaN bits could differ
        ("float32", {}, False, False),  # inputs rounded to another dtype first
        ("bfloat16", {"out_dtype": "float32"}, False, False),
    ]
    for dtype, extra, nonfinite, want in checks:
        recipe = {**_recipe("ties", {"density": 0.5}, base, experts), "dtype": dtype, **extra}
        plan = build_plan(parse_recipe(recipe))
        try:
            task = next(t for t in plan.tasks if t.name == "w")
            eo = merganser.MergeOptions(allow_nonfinite=nonfinite).engine_options()
            assert fusable(plan, task, eo) is want, (dtype, extra, nonfinite)
        finally:
            plan.close()
    assert fused.available()


def test_fused_ties_after_a_missed_bracket(tmp_path, monkeypatch) -> None:
    """A sample bracket that misses the threshold sends TIES to its third pass (all values)."""
    import merganser.methods.sparsify as sparsify

    real = sparsify.bracket
    missed = []

    def narrow(picks, n, k):
        lo, _ = real(picks, n, k)
        missed.append(n)
        return lo, lo  # a one-value bracket: the k-th largest lies above it

    monkeypatch.setattr(sparsify, "bracket", narrow)
    passes = []
    observe = sparsify.StreamingTopK.observe

    def counted(self, p, mag):
        passes.append(p)
        observe(self, p, mag)

    monkeypatch.setattr(sparsify.StreamingTopK, "observe", counted)
    base, experts = _family(tmp_path)
    recipe = _recipe("ties", {"density": [0.5, 0.3, 0.6]}, base, experts)
    runs = [
        load_folder(merganser.merge(recipe, tmp_path / f"o{on}", merganser.MergeOptions(fused=on)))
        for on in (True, False)
    ]
    assert missed and 2 in passes
    assert torch.equal(runs[0]["w"].view(torch.int16), runs[1]["w"].view(torch.int16))


def test_fused_dare_with_a_keep_probability_next_to_one(tmp_path) -> None:
    """Within 2⁻²⁴ of 1, BlockBernoulli keeps every entry without drawing."""
    base, experts = _family(tmp_path)
    recipe = _recipe("dare_ties", {"density": [1 - 2**-26, 0.5, 0.8]}, base, experts)
    runs = [
        load_folder(merganser.merge(recipe, tmp_path / f"o{on}", merganser.MergeOptions(fused=on)))
        for on in (True, False)
    ]
    assert torch.equal(runs[0]["w"].view(torch.int16), runs[1]["w"].view(torch.int16))


def test_ordered_sum_is_torchs_sum_up_to_four_models() -> None:
    """The defined summation (models one by one from +0, task_vectors.ordered_sum) is what
    torch's sum(dim=0) does for up to four rows, so merges of up to four models kept their
    bytes when it replaced sum(dim=0); from five rows torch reorders (a torch upgrade that
    changed either would show here first).
    """
    g = torch.Generator().manual_seed(0)
    differs = False
    for n in range(1, 9):
        st = torch.randn(n, 300_007, generator=g) * torch.logspace(-3, 3, n).view(-1, 1)
        seq = torch.zeros(st.shape[1])
        for row in st:
            seq = seq + row
        assert torch.equal(ordered_sum(st), seq), n
        if n <= 4:
            assert torch.equal(st.sum(dim=0), seq), n
        else:
            differs |= not torch.equal(st.sum(dim=0), seq)
    assert differs  # torch reorders from five rows: why ordered_sum exists


def _many_models(tmp_path, n: int):
    """The base and ``n`` experts: the family's three, then scaled copies of them."""
    base, experts = _family(tmp_path, rows=300, cols=1031)
    more = [
        write_model(tmp_path / f"x{i}", {k: (v.float() * (1 + 0.01 * i)).to(torch.bfloat16)
                                         for k, v in load_folder(experts[i % 3]).items()})
        for i in range(max(0, n - 3))
    ]  # fmt: skip
    return base, [*experts, *more][:n]


@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_elected_merges_are_fused_and_bit_identical_for_any_number_of_models(tmp_path, n) -> None:
    """TIES and DARE-TIES stay on the fused kernels for 2 to 16 models (they left them from
    five on) and give the torch path's bits, the defined order of the sums shared by both.
    """
    base, models = _many_models(tmp_path, n)
    for method in ("ties", "dare_ties"):
        params = {"density": 0.5, "weight": [1.0 + 0.1 * i for i in range(n)]}
        recipe = _recipe(method, params, base, models)
        plan = build_plan(parse_recipe(recipe))
        try:
            task = next(t for t in plan.tasks if t.name == "w")
            bm = block_merge(plan, task)
            assert bm is not None and bm.fused(), (method, n)
        finally:
            plan.close()
        runs = [
            load_folder(merganser.merge(recipe, tmp_path / f"{method}{on}",
                                        merganser.MergeOptions(fused=on, threads=1)))
            for on in (True, False)
        ]  # fmt: skip
        for k in runs[0]:
            a, b = runs[0][k].view(torch.int16), runs[1][k].view(torch.int16)
            assert torch.equal(a, b), (method, n, k)


def _slerp_family(tmp_path):
    """A base, an expert far enough for the spherical path and one nearly colinear with it."""
    base, experts = _family(tmp_path)
    near = {k: (v.float() * 1.01).to(torch.bfloat16) for k, v in load_folder(base).items()}
    return base, experts[1], write_model(tmp_path / "near", near)


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
@pytest.mark.parametrize("t", [0.3, 0.5, 0.85])
def test_fused_slerp_gives_the_torch_path_bits(tmp_path, t, budget) -> None:
    base, far, near = _slerp_family(tmp_path)
    b = load_folder(base)["w"].float()
    for other, spherical in ((far, True), (near, False)):
        o = load_folder(other)["w"].float()
        coef = slerp_coefficients(t, _dot64(b, b), _dot64(o, o), _dot64(b, o))
        assert (coef is not None) is spherical  # both of _apply's branches are covered
        recipe = _recipe("slerp", {"t": t}, base, [other])
        runs = {}
        for on in (True, False):
            opts = merganser.MergeOptions(memory_budget=budget, threads=2, fused=on)
            runs[on] = load_folder(merganser.merge(recipe, tmp_path / f"o{on}{spherical}", opts))
        for k in runs[True]:  # "b" has 50 entries: a tail after the vectorised part
            a, c = runs[True][k].view(torch.int16), runs[False][k].view(torch.int16)
            assert torch.equal(a, c), (k, spherical)


def test_fused_slerp_sums_are_exact_to_float64_rounding() -> None:
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(300_001, generator=g) * torch.rand(300_001, generator=g) ** 4).bfloat16()
    b = (a.float() + torch.randn(300_001, generator=g) * 1e-2).bfloat16()
    x, y = a.double().numpy(), b.double().numpy()
    exact = [math.fsum(x * x), math.fsum(y * y), math.fsum(x * y)]  # products exact in float64
    for got, want in zip(fused.dots(a, b), exact, strict=True):
        assert got == pytest.approx(want, rel=1e-13)


def test_fused_slerp_stops_on_a_non_finite_result(tmp_path) -> None:
    base, far, _ = _slerp_family(tmp_path)
    bad = load_folder(far)
    bad["b"][3] = float("nan")
    write_model(far, bad)
    recipe = _recipe("slerp", {"t": 0.5}, base, [far])
    for on in (True, False):
        with pytest.raises(MerganserError, match="tensor b: merge produced NaN or Inf"):
            merganser.merge(recipe, tmp_path / f"o{on}", merganser.MergeOptions(fused=on))
        assert not (tmp_path / f"o{on}").exists()


@pytest.mark.parametrize("n", [0, 5, 16, 47, 262_144 + 9])
def test_band_kernels_agree_with_numpy(n) -> None:
    """TIES's band pass, the scalar kernel and the AVX-512 one: the values in [lo, hi] in
    order and the count above, with ±0, NaN, infinities and values equal to either end.
    """
    g = torch.Generator().manual_seed(n)
    base = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    x = (base.float() + torch.randint(-9, 10, (n,), generator=g) * 2e-3).to(torch.bfloat16)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0])
    x[: min(n, 5)] = specials[: min(n, 5)].to(torch.bfloat16)
    mag = (x.float() - base.float()).abs().numpy()
    finite = mag[np.isfinite(mag)] if n else np.zeros(1, np.float32)
    lo, hi = (np.float32(np.quantile(finite, q)) for q in (0.4, 0.6))
    inside = (mag >= lo) & (mag <= hi)
    want = (mag[inside], int(np.count_nonzero(mag > hi)))
    assert n < 100 or (0 < inside.sum() < n and (mag == lo).any() and (mag == hi).any())
    kernels = [fused.kernels().band] + ([fused.kernels().band_wide] if fused.wide() else [])
    for kernel in kernels:
        out = np.full(n, np.nan, np.float32)
        nb, above = kernel(fused.bits(x), fused.bits(base), lo, hi, out)
        assert (nb, above) == (want[0].size, want[1]), kernel
        assert np.array_equal(out[:nb], want[0]), kernel


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
def test_fused_ties_samples_what_the_torch_path_samples(tmp_path, monkeypatch, budget) -> None:
    """The sampled pass's magnitudes, gathered by the kernel from the stored bfloat16 values,
    are the torch path's, bit for bit (the merge would hide a bad sample: a bracket only
    bounds the exact selection that follows).
    """
    base, experts = _family(tmp_path, rows=1500)  # 1.5M entries: the sampled path
    recipe = _recipe("ties", {"density": [0.3, 0.5, 0.5]}, base, experts)
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    real = sparsify.bracket
    for on in (True, False):

        def spy(picks, n, k, on=on):  # type: ignore[no-untyped-def]
            seen[on].append(picks.clone())
            return real(picks, n, k)

        monkeypatch.setattr(sparsify, "bracket", spy)
        o = merganser.MergeOptions(memory_budget=budget, threads=1, fused=on)
        merganser.merge(recipe, tmp_path / f"out_{on}", o)
    assert len(seen[True]) == len(seen[False]) == 3
    for a, b in zip(seen[True], seen[False], strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize(
    "values",
    [
        [0.0],
        [0.0, 0.0, 0.0],
        [3.5, 3.5, 1e-30, 0.0, 7.0, 3.5],
        [1e-45, 3.4e38, float("inf"), 2.0],
        "ties",
        "spread",
    ],
)
def test_radix_kth_largest_matches_kthvalue(values) -> None:
    """TIES's band selection: the rank-th largest and the count above it, for every rank."""
    g = torch.Generator().manual_seed(4)
    if values == "ties":  # few distinct values, one of them a third of all: TIES's band
        v = (torch.randint(0, 40, (5000,), generator=g) * 1e-4).float()
        v[:1700] = 0.0021
    elif values == "spread":
        v = torch.rand(3001, generator=g).float() * torch.logspace(-30, 30, 3001)
    else:
        v = torch.tensor(values, dtype=torch.float32)
    n = v.numel()
    for rank in sorted({1, 2, n // 3, n // 2, n - 1, n} & set(range(1, n + 1))):
        thr = v.kthvalue(n - rank + 1).values
        got = fused.kernels().kth_largest(v.numpy(), rank)
        assert (float(got[0]), int(got[1])) == (float(thr), int((v > thr).sum())), rank


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_pcg64_lanes_draw_numpys_words(seed) -> None:
    """BlockBernoulli's vector-lane generator gives numpy's PCG64 stream, from any position
    and for any count (whole steps of PCG_LANES words and a tail)."""
    assert fused.available()
    draw = BlockBernoulli(seed)
    counts = [(0, 0), (0, 1), (1, 1), (0, 7), (3, 8), (5, 9), (0, 32), (2, 33), (1, 67)]
    for start, count in [*counts, (12_345, 100_003)]:
        ref = np.random.PCG64(seed)
        ref.advance(start // 2)
        raw = ref.random_raw((start % 2 + count + 1) // 2)
        want = raw.astype("<u8").view("<u4")[start % 2 : start % 2 + count]
        assert np.array_equal(draw.words(start, count), want), (start, count)


@pytest.mark.parametrize(
    "n", [0, 1, 7, 8, 13, 127, 128, 129, 1000, 4099, 196_608, 262_144, 263_144]
)
def test_dare_l1_sums_are_numpys_pairwise_sums_and_pack_the_mask(n) -> None:
    """The l1 pass's sums are np.add.reduce's of the float64 magnitudes, bit for bit (the
    torch path's ``sum64``), kept or not; its packed mask is the words' comparisons, packed
    in little bit order."""
    g = torch.Generator().manual_seed(n)
    # Magnitudes over many binades: a sum in any other order rounds differently.
    x = (torch.randn(n, generator=g) * torch.randn(n, generator=g).mul(6).exp()).bfloat16()
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    limit = BlockBernoulli.limit(0.3)
    words = BlockBernoulli(5).words(16, n)
    packed = np.full((n + 7) // 8, 0xA5, np.uint8)  # every bit must be written
    before, after = fused.l1_sums(x, base, words, limit, packed)
    mag = (x.float() - base.float()).abs()
    kept = mag * torch.from_numpy(words < np.uint32(limit))
    assert before == np.add.reduce(mag.double().numpy()) == sum64(mag)
    assert after == np.add.reduce(kept.double().numpy()) == sum64(kept)
    assert np.array_equal(packed, np.packbits(words < np.uint32(limit), bitorder="little"))
    if n >= 1000:  # and the order matters: a sequential sum differs
        assert before != float(np.cumsum(mag.double().numpy())[-1])


@pytest.mark.parametrize("cache", [0, 150_000], ids=["none kept", "first block kept"])
@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
def test_fused_dare_keeps_its_masks_between_passes(tmp_path, monkeypatch, cache, budget) -> None:
    """The l1 pass's masks, kept for the merge, give the torch path's bits whether the kept
    masks cover the tensor, part of it or none; where they cover it, nothing is drawn twice.
    """
    base, experts = _family(tmp_path)  # "w" has 611 x 1031 entries: three blocks
    recipe = _recipe("dare_ties", {"density": [0.3, 0.6, 0.9], "lambda": 1.1}, base, experts)
    drawn: list[tuple[int, int]] = []
    real = BlockBernoulli.words

    def counted(self, start, count):  # type: ignore[no-untyped-def]
        drawn.append((start, count))
        return real(self, start, count)

    monkeypatch.setattr(BlockBernoulli, "words", counted)
    opts = merganser.MergeOptions(memory_budget=budget, threads=1)
    whole = load_folder(merganser.merge(recipe, tmp_path / "whole", opts))
    assert len(drawn) == 3 * 4  # three models x (the bias + w's three blocks), once each
    monkeypatch.setattr(dare, "MASK_CACHE", cache)
    drawn.clear()
    runs = [load_folder(merganser.merge(recipe, tmp_path / "part", opts))]
    # Per model: with none kept, the bias and w's three blocks twice; else w's last two twice.
    assert len(drawn) == 3 * (8 if cache == 0 else 6)
    runs.append(
        load_folder(merganser.merge(recipe, tmp_path / "torch", replace(opts, fused=False)))
    )
    for run in runs:
        for k in whole:
            assert torch.equal(run[k].view(torch.int16), whole[k].view(torch.int16)), k


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
@pytest.mark.parametrize(
    "params",
    [
        {"density": 0.3, "weight": [1.0, 0.5, 1.5]},
        {"density": 0.2, "rescale": "inverse", "sign_method": "frequency", "lambda": 1.3},
    ],
)
def test_ties_global_scope_merges_block_by_block_as_the_whole_model_trim(
    tmp_path, params, budget
) -> None:
    """``scope: global``: statistic passes over pieces of the tensors give each model's exact
    whole-model threshold (ties kept), then the merge runs block by block, fused or not, on any
    number of threads, and equals the whole-tensor function with those thresholds."""
    from merganser.methods.ties import ties

    base, experts = _family(tmp_path, rows=1500, cols=1031)  # "w": 1.5M entries, two pieces
    recipe = _recipe("ties", {**params, "scope": "global"}, base, experts)
    b = {k: v.float() for k, v in load_folder(base).items()}
    es = [{k: v.float() for k, v in load_folder(e).items()} for e in experts]
    density = [params["density"]] * 3
    thresholds = []
    for i, e in enumerate(es):
        mags = torch.cat([(e[k] - b[k]).abs().reshape(-1) for k in sorted(b)])
        k = int(density[i] * mags.numel())
        thresholds.append(float(mags.sort(descending=True).values[k - 1]))
    weight = params.get("weight", [1.0] * 3)
    want = {
        k: ties([e[k] for e in es], b[k], weight, density, lambda_=params.get("lambda", 1.0),
                sign_method=params.get("sign_method", "mass"), scope="global",
                rescale=params.get("rescale", "none"), threshold=thresholds).to(torch.bfloat16)
        for k in b
    }  # fmt: skip
    for fused_on, threads in ((True, 2), (False, 1)):
        opts = merganser.MergeOptions(fused=fused_on, threads=threads, memory_budget=budget)
        got = load_folder(merganser.merge(recipe, tmp_path / f"o{fused_on}", opts))
        for k in want:
            assert torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), (k, fused_on)
    plan = build_plan(parse_recipe(recipe))
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        assert block_merge(plan, task) is not None and block_merge(plan, task).fused()
    finally:
        plan.close()


@pytest.mark.parametrize("n", [2, 5, 8, 16])
def test_other_elected_merges_are_byte_identical_for_any_number_of_models(tmp_path, n) -> None:
    """breadcrumbs-TIES, DELLA, SCE and TIES with ``scope: global`` for 2 to 16 models: the
    same bytes fused or not and on one thread or two (their sums have one defined order)."""
    base, models = _many_models(tmp_path, n)
    cases = [
        ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}),
        ("della", {"density": 0.5, "epsilon": 0.1}),
        ("sce", {"select_topk": 0.5}),
        ("ties", {"density": 0.4, "scope": "global"}),
    ]
    for method, params in cases:
        recipe = _recipe(method, params, base, models)
        runs = [
            load_folder(merganser.merge(recipe, tmp_path / f"{method}{on}{t}",
                                        merganser.MergeOptions(fused=on, threads=t)))
            for on, t in ((True, 2), (False, 1))
        ]  # fmt: skip
        for k in runs[0]:
            a, b = runs[0][k].view(torch.int16), runs[1][k].view(torch.int16)
            assert torch.equal(a, b), (method, n, k)


@pytest.mark.parametrize("on", [True, False])
def test_ties_global_scope_reports_a_nan_delta_on_both_paths(tmp_path, on) -> None:
    """A NaN in an expert reaches the output on the fused path (its trim keeps NaN) and on the
    torch path (a dropped NaN times 0 is NaN): both stop on it and write nothing."""
    base, experts = _family(tmp_path)
    bad = load_folder(experts[0])
    bad["w"][5, 5] = float("nan")
    experts[0] = write_model(tmp_path / "bad", bad)
    recipe = _recipe("ties", {"density": 0.5, "scope": "global"}, base, experts)
    with pytest.raises(MerganserError, match="NaN or Inf"):
        merganser.merge(recipe, tmp_path / "o", merganser.MergeOptions(fused=on))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (7, 5), (64, 2048), (2, 70_001)])
def test_row_ranks_are_the_inverse_of_a_stable_argsort(shape) -> None:
    """DELLA's ranks from the radix kernel are torch's stable argsort's, ties in index order,
    NaN last: the torch path (a GPU, no numba) ranks alike."""
    g = torch.Generator().manual_seed(shape[1])
    # bf16 differences: many equal magnitudes in a row, as in real task vectors.
    mag = (torch.randn(shape, generator=g).bfloat16().float() * 0.01).bfloat16().float()
    mag = (mag - torch.randn(shape, generator=g).bfloat16().float() * 0.01).abs()
    if shape == (7, 5):
        mag[0] = 0.5  # a row of ties
        mag[1, 1], mag[1, 3], mag[2, 0] = float("nan"), float("inf"), 0.0
    order = mag.argsort(dim=1, stable=True)
    want = torch.empty_like(mag)
    want.scatter_(1, order, torch.arange(shape[1], dtype=torch.float32).expand_as(mag))
    assert torch.equal(fused.row_ranks(mag), want)
    if shape[1] > 1000:  # and the ties are real: an unstable order would differ
        assert mag.unique().numel() < mag.numel() // 2


@pytest.mark.parametrize("cache", [None, 0, 700_000], ids=["all kept", "none", "first blocks"])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("della", {"density": [0.3, 0.6, 0.5], "epsilon": 0.2, "lambda": 1.1}),
        ("della", {"density": 0.5, "epsilon": 0.1, "rescale": "inverse"}),
        ("della_linear", {"density": [0.4, 1.0, 0.7], "epsilon": 0.1, "rescale": "none"}),
    ],
)
def test_della_block_by_block_equals_the_whole_tensor_function(
    tmp_path, monkeypatch, method, params, cache
) -> None:
    """DELLA's blocks hold whole rows (611 x 1031: 254 rows a block, so no block starts on a
    multiple of BLOCK or 8): fused or not, with the l1 pass's masks kept or drawn again, the
    merge is the method's own function on the whole tensor, bit for bit.
    """
    base, experts = _family(tmp_path)
    recipe = _recipe(method, params, base, experts)
    plan = build_plan(parse_recipe(recipe))
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        bm = block_merge(plan, task)
        assert isinstance(bm, della.DellaBlocks) and bm.block == 254 * 1031
        tensors = [plan.checkpoints[ci].read(n).float() for ci, n in task.sources]
        b = plan.checkpoints[task.base[0]].read(task.base[1]).float()
        want = plan.method(tensors, b, **task.params).to(torch.bfloat16)
    finally:
        plan.close()
    if cache is not None:
        monkeypatch.setattr(della, "MASK_CACHE", cache)
    for on in (True, False):
        opts = merganser.MergeOptions(fused=on, threads=1)
        got = load_folder(merganser.merge(recipe, tmp_path / f"o{on}", opts))["w"]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), on


def test_della_masks_follow_the_keep_probabilities() -> None:
    """Entry j is kept where word j's uniform is below its probability: over 10⁶ entries the
    kept share of each rank band is the band's probability (5 sigma), and the mask of any block
    is that block of the whole tensor's mask (the stream is seekable)."""
    g = torch.Generator().manual_seed(0)
    d = torch.randn(1000, 1000, generator=g)
    probs = sparsify.rank_keep_probs(d, 0.5, 0.2)
    words = BlockBernoulli(77).words(0, d.numel())
    kept = sparsify.keep_where_below(words, probs)
    for lo, hi in ((0.3, 0.35), (0.48, 0.52), (0.65, 0.7)):
        band = (probs.reshape(-1) >= lo) & (probs.reshape(-1) < hi)
        share, mean = kept[band].float().mean().item(), probs.reshape(-1)[band].mean().item()
        assert abs(share - mean) < 5 * (0.25 / int(band.sum())) ** 0.5, (lo, share, mean)
    part = sparsify.keep_where_below(BlockBernoulli(77).words(123_457, 5000),
                                     probs.reshape(-1)[123_457:128_457])  # fmt: skip
    assert torch.equal(part, kept[123_457:128_457])


def test_della_l1_pass_sums_per_block_of_whole_rows() -> None:
    """The l1 pass's float64 norms are ``sum_blocks`` over DELLA's row blocks of |τ| and of
    |m⊙τ| with the whole tensor's mask: the sums the whole-tensor function takes."""
    g = torch.Generator().manual_seed(1)
    shape = (611, 1031)
    ts = [torch.randn(shape, generator=g) for _ in range(2)]
    base = torch.randn(shape, generator=g)
    params = {"density": [0.5, 0.4], "epsilon": [0.1, 0.2], "seed": 5, "rescale": "l1"}
    bm = della.DellaBlocks(params, "mass", shape)
    flat, fb = [t.reshape(-1) for t in ts], base.reshape(-1)
    for a in range(0, fb.numel(), bm.block):
        n = min(bm.block, fb.numel() - a)
        bm.observe(0, a, n, lambda idx, a=a, n=n: ([f[a : a + n].clone() for f in flat],
                                                   fb[a : a + n].clone()))  # fmt: skip
    for i, t in enumerate(ts):
        d = t - base
        probs = sparsify.rank_keep_probs(d, params["density"][i], params["epsilon"][i])
        words = BlockBernoulli(dare.model_seed(5, i)).words(0, d.numel())
        kept = sparsify.keep_where_below(words, probs).view(shape)
        assert bm.before[i] == sum_blocks(d.abs(), block=bm.block)
        assert bm.after[i] == sum_blocks((d * kept).abs(), block=bm.block)
        assert 0.3 < bm.after[i] / bm.before[i] < 0.9
