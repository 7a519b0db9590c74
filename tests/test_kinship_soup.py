"""Model Kinship (spec §11) and greedy soups (spec §1.1)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_model

from merganser.analysis.kinship import kinship_matrix, vector_kinship
from merganser.search import greedy_soup


def test_kinship_spec_11_worked_example() -> None:
    m = vector_kinship(torch.tensor([1.0, 2, 3, -1]), torch.tensor([2.0, 4, 6.5, 0]))
    assert m["pearson"] == pytest.approx(0.974097, abs=1e-6)
    assert m["abs_cosine"] == pytest.approx(0.965399, abs=1e-6)
    assert m["euclidean"] == pytest.approx(4.272002, abs=1e-6)
    neg = vector_kinship(torch.tensor([1.0, 2, 3, -1]), -torch.tensor([1.0, 2, 3, -1]))
    assert neg["abs_cosine"] == 1.0 and neg["cosine"] == -1.0  # the reference code's |cos|


def _family(tmp_path, n: int = 3):
    g = torch.Generator().manual_seed(0)
    base = {
        "model.embed_tokens.weight": torch.randn(50, 8, generator=g),
        "model.layers.0.w": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=g),
        "ids": torch.arange(4),
    }
    models = [write_model(tmp_path / "base", base)]
    for i in range(n):
        m = {
            k: (v + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point()
            else v
            for k, v in base.items()
        }
        models.append(write_model(tmp_path / f"m{i}", m))
    return models


def _flat_delta(model, base):
    from safetensors.torch import load_file

    a, b = load_file(str(model / "model.safetensors")), load_file(str(base / "model.safetensors"))
    return torch.cat(
        [(a[k].float() - b[k].float()).reshape(-1) for k in b if b[k].is_floating_point()]
    )


def test_kinship_of_a_model_with_itself_is_exact(tmp_path) -> None:
    base, m0, *_ = _family(tmp_path)
    mat = kinship_matrix([m0, m0], base)
    assert mat["pearson"][0][1] == 1.0 and mat["cosine"][0][1] == 1.0
    assert mat["euclidean"][0][1] == 0.0


def test_streaming_kinship_equals_the_flattened_vectors(tmp_path) -> None:
    base, m0, m1, m2 = _family(tmp_path)
    mat = kinship_matrix([m0, m1, m2], base)
    for (i, a), (j, b) in [((0, m0), (1, m1)), ((0, m0), (2, m2)), ((1, m1), (2, m2))]:
        want = vector_kinship(_flat_delta(a, base).double(), _flat_delta(b, base).double())
        for metric, v in want.items():
            assert mat[metric][i][j] == pytest.approx(v, rel=1e-9, abs=1e-12), metric
            assert mat[metric][j][i] == mat[metric][i][j]


def test_split_calculation_is_the_size_weighted_mean_of_per_tensor_metrics(tmp_path) -> None:
    from safetensors.torch import load_file

    base, m0, m1, _ = _family(tmp_path)
    mat = kinship_matrix([m0, m1], base, split=True)
    b = load_file(str(base / "model.safetensors"))
    x, y = load_file(str(m0 / "model.safetensors")), load_file(str(m1 / "model.safetensors"))
    num = den = 0.0
    for k, v in b.items():
        if v.is_floating_point():
            p = vector_kinship(x[k].float() - v.float(), y[k].float() - v.float())["pearson"]
            num, den = num + p * v.numel(), den + v.numel()
    assert mat["pearson"][0][1] == pytest.approx(num / den, rel=1e-9)
    assert not math.isnan(mat["cosine"][0][1])


def test_kinship_cli_prints_matrices_and_writes_a_heatmap(tmp_path, capsys) -> None:
    from merganser.cli import main

    base, m0, m1, m2 = _family(tmp_path)
    png = tmp_path / "k.png"
    assert (
        main(
            [
                "kinship",
                str(m0),
                str(m1),
                str(m2),
                "--base",
                str(base),
                "--heatmap",
                str(png),
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert len(data["pearson"]) == 3 and data["pearson"][1][1] == 1.0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert main(["kinship", str(m0), "--base", str(base)]) == 1
    assert "at least two models" in capsys.readouterr().err


def test_greedy_soup_spec_1_1() -> None:
    models = [
        {"w": torch.tensor([1.0, 0.0])},
        {"w": torch.tensor([0.0, 1.0])},
        {"w": torch.tensor([2.0, 2.0])},
    ]
    table = {(1.0, 0.0): 0.8, (0.0, 1.0): 0.75, (2.0, 2.0): 0.6, (0.5, 0.5): 0.7, (1.5, 1.0): 0.85}
    calls = []

    def val(m):
        key = tuple(round(float(v), 6) for v in m["w"])
        calls.append(key)
        return table[key]

    res = greedy_soup(models, val)
    assert torch.equal(res.soup["w"], torch.tensor([1.5, 1.0]))
    assert res.ingredients == [0, 2] and res.score == 0.85
    assert [kept for _, _, kept in res.history] == [True, False, True]
    assert (0.5, 0.5) in calls  # the rejected candidate really was evaluated


def test_greedy_soup_never_adds_an_ingredient_that_lowers_the_score() -> None:
    g = torch.Generator().manual_seed(1)
    models = [{"w": torch.randn(3, generator=g)} for _ in range(6)]
    target = torch.tensor([0.3, -0.2, 0.1])

    def val(m):
        return -float((m["w"] - target).norm())

    res = greedy_soup(models, val)
    best = max(val(m) for m in models)
    assert res.score >= best
    running = None
    for _, score, kept in res.history:
        if kept:
            assert running is None or score > running
            running = score
