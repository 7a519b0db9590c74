"""ZipIt!, activation matching, Git Re-Basin and averaging on feed-forward networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merganser.errors import MerganserError
from merganser.zipping.sequential import zip_sequential


def mlp(seed: int, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, classes)
    )


def permuted(net: nn.Sequential, seed: int) -> nn.Sequential:
    """The same function with its hidden units shuffled."""
    g = torch.Generator().manual_seed(seed)
    p0, p1 = torch.randperm(16, generator=g), torch.randperm(12, generator=g)
    out = mlp(0)
    sd = net.state_dict()
    out.load_state_dict({
        "0.weight": sd["0.weight"][p0], "0.bias": sd["0.bias"][p0],
        "2.weight": sd["2.weight"][p1][:, p0], "2.bias": sd["2.bias"][p1],
        "4.weight": sd["4.weight"][:, p1], "4.bias": sd["4.bias"],
    })  # fmt: skip
    return out


X = torch.randn(256, 5, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("matcher", ["zipit", "permute", "weight"])
def test_a_permuted_copy_zips_back_to_the_model(matcher: str) -> None:
    a = mlp(1)
    b = permuted(a, 2)
    assert torch.allclose(a(X), b(X), atol=1e-5)
    z = zip_sequential([a, b], X.split(64), matcher=matcher)
    for task in (0, 1):
        assert torch.allclose(z(X, task), a(X), atol=1e-4), (matcher, task)


def test_averaging_a_permuted_copy_is_not_the_model() -> None:
    """The alignment does the work: plain averaging of the same shuffled network breaks it."""
    a = mlp(1)
    z = zip_sequential([a, permuted(a, 2)], X.split(64), matcher="average")
    assert not torch.allclose(z(X, 0), a(X), atol=1e-2)


def test_zipit_merges_within_a_model_and_keeps_each_head() -> None:
    a, b = mlp(1, classes=3), mlp(2, classes=4)
    z = zip_sequential([a, b], X.split(64), matcher="zipit", beta=0.5)
    assert z(X, 0).shape == (256, 3) and z(X, 1).shape == (256, 4)
    assert [m.out_features for m in z.trunk if isinstance(m, nn.Linear)] == [16, 12]
    part = zip_sequential([a, b], X.split(64), matcher="zipit", stop=1)
    # Partial zip: one shared layer, then each model's own rest, reading the merged features.
    assert len([m for m in part.trunk if isinstance(m, nn.Linear)]) == 1
    assert [type(m) for m in part.branches[1]] == [nn.Linear, nn.ReLU, nn.Linear]
    assert torch.equal(part.branches[1][2].weight, b[4].weight)


def test_bad_networks_are_one_line() -> None:
    with pytest.raises(MerganserError, match=r"layer 1 \(BatchNorm1d\) has parameters"):
        bad = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        zip_sequential([bad, bad], [X])
    with pytest.raises(MerganserError, match="layers differ"):
        zip_sequential([mlp(1), nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))], [X])
    with pytest.raises(MerganserError, match="unknown matcher 'rebasin'"):
        zip_sequential([mlp(1), mlp(2)], [X], matcher="rebasin")  # type: ignore[arg-type]
    with pytest.raises(MerganserError, match=r"stop must be 1\.\.2"):
        zip_sequential([mlp(1), mlp(2)], [X], stop=3)


def test_refit_keeps_an_exact_zip_and_brings_a_rough_one_closer() -> None:
    a = mlp(1)
    z = zip_sequential([a, permuted(a, 2)], X.split(64), matcher="zipit", refit=1e-6)
    assert torch.allclose(z(X, 0), a(X), atol=1e-3)
    b = mlp(2)
    rough = zip_sequential([a, b], X.split(64), matcher="average")
    fitted = zip_sequential([a, b], X.split(64), matcher="average", refit=1e-4)

    def err(z_: torch.nn.Module) -> float:
        return sum(float((z_(X, k) - m(X)).square().mean()) for k, m in enumerate((a, b)))

    assert err(fitted) < 0.5 * err(rough)
