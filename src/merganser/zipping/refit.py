"""Least-squares refit of a zipped model's linear layers (PLeaS: Nasery, Hayase, Koh, Oh,
CVPR 2025, arXiv 2407.02447).

A zipped layer Σᵢ Mₚ,ᵢ Wᵢ U_q,ᵢ is only as good as the matching. Between models from
different initialisations the features correlate weakly, the errors compound block after
block, and the zipped model may answer nothing. The refit keeps the matching's merge as the
*target*: the layer should output Σᵢ Mₚ,ᵢ Wᵢ xᵢ, the merged features of each model's own
output on its own input xᵢ. It then solves for the weights that produce the target from the
merged model's own input z, which already carries the error of every layer below:

    W = (T Zᵀ + λ W₀) (Z Zᵀ + λ I)⁻¹,   λ = ridge · mean(diag Z Zᵀ)

The ridge pulls towards the zipped weights W₀, not towards zero: directions the data never
excites (tokens absent from it, say) keep the zip's weights instead of losing them.

Layers are solved in forward order, block by block. q/k/v share an input, as do gate/up. The
unmerge at the end of a partial zip's trunk is fitted the same way: model i's residual state
from the merged one. Memory is one batch of activations plus in² moments per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import pad_batches
from merganser.evaluation.forward import call, is_conv1d, linear_layers, row_mask
from merganser.zipping.align import Alignment, roles

Batches = list[tuple[torch.Tensor, torch.Tensor]]
# Runs a model on one batch; returns the positions to keep (None: the batch's padding mask
# where it has one, else every position).
Forward = Callable[[Any, Any], "torch.Tensor | None"]

_GROUPS = (  # linears of one block that share their input, in forward order
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def lstsq_weights(
    zz: torch.Tensor, tz: torch.Tensor, ridge: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """W minimising Σ‖W z − t‖² + λ‖W − W₀‖² from the moments Σ z zᵀ and Σ t zᵀ (PLeaS's
    layer-wise least squares, with a ridge towards the prior W₀, zero if not given)."""
    lam = ridge * float(torch.diagonal(zz).mean().clamp_min(1e-12))
    eye = torch.eye(zz.shape[0], dtype=zz.dtype, device=zz.device)
    rhs = tz if prior is None else tz + lam * prior
    return torch.linalg.solve(zz + lam * eye, rhs.T).T


def _module(model: Any, name: str) -> Any:
    for part in name.split("."):
        model = getattr(model, part)
    return model


def lm_forward(model: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A causal LM on one padded batch of (ids, mask); the real tokens are kept."""
    ids, mask = batch
    model(input_ids=ids, attention_mask=mask, use_cache=False)
    return mask.bool()


def _run(
    models: Sequence[Any], modules: Sequence[str], batches: Iterable[Any], inputs: bool = True,
    forward: Forward = lm_forward,
) -> Iterator[list[torch.Tensor]]:  # fmt: skip
    """Per batch, each model's input (or output) of its module ``modules[i]``, one row per
    kept position."""
    store: list[Any] = [None] * len(models)
    handles = []
    for i, (m, name) in enumerate(zip(models, modules, strict=True)):
        mod = _module(m, name)
        if inputs:
            handles.append(
                mod.register_forward_pre_hook(lambda _m, a, i=i: store.__setitem__(i, a[0]))
            )
        else:
            handles.append(
                mod.register_forward_hook(
                    lambda _m, _a, out, i=i: store.__setitem__(
                        i, out[0] if isinstance(out, tuple) else out
                    )
                )
            )
    try:
        for batch in batches:
            keep = None
            for m in models:
                with torch.no_grad():
                    keep = forward(m, batch)
            out = []
            for s in store:
                mask = keep if keep is not None else row_mask(batch, tuple(s.shape[:-1]))
                out.append((s[mask] if mask is not None else s.reshape(-1, s.shape[-1])).double())
            yield out
    finally:
        for h in handles:
            h.remove()


def _with_bias(z: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([z, torch.ones_like(z[:, :1])], 1) if bias else z


def _weight(lin: Any) -> torch.Tensor:
    """A linear layer's weight as [out, in] (GPT-2's Conv1D stores it [in, out])."""
    return lin.weight.T if is_conv1d(lin) else lin.weight


def refit_group(
    sources: Sequence[Any], merged: Any, alignment: Alignment | None, names: Sequence[str],
    points: Sequence[str | None], batches: Iterable[Any], ridge: float,
    forward: Forward = lm_forward,
) -> None:  # fmt: skip
    """Solve, in place, the linears ``names`` of ``merged`` that share one input: each for
    Σᵢ Mᵢ (Wᵢ xᵢ + bᵢ) at its output point (``points``; None: the models' mean output) from
    the merged model's own input."""
    layers = [_module(merged, n) for n in names]
    bias = [lin.bias is not None for lin in layers]
    zz: dict[bool, torch.Tensor] = {}
    tz: list[torch.Tensor | None] = [None] * len(names)
    for xs in _run([*sources, merged], [names[0]] * (len(sources) + 1), batches, forward=forward):
        z = xs[-1]
        for b in set(bias):
            za = _with_bias(z, b)
            zz[b] = za.T @ za if b not in zz else zz[b].addmm_(za.T, za)
        for j, name in enumerate(names):
            t = torch.zeros(z.shape[0], _weight(layers[j]).shape[0], dtype=torch.float64)
            for i, (src, x) in enumerate(zip(sources, xs[:-1], strict=True)):
                lin = _module(src, name)
                y = torch.nn.functional.linear(
                    x, _weight(lin).double(), None if lin.bias is None else lin.bias.double()
                )
                point = points[j]
                if point and alignment is not None:
                    t += y @ alignment.m(point, i).T
                else:
                    t += y / len(sources)
            g = t.T @ _with_bias(z, bias[j])
            tz[j] = g if tz[j] is None else tz[j].add_(g)
    for j, lin in enumerate(layers):
        acc = tz[j]
        assert acc is not None
        _solve_moments(lin, zz[bias[j]], acc, ridge)


def _solve_moments(lin: Any, zz: torch.Tensor, tz: torch.Tensor, ridge: float) -> None:
    """Set a linear layer (its bias too, if it has one) in place from the moments of its
    inputs z (with a ones column for the bias) and targets, ridge towards its own weights."""
    bias = lin.bias is not None
    prior = _weight(lin).detach().double()
    if bias:
        prior = torch.cat([prior, lin.bias.detach().double()[:, None]], 1)
    w = lstsq_weights(zz, tz, ridge, prior)
    with torch.no_grad():
        if bias:
            lin.bias.copy_(w[:, -1])
            w = w[:, :-1]
        lin.weight.copy_(w.T if is_conv1d(lin) else w)


def fit_linear(lin: Any, z: torch.Tensor, target: torch.Tensor, ridge: float) -> None:
    """Solve ``lin`` in place so that ``lin(z) ≈ target`` (rows, float64), with the ridge
    towards its own weights: PLeaS's least squares for one layer whose data fits in memory."""
    zb = _with_bias(z, lin.bias is not None)
    _solve_moments(lin, zb.T @ zb, target.T @ zb, ridge)


def refit_layers(
    sources: Sequence[Any],
    merged: Any,
    alignment: Alignment,
    seqs: Sequence[Sequence[int]],
    pad: int,
    blocks: int,
    lm_head: bool,
    ridge: float = 1e-4,
    batch: int = 16,
) -> None:
    """Refit, in place and in forward order, the linears of ``merged``'s first ``blocks``
    blocks (and its lm_head, to the models' mean logits) on the token sequences ``seqs``."""
    batches = pad_batches(seqs, pad, batch)
    todo = [[f"model.layers.{b}.{n}" for n in g] for b in range(blocks) for g in _GROUPS]
    if lm_head:
        todo.append(["lm_head"])
    for names in todo:
        points = [roles(f"{n}.weight")[0] for n in names]
        refit_group(sources, merged, alignment, names, points, batches, ridge)


def _call(model: Any, batch: Any) -> None:
    call(model, batch)


def refit_merged(
    sources: Sequence[torch.nn.Module],
    merged: torch.nn.Module,
    batches: Iterable[Any],
    ridge: float = 1e-4,
) -> dict[str, Any]:
    """PLeaS's layer-wise least squares (Nasery et al., CVPR 2025) for a merge of models of one
    architecture: every linear layer of ``merged`` (``nn.Linear`` or GPT-2's ``Conv1D``), in
    forward order, is solved in place so that from the merged model's own input it gives the
    models' mean output on their own inputs, with the ridge towards its merged weights.

    ``batches``: what the models are called on (a mapping of keywords, a tuple or a tensor);
    padding positions (``attention_mask``) are left out. Returns the layers refit and the
    layers kept as merged, each with its reason (tied weights, called more than once, not
    reached by the data).
    """
    data = list(batches)
    if not sources or not data:
        raise MerganserError("refit: give the source models and at least one batch")
    layers = {n.removesuffix(".weight"): m for n, (m, _) in linear_layers(merged).items()}
    if not layers:
        raise MerganserError("refit: the merged model has no nn.Linear or Conv1D layer")
    for i, src in enumerate(sources):
        theirs = {n.removesuffix(".weight"): m for n, (m, _) in linear_layers(src).items()}
        for name, mod in layers.items():
            if name not in theirs or theirs[name].weight.shape != mod.weight.shape:
                raise MerganserError(f"refit: source {i} has no linear layer {name!r} of its shape")
    if ridge < 0:
        raise MerganserError(f"refit: ridge must be ≥ 0, got {ridge}")
    groups, kept = _forward_groups(merged, data[0], layers)
    merged.eval()
    for s in sources:
        s.eval()
    for names in groups:
        refit_group(sources, merged, None, names, [None] * len(names), data, ridge, _call)
    return {"refit": [n for g in groups for n in g], "kept": kept}


@torch.no_grad()
def _forward_groups(
    net: torch.nn.Module, batch: Any, layers: dict[str, Any]
) -> tuple[list[list[str]], dict[str, str]]:
    """The linears in the order one forward pass calls them, grouped by shared input, and
    those that cannot be refit alone, with the reason."""
    owner: dict[int, list[str]] = {}
    for pname, p in net.named_parameters(remove_duplicate=False):
        owner.setdefault(id(p), []).append(pname)
    # the inputs themselves are kept, so no address is reused by a later tensor in this pass
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        mod.register_forward_pre_hook(lambda _m, a, name=name: calls.append((name, a[0])))
        for name, mod in layers.items()
    ]
    try:
        call(net.eval(), batch)
    finally:
        for h in handles:
            h.remove()
    count: dict[str, int] = {}
    for name, _ in calls:
        count[name] = count.get(name, 0) + 1
    kept: dict[str, str] = {}
    for name, mod in layers.items():
        others = [o for o in owner[id(mod.weight)] if o != f"{name}.weight"]
        if others:
            kept[name] = f"weight tied to {others[0]}"
        elif count.get(name, 0) == 0:
            kept[name] = "not reached by the data"
        elif count[name] > 1:
            kept[name] = f"called {count[name]} times per forward pass"
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, x in calls:
        if name in kept or any(name in g for _, g in groups):
            continue
        same = [g for t, g in groups if t is x]
        if same:
            same[0].append(name)
        else:
            groups.append((x, [name]))
    return [g for _, g in groups], kept


def _state_module(state: int) -> str:
    """The module whose output is residual state ``state`` (0: the embeddings)."""
    return "model.embed_tokens" if state == 0 else f"model.layers.{state - 1}"


def fit_unmerges(
    sources: Sequence[Any],
    merged: Any,
    seqs: Sequence[Sequence[int]],
    pad: int,
    state: int,
    priors: Sequence[torch.Tensor],
    ridge: float = 1e-4,
    batch: int = 16,
) -> list[torch.Tensor]:
    """Per model i, the d × d map Uᵢ that best gives its residual state ``state`` from the
    merged model's, xᵢ ≈ Uᵢ z, with the ridge towards the matching's Uᵢ (``priors``): the
    heads' entry into their own basis in a partial zip."""
    name = _state_module(state)
    zz: torch.Tensor | None = None
    xz: list[torch.Tensor | None] = [None] * len(sources)
    for xs in _run(
        [*sources, merged], [name] * (len(sources) + 1), pad_batches(seqs, pad, batch), inputs=False
    ):
        z = xs[-1]
        zz = z.T @ z if zz is None else zz.addmm_(z.T, z)
        for i, x in enumerate(xs[:-1]):
            xz[i] = x.T @ z if xz[i] is None else xz[i].addmm_(x.T, z)
    assert zz is not None
    return [
        lstsq_weights(zz, g, ridge, u.double())
        for g, u in zip(xz, priors, strict=True)
        if g is not None
    ]
