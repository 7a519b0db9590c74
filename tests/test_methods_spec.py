"""Each method's worked example from the spec (§3–§7, §13), plus pinned conventions."""

from __future__ import annotations

import pytest
import torch

import merganser
from merganser.methods.dppa import amplify_partitions, dppa_densities
from merganser.methods.slerp import slerp_tensors
from merganser.methods.sparsify import rank_keep_probs, rescale


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


TAU1 = t(0.5, -0.2, 0.1, -0.4, 0.05)
TAU2 = t(-0.3, 0.6, 0.05, -0.1, 0.2)
ZERO = torch.zeros(5)


def test_ties_spec_3_3_canonical() -> None:
    out = merganser.merge_tensors("ties", [TAU1, TAU2], base=ZERO, density=0.6)
    torch.testing.assert_close(out, t(0.5, 0.6, 0.0, -0.4, 0.2), rtol=0, atol=1e-7)


def test_ties_spec_3_3_mergekit_weights() -> None:
    out = merganser.merge_tensors("ties", [TAU1, TAU2], base=ZERO, density=0.6, weight=[1.0, 0.5])
    torch.testing.assert_close(out, t(0.5, 0.6, 0.0, -0.4, 0.2), rtol=0, atol=1e-7)


def test_ties_sign_frequency_and_dis_sum() -> None:
    out = merganser.merge_tensors(
        "ties", [TAU1, TAU2, TAU2], base=ZERO, density=1.0, sign_method="frequency", normalize=False
    )
    # two of three vote for τ2's sign everywhere τ2 is non-zero
    torch.testing.assert_close(out, 2 * TAU2 + torch.where(TAU1.sign() == TAU2.sign(), TAU1, 0))


def test_ties_global_scope_trims_over_the_whole_model() -> None:
    # per tensor, each tensor keeps its own top half; globally, the small tensor loses everything
    big = {"a": t(4, -3, 2, 1), "b": t(0.01, 0.02)}
    zero = {k: torch.zeros_like(v) for k, v in big.items()}
    per = merganser.merge_tensors("ties", [big], base=zero, density=0.5)
    glob = merganser.merge_tensors("ties", [big], base=zero, density=0.5, scope="global")
    assert torch.equal(per["b"], t(0, 0.02)) and torch.equal(per["a"], t(4, -3, 0, 0))
    assert torch.equal(glob["b"], t(0, 0)) and torch.equal(glob["a"], t(4, -3, 2, 0))


def test_dare_spec_4_4_rescales() -> None:
    delta, mask = t(0.1, -0.2, 0.3, -0.4), t(1, 0, 1, 0)
    torch.testing.assert_close(rescale(delta, mask, "inverse", 0.5), t(0.2, 0, 0.6, 0))
    torch.testing.assert_close(rescale(delta, mask, "l1", 0.5), t(0.25, 0, 0.75, 0))


def test_dare_is_seeded_and_keeps_density_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    base, ft = torch.zeros(200_000), torch.randn(200_000, generator=g)
    a = merganser.merge_tensors(
        "dare_linear", [ft], base=base, density=0.3, seed=7, rescale="inverse"
    )
    b = merganser.merge_tensors(
        "dare_linear", [ft], base=base, density=0.3, seed=7, rescale="inverse"
    )
    c = merganser.merge_tensors(
        "dare_linear", [ft], base=base, density=0.3, seed=8, rescale="inverse"
    )
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005
    torch.testing.assert_close(a[a != 0], ft[a != 0] / 0.3)


def test_breadcrumbs_spec_13_2() -> None:
    d = t(0.9, -0.05, 0.3, -0.6, 0.01, 0.2, -0.15, 0.4, 0.02, -0.7)
    out = merganser.merge_tensors("breadcrumbs", [d], base=torch.zeros(10), density=0.5, gamma=0.1)
    torch.testing.assert_close(out, t(0, 0, 0.3, -0.6, 0, 0.2, 0, 0.4, 0, -0.7))


def test_breadcrumbs_small_tensor_keeps_its_entries_unlike_mergekits_slice_bug() -> None:
    d = t(0.3, -0.2, 0.1, 0.05)  # int(0.01 * 4) = 0 outliers removed
    out = merganser.merge_tensors("breadcrumbs", [d], base=torch.zeros(4), density=0.5)
    torch.testing.assert_close(out, t(0.3, -0.2, 0, 0))


def test_della_spec_13_3_keep_probabilities_and_official_rescale() -> None:
    row = t(0.1, -0.4, 0.2, 0.3)
    p = rank_keep_probs(row, 0.5, 0.1)
    torch.testing.assert_close(p, t(0.4, 0.6, 0.466667, 0.533333), rtol=0, atol=1e-6)
    out = rescale(row, t(1, 1, 0, 1), "inverse", p)
    torch.testing.assert_close(out, t(0.25, -0.666667, 0, 0.5625), rtol=0, atol=1e-6)


def test_della_rejects_a_window_outside_0_1() -> None:
    with pytest.raises(merganser.MerganserError, match=r"density ± epsilon must lie in \(0, 1\)"):
        merganser.merge_tensors("della", [t(1, 2)], base=t(0, 0), density=0.1, epsilon=0.15)


def test_model_stock_spec_13_4() -> None:
    out = merganser.merge_tensors("model_stock", [t(1, 0), t(0.6, 0.8)], base=t(0, 0))
    torch.testing.assert_close(out, t(0.6, 0.3))


def test_model_stock_clamps_the_norm_product_at_1e_6() -> None:
    # Task vectors of 5e-4: dot 2.5e-7 over the clamped norm product 1e-6 gives cos 0.25, so
    # t = 2·0.25 / (1 + 0.25) = 0.4 and the merge is 0.4 · 5e-4 (spec 13.4, as mergekit).
    out = merganser.merge_tensors("model_stock", [t(5e-4), t(5e-4)], base=t(0.0))
    torch.testing.assert_close(out, t(2e-4), rtol=1e-5, atol=0)


def test_slerp_spec_13_1() -> None:
    torch.testing.assert_close(slerp_tensors(0.5, t(1, 0), t(0, 1)), t(0.707107, 0.707107))
    torch.testing.assert_close(slerp_tensors(0.5, t(2, 0), t(0, 1)), t(1.414214, 0.707107))
    torch.testing.assert_close(slerp_tensors(0.3, t(1, 1), t(2, 2)), t(1.3, 1.3))
    out = merganser.merge_tensors("slerp", [t(0, 1)], base=t(1, 0), t=0.0)
    assert torch.equal(out, t(1, 0))


def test_nuslerp_of_task_vectors() -> None:
    base = t(1, 1)
    out = merganser.merge_tensors("nuslerp", [t(2, 1), t(1, 2)], base=base, weight=[1.0, 1.0])
    torch.testing.assert_close(out, base + t(0.707107, 0.707107))


def test_reborn_spec_7_3() -> None:
    r, b, tgt = t(1, 2, 3, 4), t(1, 1, 1, 1), t(1.5, 1, 0.5, 1)
    expected = {
        "none": t(1.5, 1.087144, 0.973766, 2.931743),
        "max1": t(1.5, 1.135335, 1.235759, 4.0),
        "mean1": t(1.5, 1.348577, 2.395063, 8.726971),
    }
    for norm, want in expected.items():
        out = merganser.merge_tensors("reborn", [r, tgt], base=b, normalise=norm)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def test_dppa_spec_5_4_dynamic_pruning_densities() -> None:
    dens = dppa_densities(
        layer_ratio={0: 5.0, 1: 10.0},
        linear_ratio={"L0A": 10.0, "L0B": 0.0, "L1A": 0.0, "L1B": 0.0},
        linear_layer={"L0A": 0, "L0B": 0, "L1A": 1, "L1B": 1},
        linear_numel={k: 10 for k in ("L0A", "L0B", "L1A", "L1B")},
        sparsity=0.5,
        owl_lambda=0.08,
    )
    got = [dens[k] for k in ("L0A", "L0B", "L1A", "L1B")]
    assert got == pytest.approx([0.50, 0.393333, 0.553333, 0.553333], abs=1e-6)


def test_dppa_outlier_statistics_from_tensors() -> None:
    """The same toy, from raw deltas: layer outlier % [5, 10], linear % [10, 0, 0, 0]."""
    deltas = {
        "model.layers.0.a.weight": [1.0] * 9 + [20.0],
        "model.layers.0.b.weight": [1.0] * 10,
        "model.layers.1.a.weight": [1.0] * 7 + [10.0] * 3,
        "model.layers.1.b.weight": [1.0] * 8 + [30.0] * 2,
    }
    model = {k: torch.tensor(v).view(2, 5) for k, v in deltas.items()}
    base = {k: torch.zeros(2, 5) for k in deltas}
    from merganser.methods.dppa import DPPAStats

    stats = DPPAStats(
        {
            "outlier_m": 5.0,
            "layer_outlier_m": 3.0,
            "sparsity": 0.5,
            "sparsity_next": 0.4,
            "owl_lambda": 0.08,
        }
    )
    for p in range(2):
        for k in deltas:
            stats.observe(p, k, [model[k]], base[k], {}, 0, (2, 5))
        stats.end_pass(p)
    got = [stats.params_for(k)["densities"][0][0] for k in deltas]
    assert got == pytest.approx([0.50, 0.393333, 0.553333, 0.553333], abs=1e-6)


def test_dppa_spec_5_4_partition_amplification() -> None:
    d = t(0.9, -0.1, 0.05, 0.3, -0.02, 0.01, 0.2, -0.6, 0.04, 0.03)
    out = amplify_partitions(d, [0.1, 0.2], [1.8, 1.0])
    torch.testing.assert_close(out, t(1.62, 0, 0, 0, 0, 0, 0, -0.6, 0, 0))
    out = amplify_partitions(d, [0.1, 0.2], [1.8, 0.0])
    torch.testing.assert_close(out, t(1.62, 0, 0, 0, 0, 0, 0, 0, 0, 0))


def test_karcher_of_equal_norm_orthogonal_vectors_is_their_bisector() -> None:
    out = merganser.merge_tensors("karcher", [t(1, 0), t(0, 1)])
    torch.testing.assert_close(out, t(0.707107, 0.707107))
    skew = merganser.merge_tensors("karcher", [t(1, 0), t(0, 1)], weight=[3.0, 1.0])
    angle = torch.atan2(skew[1], skew[0]).item()
    assert angle == pytest.approx(torch.pi / 8, abs=1e-4)  # weighted geodesic mean


def test_sce_keeps_majority_sign_weighted_by_energy() -> None:
    out = merganser.merge_tensors("sce", [t(1, -1), t(2, 1)], base=t(0, 0))
    # energies 1 and 2.5 → weights 2/7, 5/7; sign of the sum is + for both entries
    torch.testing.assert_close(out, t((2 / 7 * 1 + 5 / 7 * 2) / 1.0, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sampled_kth_largest_is_exact_on_large_tensors_with_ties(dtype) -> None:
    from merganser.methods.sparsify import kth_largest, topk_mask

    x = torch.randn(600_000, generator=torch.Generator().manual_seed(0)).to(dtype).float()
    mag = x.abs()
    for k in (1, 17, 1000, 200_000, 599_999):
        assert kth_largest(mag, k) == mag.kthvalue(mag.numel() - k + 1).values, k
    mask = topk_mask(x, 0.3)
    assert int(mask.sum()) == int(0.3 * x.numel())
    assert mag[mask].min() >= mag[~mask].max()
    assert torch.equal(mask, topk_mask(x, 0.3))  # ties broken the same way every time


def test_dppa_negative_density_pitfall_is_clamped() -> None:
    """Spec §5.2/5.4: at s = 0.9 with λ = 0.08 at both levels, the official densities go below 0."""
    from merganser.methods.dppa import MIN_DENSITY

    dens = dppa_densities(
        layer_ratio={0: 0.0, 1: 10.0},
        linear_ratio={"a": 0.0, "b": 10.0, "c": 0.0},
        linear_layer={"a": 0, "b": 1, "c": 0},
        linear_numel={"a": 10, "b": 10, "c": 10},
        sparsity=0.95,
        owl_lambda=0.08,
    )
    assert dens["a"] == MIN_DENSITY  # 0.05 - 0.08 - 0.04 < 0 in the official code
    assert all(MIN_DENSITY <= d <= 1 for d in dens.values())


def _model_stock_pairwise(tensors, base, filter_wise=False):
    """mergekit's Model Stock, pair by pair (its order of operations, in float64)."""
    b = base.double().reshape(-1) if not filter_wise else base.double()
    offs = [(x.double().reshape(b.shape) - b) for x in tensors]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            norms = offs[i].norm(dim=-1) * offs[j].norm(dim=-1)
            cos.append(((offs[i] * offs[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    n = len(offs)
    t = n * c / (1 + (n - 1) * c)
    return (t * sum(x.double().reshape(b.shape) for x in tensors) / n + (1 - t) * b).reshape(
        base.shape
    )


def test_model_stock_mean_cosine_in_one_pass_worked_example() -> None:
    """docs/methods.md: offsets (1, 0), (0.6, 0.8), (0, 1): pairwise mean (0.6 + 0 + 0.8)/3,
    so t = 3·0.4667 / (1 + 2·0.4667) = 0.7241."""
    base = t(0, 0)
    out = merganser.merge_tensors("model_stock", [t(1, 0), t(0.6, 0.8), t(0, 1)], base=base)
    torch.testing.assert_close(out, 0.724138 * t(1.6, 1.8) / 3)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 8, 40])
def test_model_stock_equals_the_pairwise_mean(filter_wise: bool, n: int) -> None:
    """The one-pass cosine gives mergekit's pair-by-pair merge (to float rounding), also where
    every norm is below 10⁻³ (both floors agree there)."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(6, 50, generator=g)
    shared = torch.randn(6, 50, generator=g) * 0.1
    tensors = [base + shared + torch.randn(6, 50, generator=g) * 0.05 for _ in range(n)]
    tiny = [base + (x - base) * 1e-5 for x in tensors]  # every norm below 10⁻³
    for ts in (tensors, tiny):
        got = merganser.merge_tensors("model_stock", ts, base=base, filter_wise=filter_wise)
        want = _model_stock_pairwise(ts, base, filter_wise).float()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [2, 20])
def test_model_stock_of_opposed_task_vectors_keeps_the_base(n: int) -> None:
    """1 + (N−1)cos = 0: no finite estimate, so θ₀ (as mergekit); it was NaN."""
    base = t(0.5, 0.0)
    if n == 2:
        tensors = [t(1.0, 0.0), t(0.0, 0.0)]  # offsets (0.5, 0) and (−0.5, 0): cos −1
    else:  # cos = −1/(N−1): N unit offsets summing to zero, in the plane
        import math

        tensors = [
            base + t(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)
        ]
    out = merganser.merge_tensors("model_stock", tensors, base=base)
    torch.testing.assert_close(out, base)
