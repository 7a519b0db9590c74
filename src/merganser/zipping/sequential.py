"""ZipIt!, Git Re-Basin and averaging for plain feed-forward networks (``nn.Sequential`` of
``Linear`` and elementwise activations, the last ``Linear`` a task head): the networks of
ZipIt!'s own experiments, trained from different initialisations.

Every hidden layer's output features are matched across the models (:mod:`.matching`): a merge
matrix M (d × n·d) averages each group of matched features and an unmerge matrix U (n·d × d)
maps each model's features back onto the merged ones. Layer l of the merged network is
``M_l · [W_l^(m) · U_(l−1)^(m)]_m`` (rows stacked over models), its bias ``M_l · [b_l^(m)]_m``;
each model keeps its own head, reading the merged features through its U. A *partial* zip
(``stop``) merges the first layers only and lets every model keep the rest of its own network
behind them: one shared trunk, one branch per model (ZipIt!'s "partial zipping").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from merganser.errors import MerganserError
from merganser.zipping.matching import (
    Axis,
    apply_perms,
    correlation,
    permute_match,
    weight_matching,
    zipit_match,
)

Matcher = Literal["zipit", "permute", "weight", "average"]


class Branched(nn.Module):
    """A shared trunk and one branch per model; ``forward(x, task)`` runs branch ``task``."""

    def __init__(self, trunk: nn.Sequential, branches: Sequence[nn.Sequential]) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor, task: int = 0) -> torch.Tensor:
        return self.branches[task](self.trunk(x))


def linears(model: nn.Sequential) -> list[int]:
    """Indices of the ``nn.Linear`` layers; everything between them must be elementwise."""
    idx = [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    for i, m in enumerate(model):
        if i not in idx and any(True for _ in m.parameters()):
            raise MerganserError(
                f"zip: layer {i} ({type(m).__name__}) has parameters; only Linear layers and "
                "parameter-free elementwise activations can be zipped here"
            )
    if len(idx) < 2:
        raise MerganserError("zip: the network needs a hidden Linear layer and a head")
    return idx


def zip_sequential(
    models: Sequence[nn.Sequential],
    batches: Iterable[torch.Tensor],
    matcher: Matcher = "zipit",
    stop: int | None = None,
    alpha: float = 0.3,
    beta: float = 0.5,
    seed: int = 0,
    refit: float | None = None,
) -> Branched:
    """Merge feed-forward networks from different initialisations (Stoica et al., ICLR 2024,
    arXiv 2305.03053; Ainsworth et al., ICLR 2023, arXiv 2209.04836).

    ``matcher``: ``zipit`` (greedy, same-model merges allowed, ``alpha``/``beta`` as the paper),
    ``permute`` (activation matching), ``weight`` (Git Re-Basin weight matching, data-free) or
    ``average`` (no alignment). ``batches`` are inputs all models read (features are matched on
    them). ``stop``: how many hidden layers to merge (default all). ``refit`` (a ridge, e.g.
    1e-4): then solve each merged layer, and each branch's first layer, by least squares for the
    matching's target on the merged network's own inputs (PLeaS, as ``zipping.refit``).
    """
    if len(models) < 2:
        raise MerganserError("zip: give two or more models")
    if matcher not in ("zipit", "permute", "weight", "average"):
        raise MerganserError(f"zip: unknown matcher {matcher!r} (zipit, permute, weight, average)")
    idx = linears(models[0])

    def layout(model: nn.Sequential) -> list[Any]:
        # Layer types and widths; the heads may have different numbers of classes.
        return (
            [type(m) for m in model]
            + [model[i].in_features for i in idx]
            + [model[i].out_features for i in idx[:-1]]
        )

    if any(len(model) != len(models[0]) or layout(model) != layout(models[0]) for model in models):
        raise MerganserError("zip: the networks' layers differ")
    hidden = len(idx) - 1
    stop = hidden if stop is None else stop
    if not 1 <= stop <= hidden:
        raise MerganserError(f"zip: stop must be 1..{hidden} (hidden layers), got {stop}")
    n = len(models)
    nets = [m.eval() for m in models]
    if matcher == "weight":
        nets = [nets[0]] + [_rebasin(nets[0], m, idx, seed) for m in nets[1:]]
    data = [x for x in batches]
    weights = [[m[i].weight.detach().double() for i in idx] for m in nets]
    biases = [[_bias(m[i]) for i in idx] for m in nets]
    trunk: list[nn.Module] = []
    merges: list[torch.Tensor] = []
    unmerge_prev: list[torch.Tensor | None] = [None] * n  # identity on the inputs
    acts = [list(data) for _ in range(n)]  # each model's own input to the current layer
    pre: list[list[torch.Tensor]] = [[] for _ in range(n)]  # per model, per merged layer
    for layer in range(stop):
        i = idx[layer]
        d = weights[0][layer].shape[0]
        ws = [_read_through(weights[m][layer], unmerge_prev[m]) for m in range(n)]
        # each model's features after this layer's activation, from its own stream (and,
        # for the refit, its pre-activation output)
        feats = []
        with torch.no_grad():
            for m in range(n):
                out_m = [nets[m][i](x) for x in acts[m]]
                if refit is not None:
                    pre[m].append(torch.cat(out_m).double())
                acts[m] = [nets[m][i + 1 : idx[layer + 1]](y) for y in out_m]
                feats.append(torch.cat([a.double() for a in acts[m]]))
        merge, unmerge = _match(matcher, feats, d, alpha, beta)
        merges.append(merge)
        w = merge @ torch.cat(ws)
        b = merge @ torch.cat([biases[m][layer] for m in range(n)])
        lin = nn.Linear(w.shape[1], d)
        with torch.no_grad():
            lin.weight.copy_(w.float())
            lin.bias.copy_(b.float())
        trunk.append(lin)
        trunk.extend(_activations(nets[0], i, idx[layer + 1]))
        unmerge_prev = [unmerge[m * d : (m + 1) * d] for m in range(n)]
    branches = []
    for m in range(n):
        own = nets[m][idx[stop] :]
        first = own[0]
        lin = nn.Linear(unmerge_prev[m].shape[1], first.out_features)
        with torch.no_grad():
            lin.weight.copy_(_read_through(first.weight.detach().double(), unmerge_prev[m]).float())
            lin.bias.copy_(_bias(first).float())
        branches.append(nn.Sequential(lin, *[_copy(x) for x in own[1:]]))
    out = Branched(nn.Sequential(*trunk), branches).eval()
    if refit is not None:
        with torch.no_grad():  # each branch's first layer, on its model's own stream
            for m in range(n):
                pre[m].append(torch.cat([nets[m][idx[stop]](x) for x in acts[m]]).double())
        _refit(out, pre, merges, torch.cat(data), refit)
    return out


@torch.no_grad()
def _refit(
    out: Branched,
    pre: list[list[torch.Tensor]],
    merges: list[torch.Tensor],
    x: torch.Tensor,
    ridge: float,
) -> None:
    """Least squares, layer by layer in forward order: each merged layer maps the merged
    network's input to the merge of every model's own pre-activation output (``pre[m][l]``);
    each branch's first layer maps the trunk's output to its model's own (``pre[m][-1]``)."""
    from merganser.zipping.refit import fit_linear

    z = x.float()
    layer = 0
    for module in out.trunk:
        if isinstance(module, nn.Linear):
            target = torch.cat([p[layer] for p in pre], dim=1) @ merges[layer].T
            fit_linear(module, z.double(), target, ridge)
            layer += 1
        z = module(z)
    for m, branch in enumerate(out.branches):
        fit_linear(branch[0], z.double(), pre[m][-1], ridge)


def _read_through(w: torch.Tensor, unmerge: torch.Tensor | None) -> torch.Tensor:
    """W · U: a layer that read one model's features reads the merged ones."""
    return w if unmerge is None else w @ unmerge


def _bias(lin: nn.Linear) -> torch.Tensor:
    if lin.bias is None:
        return torch.zeros(lin.out_features, dtype=torch.float64)
    return lin.bias.detach().double()


def _activations(net: nn.Sequential, start: int, end: int) -> list[nn.Module]:
    return [_copy(net[j]) for j in range(start + 1, end)]


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def _match(
    matcher: Matcher, feats: list[torch.Tensor], d: int, alpha: float, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(feats)
    if matcher in ("average", "weight"):  # weight matching already permuted the models
        unmerge = torch.cat([torch.eye(d, dtype=torch.float64)] * n)
        return (unmerge / n).T, unmerge
    x = torch.cat(feats, dim=1)
    x = x - x.mean(0, keepdim=True)
    corr = correlation(x.T @ x / max(1, x.shape[0] - 1))
    if matcher == "permute":
        return permute_match(corr, n)
    if matcher == "zipit":
        return zipit_match(corr, n, alpha=alpha, beta=beta)
    raise MerganserError(f"zip: unknown matcher {matcher!r} (zipit, permute, weight, average)")


def _rebasin(a: nn.Sequential, b: nn.Sequential, idx: list[int], seed: int) -> nn.Sequential:
    """Model B permuted onto model A by Git Re-Basin weight matching (heads excluded from the
    permuted outputs: each model keeps its own)."""
    spec = {}
    for layer in range(len(idx) - 1):
        i, j = idx[layer], idx[layer + 1]
        axes = [Axis(f"{i}.weight", 0)]
        if tuple(a[j].weight.shape) == tuple(b[j].weight.shape):  # heads of other tasks: no
            axes.append(Axis(f"{j}.weight", 1))
        if b[i].bias is not None:
            axes.append(Axis(f"{i}.bias", 0))
        spec[f"P{layer}"] = axes
    sa = {k: v.detach() for k, v in a.state_dict().items()}
    sb = {k: v.detach() for k, v in b.state_dict().items()}
    perms = weight_matching(spec, sa, sb, seed=seed)
    moved = apply_perms(spec, perms, sb)
    head = f"{idx[-1]}.weight"
    if not any(ax.param == head for axes in spec.values() for ax in axes):
        # B's own head reads B's last hidden units: it follows their permutation.
        moved[head] = sb[head][:, perms[f"P{len(idx) - 2}"]]
    out = _copy(b)
    out.load_state_dict(moved)
    return out
