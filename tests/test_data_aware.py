"""Data-aware merging: calibration statistics, RegMean (spec §9) and Fisher merging (spec §10)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_folder, run_cli

from merganser.api import merge_tensors
from merganser.evaluation.calibrate import CalibrationOptions, calibrate
from merganser.methods.fisher import fisher
from merganser.methods.regmean import regmean


def close(t: torch.Tensor, expected: list, atol: float) -> bool:
    return torch.allclose(t.double(), torch.tensor(expected, dtype=torch.float64), atol=atol)


W1 = torch.eye(2)
W2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
G1 = torch.tensor([[4.0, 2.0], [2.0, 2.0]])  # X1 = [[2, 1], [0, 1]]
G2 = torch.tensor([[2.0, 2.0], [2.0, 4.0]])  # X2 = [[1, 0], [1, 2]]


@pytest.mark.parametrize(
    ("alpha", "expected"),
    [
        (1.0, [[0.6, 0.6], [0.4, 0.4]]),
        (0.1, [[0.65625, 0.65625], [0.34375, 0.34375]]),
        (0.0, [[2 / 3, 2 / 3], [1 / 3, 1 / 3]]),
    ],
)
def test_regmean_spec_9_worked_example(alpha: float, expected: list[list[float]]) -> None:
    exact = regmean([W1, W2], [1.0, 1.0], alpha=alpha, ridge=0.0, stats=[G1, G2])
    assert close(exact, expected, 1e-7)  # float32 result of a float64 solve
    default = regmean([W1, W2], [1.0, 1.0], alpha=alpha, stats=[G1, G2])
    assert close(default, expected, 1e-5)


def test_regmean_without_grams_is_the_simple_mean() -> None:
    assert regmean([W1, W2], [1.0, 1.0], stats=[None, None]).tolist() == [[0.5, 0.5]] * 2
    bias = regmean(
        [torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])], [1.0, 3.0], stats=[None, None]
    )
    assert bias.tolist() == [2.5, 4.5]  # coefficient-weighted mean


def test_regmean_of_identical_weights_returns_them() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 4, generator=g)
    grams = []
    for _ in range(3):
        x = torch.randn(10, 4, generator=g)
        grams.append(x.T @ x)
    out = regmean([w, w.clone(), w.clone()], [1.0, 2.0, 1.0], alpha=0.5, stats=grams)
    assert torch.allclose(out, w, atol=1e-5)


def test_regmean_ridge_keeps_unseen_inputs_at_the_mean() -> None:
    # Input feature 1 is never active: its Gram row and column are zero in both models.
    g = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])
    out = regmean([a, b], [1.0, 1.0], stats=[g, g])
    assert close(out, [[2.0, 4.0]], 1e-4)


def test_fisher_spec_10_worked_example() -> None:
    out = fisher(
        [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])],
        [0.5, 0.5],
        stats=[torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])],
    )
    assert out.tolist() == pytest.approx([2.5, 1.5])


def test_fisher_floor_falls_back_to_the_first_model() -> None:
    zero = torch.zeros(2)
    t = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])]
    assert fisher(t, [1.0, 1.0], stats=[zero, zero]).tolist() == pytest.approx([1.0, 2.0])
    both = fisher(t, [1.0, 1.0], floor_models="all", stats=[zero, zero])
    assert both.tolist() == pytest.approx([2.0, 3.0])  # equal floors: the plain mean
    nofloor = fisher(t, [1.0, 1.0], floor=0.0, stats=[zero, zero])
    assert nofloor.tolist() == [1.0, 2.0]  # 0/0 keeps the first model, no NaN


def test_fisher_normalize_divides_by_the_model_norm() -> None:
    t = [torch.tensor([0.0]), torch.tensor([1.0])]
    f = [torch.tensor([1.0]), torch.tensor([4.0])]
    plain = fisher(t, [1.0, 1.0], stats=f)
    normed = fisher(t, [1.0, 1.0], normalize=True, stats=f, fisher_norms=[1.0, 4.0])
    assert plain.item() == pytest.approx(0.8) and normed.item() == pytest.approx(0.5)


def test_merge_tensors_needs_statistics() -> None:
    from merganser.errors import MerganserError

    with pytest.raises(MerganserError, match="needs statistics="):
        merge_tensors("regmean", [W1, W2])
    out = merge_tensors("regmean", [W1, W2], statistics=[{"": G1}, {"": G2}], ridge=0.0)
    assert close(out, [[0.6, 0.6], [0.4, 0.4]], 1e-7)


# --- calibration on a real (tiny) Llama ----------------------------------------------------


@pytest.fixture(scope="module")
def zoo(reduced_zoo: Path) -> Path:
    return reduced_zoo / "zoo" / "seed0"


TEXTS = ["REV:abc=cba", "ADD:1+2=3", "REV:abcdh=hdcba", "SRT:bca=abc", "ADD:9+9=18"]


def test_grams_mask_padding(zoo: Path) -> None:
    one, meta = calibrate(zoo / "expert_add", TEXTS, options=CalibrationOptions(batch=1))
    many, _ = calibrate(zoo / "expert_add", TEXTS, options=CalibrationOptions(batch=5))
    padded, _ = calibrate(
        zoo / "expert_add", TEXTS, options=CalibrationOptions(batch=5, mask_padding=False)
    )
    key = "gram.model.layers.0.self_attn.q_proj.weight"
    # Batched with padding masked equals one sequence at a time (no padding at all) ...
    for k in one:
        assert torch.allclose(one[k], many[k], rtol=1e-4, atol=1e-6), k
    # ... and counting padding rows, as the RegMean code does, changes the statistic.
    assert not torch.allclose(one[key], padded[key], rtol=1e-3)
    g = one[key].double()
    assert torch.allclose(g, g.T) and float(torch.linalg.eigvalsh(g).min()) > -1e-6
    assert meta["kinds"] == "gram" and meta["mask_padding"] == "true"


def test_gram_is_the_mean_outer_product_of_layer_inputs(zoo: Path) -> None:
    from merganser.evaluation.evaluate import load_model

    lm = load_model(zoo / "expert_add")
    stats, meta = calibrate(lm, TEXTS[:2], options=CalibrationOptions(batch=2))
    rows = []
    handle = lm.model.lm_head.register_forward_pre_hook(lambda m, a: rows.append(a[0][0]))
    with torch.no_grad():
        for t in TEXTS[:2]:
            lm.model(input_ids=torch.tensor([[*lm.bos, *lm.encode(t), lm.eos]]))
    handle.remove()
    x = torch.cat(rows).double()
    assert int(meta["tokens"]) == x.shape[0]
    want = (x.T @ x / x.shape[0]).float()
    assert torch.allclose(stats["gram.lm_head.weight"], want, rtol=1e-4, atol=1e-6)


def test_empirical_fisher_matches_per_example_gradients(zoo: Path) -> None:
    from merganser.evaluation.evaluate import load_model

    lm = load_model(zoo / "expert_add")
    opts = CalibrationOptions(grams=False, fisher=True, fisher_labels="empirical", batch=2)
    stats, meta = calibrate(lm, TEXTS[:2], options=opts)
    p = lm.model.model.norm.weight
    want = torch.zeros_like(p, dtype=torch.float64)
    for t in TEXTS[:2]:
        ids = torch.tensor([[*lm.bos, *lm.encode(t), lm.eos]])
        lm.model.zero_grad()
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0, :-1], -1)
        logp.gather(1, ids[0, 1:, None]).sum().backward()
        want += p.grad.double().square()
    assert torch.allclose(stats["fisher.model.norm.weight"].double(), want / 2, rtol=1e-4)
    norm = math.sqrt(sum(float(v.double().square().sum()) for v in stats.values()))
    assert float(meta["fisher_norm"]) == pytest.approx(norm, rel=1e-5)


# --- recipes with statistics, through the CLI -----------------------------------------------


def _calibrated(zoo: Path, tmp: Path) -> list[tuple[Path, Path]]:
    out = []
    for task in ("reverse", "add"):
        stats = tmp / f"{task}.safetensors"
        r = run_cli(
            "calibrate", str(zoo / f"expert_{task}"), str(stats), "--tasks", task,
            "--examples", "32", "--fisher", "--no-progress",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "gram,fisher statistics from 32 examples" in r.stdout
        out.append((zoo / f"expert_{task}", stats))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_recipe_with_statistics_matches_in_memory_merge(
    zoo: Path, tmp_path: Path, method: str
) -> None:
    from safetensors.torch import load_file

    pairs = _calibrated(zoo, tmp_path)
    recipe = {
        "merge_method": method,
        "models": [{"model": str(m), "statistics": str(s)} for m, s in pairs],
        "parameters": {"alpha": 0.9} if method == "regmean" else {"normalize": True},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    r = run_cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    got = load_folder(tmp_path / "out")
    models = [load_folder(m) for m, _ in pairs]
    stats = [load_file(str(s)) for _, s in pairs]
    want = merge_tensors(method, models, statistics=stats, **recipe["parameters"])
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    mean = merge_tensors("linear", models)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], mean[q], atol=1e-4)  # the statistics did something


@pytest.mark.slow
def test_statistics_errors_are_one_line(zoo: Path, tmp_path: Path) -> None:
    pairs = _calibrated(zoo, tmp_path)
    cases = {
        "missing": ({"merge_method": "regmean", "models": [{"model": str(m)} for m, _ in pairs]},
                    "models[0].statistics: method 'regmean' needs each model's gram statistics"),
        "not stats": ({"merge_method": "fisher",
                       "models": [{"model": str(m), "statistics": str(m / "model.safetensors")}
                                  for m, _ in pairs]}, "holds no fisher statistics"),
        "unused": ({"merge_method": "linear",
                    "models": [{"model": str(m), "statistics": str(s)} for m, s in pairs]},
                   "method 'linear' uses no statistics"),
    }  # fmt: skip
    for name, (recipe, message) in cases.items():
        p = tmp_path / f"{name.replace(' ', '_')}.yaml"
        p.write_text(yaml.safe_dump(recipe))
        r = run_cli("merge", str(p), str(tmp_path / "out"), "--no-progress")
        assert r.returncode == 1, name
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists()


def test_read_texts(tmp_path: Path) -> None:
    from merganser.errors import MerganserError
    from merganser.evaluation.calibrate import read_texts

    (tmp_path / "d.jsonl").write_text('{"text": "abc"}\n\n{"prompt": "A:", "answer": "b"}\n')
    assert read_texts(tmp_path / "d.jsonl") == ["abc", "A:b"]
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "d.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"prompt": 3}\n')
    with pytest.raises(MerganserError, match=r"bad.jsonl:2: expected"):
        read_texts(tmp_path / "bad.jsonl")


# --- AdaMerging (spec §13.5) ----------------------------------------------------------------


def test_adamerging_spec_13_5_entropy() -> None:
    from merganser.search.adamerging import entropy

    assert float(entropy(torch.tensor([2.0, 0.0]))) == pytest.approx(0.365334, abs=1e-6)


def test_adamerging_plus_plus_task_vectors() -> None:
    from merganser.search.adamerging import ties_task_vectors

    a, b = torch.tensor([3.0, -2.0, 0.5, 1.0, 0.0]), torch.tensor([-1.0, 4.0, -0.2, 2.0, 1.5])
    ta, tb = ties_task_vectors([a, b], 0.4)  # keep 2 of 5 per task, then the elected sign
    # trimmed: a -> [3, -2, 0, 0, 0], b -> [0, 4, 0, 2, 0]; the sums [3, 2, 0, 2, 0] elect +,
    # so a's -2 disagrees and is dropped; nothing is averaged (each task keeps its own values).
    assert ta.tolist() == [3.0, 0.0, 0.0, 0.0, 0.0]
    assert tb.tolist() == [0.0, 4.0, 0.0, 2.0, 0.0]


@pytest.mark.slow
def test_adamerging_learns_coefficients_on_the_zoo(zoo: Path, tmp_path: Path) -> None:
    from merganser.search.config import parse_search
    from merganser.search.run import load_state, run_search

    cfg = parse_search(
        {
            "strategy": "adamerging",
            "models": [str(zoo / "expert_reverse"), str(zoo / "expert_add")],
            "base_model": str(zoo / "base"),
            "evaluator": {"tasks": ["reverse", "add"], "n": 32},
            "workers": 1,
            "adamerging": {"steps": 30, "lr": 0.05, "report_every": 10, "batch": 8},
        }
    )
    rep = run_search(cfg, tmp_path / "out", verbose=False)
    entropies = [h["entropy"] for h in rep["history"]]
    assert entropies[-1] < entropies[0]  # the objective is being minimised
    devs = [g["dev"] for g in rep["generations"]]
    assert devs == sorted(devs) and rep["best"]["dev"] >= rep["start"]["dev"]
    # The saved model is θ0 + Σ λ τ with the reported (clamped) per-tensor λ.
    lams = rep["details"]["lambdas"]
    base = load_state(zoo / "base")[0]
    experts = [load_state(zoo / f"expert_{t}")[0] for t in ("reverse", "add")]
    got = load_folder(tmp_path / "out" / "best")
    for k, (l1, l2) in lams.items():
        assert all(0.0 <= x <= 1.0 for x in (l1, l2))
        want = base[k] + l1 * (experts[0][k] - base[k]) + l2 * (experts[1][k] - base[k])
        assert torch.allclose(got[k], want, atol=1e-5), k


def test_fisher_normalize_on_single_tensors_uses_their_fisher_norms() -> None:
    """merge_tensors on single tensors with normalize: true weights each model by 1/‖Fᵢ‖; it
    found no ``fisher.`` keys in ``{"": F}`` and returned the first model unchanged.
    """
    from merganser import merge_tensors

    t = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    f = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])]  # norms 5 and √2
    got = merge_tensors("fisher", t, statistics=[{"": x} for x in f], normalize=True)
    lam = [0.5 / 5.0, 0.5 / 2**0.5]
    want = (lam[0] * f[0] * t[0] + lam[1] * f[1] * t[1]) / (lam[0] * f[0] + lam[1] * f[1])
    assert torch.allclose(got, want)
    assert not torch.allclose(got, t[0])
