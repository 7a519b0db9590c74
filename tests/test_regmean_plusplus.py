"""RegMean++ (spec-2 §5): block inputs from the merged stream; the worked example's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from merganser.api import merge_tensors
from merganser.errors import MerganserError
from merganser.evaluation.calibrate import CalibrationOptions, calibrate_module
from merganser.evaluation.regmean_plusplus import regmean_plusplus
from merganser.methods.regmean import regmean

X1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
X2 = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 1.0]])
W1 = ([[1.0, 0.0], [0.5, 1.0]], [[0.0, 1.0], [1.0, -1.0]])
W2 = ([[1.0, 1.0], [0.0, 1.0]], [[2.0, 0.0], [1.0, 1.0]])
MERGED_W1 = [[0.142857, 0.75], [1.142857, -0.125]]


class Net(nn.Module):
    """Two Linear+ReLU blocks, no biases (the spec's example)."""

    def __init__(self, w1: list, w2: list) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU()) for _ in range(2)
        )
        with torch.no_grad():
            self.blocks[0][0].weight.copy_(torch.tensor(w1))
            self.blocks[1][0].weight.copy_(torch.tensor(w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def models() -> list[Net]:
    return [Net(W1[0], W2[0]), Net(W1[1], W2[1])]


def test_spec_5_4_worked_example() -> None:
    out = regmean_plusplus(models(), [[X1], [X2]], alpha=1.0, ridge=0.0)
    assert torch.allclose(out["blocks.0.0.weight"], torch.tensor(MERGED_W1), atol=1e-6)
    want = [[1.678282, 0.198940], [0.306694, 1.013514]]
    assert torch.allclose(out["blocks.1.0.weight"], torch.tensor(want), atol=1e-6)


def test_spec_5_4_block_1_at_alpha_095() -> None:
    """The spec's α = 0.95 row merges block 1 at 0.95 on the α = 1 merged stream's inputs."""
    h1 = torch.relu(X1 @ torch.tensor(MERGED_W1).T)
    h2 = torch.relu(X2 @ torch.tensor(MERGED_W1).T)
    grams = [h.T @ h / 3 for h in (h1, h2)]
    out = regmean([torch.tensor(w) for w in W2], [1.0, 1.0], 0.95, 0.0, grams)
    want = [[1.654567, 0.205994], [0.308006, 1.012603]]
    assert torch.allclose(out, torch.tensor(want), atol=1e-5)
    # The whole procedure at 0.95 merges block 0 at 0.95 too: self-consistent closed form.
    full = regmean_plusplus(models(), [[X1], [X2]], alpha=0.95, ridge=0.0)
    w1 = full["blocks.0.0.weight"]
    grams = [torch.relu(x @ w1.T).T @ torch.relu(x @ w1.T) / 3 for x in (X1, X2)]
    again = regmean([torch.tensor(w) for w in W2], [1.0, 1.0], 0.95, 0.0, grams)
    assert torch.allclose(full["blocks.1.0.weight"], again, atol=1e-5)


def test_plain_regmean_on_own_streams_gives_the_spec_numbers() -> None:
    """The same example through calibrate_module + regmean: each model's own stream."""
    stats = [
        calibrate_module(m, [x], options=CalibrationOptions())[0]
        for m, x in zip(models(), (X1, X2), strict=True)
    ]
    out = merge_tensors(
        "regmean", [m.state_dict() for m in models()], statistics=stats, alpha=1.0, ridge=0.0
    )
    assert torch.allclose(out["blocks.0.0.weight"], torch.tensor(MERGED_W1), atol=1e-6)
    want = [[1.901639, 0.147541], [0.377049, 0.934426]]
    assert torch.allclose(out["blocks.1.0.weight"], torch.tensor(want), atol=1e-6)


def test_one_model_in_that_model_out_and_tail_policy() -> None:
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(3, 4)
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.GELU()) for _ in range(3))
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.embed(x)
            for b in self.layers:
                x = b(x)
            return self.out(x)

    m = Head()
    x = torch.randn(20, 3)
    same = regmean_plusplus([m, m], [[x], [x]], alpha=1.0)
    for k, v in m.state_dict().items():
        assert torch.allclose(same[k], v, atol=1e-5), k
    base, a, b = Head(), Head(), Head()
    out = regmean_plusplus([a, b], [[x], [x]], base=base)
    assert torch.equal(out["out.weight"], base.out.weight)  # after the blocks: the base's
    assert torch.allclose(out["embed.weight"], (a.embed.weight + b.embed.weight) / 2)
    mean = regmean_plusplus([a, b], [[x], [x]], base=base, tail="mean")
    assert torch.allclose(mean["out.weight"], (a.out.weight + b.out.weight) / 2)
    with pytest.raises(MerganserError, match="needs base"):
        regmean_plusplus([a, b], [[x], [x]], tail="base")
    with pytest.raises(MerganserError, match="2 models need"):
        regmean_plusplus([a, b], [[x]])
