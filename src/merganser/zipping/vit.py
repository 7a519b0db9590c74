"""ZipIt!, Git Re-Basin and averaging for Vision Transformers (transformers' ``ViTModel``) trained
from different initialisations, each model keeping its own classification head.

The merge points are those of the Llama zipper (:mod:`.align`), on ViT's pre-norm blocks:

* ``res`` — the residual stream: the patch projection's outputs, the CLS token and position
  embeddings, every LayerNorm's weight *and bias*, o_proj and fc2 outputs, and every reader's
  input axis.
* ``mlp.l`` — block l's GELU units (fc1 rows, fc2 columns).
* ``q.l``/``k.l`` and ``v.l``/``o.l`` — block l's attention heads, matched as units; inside
  each matched set of heads, q and k dimensions move together (no RoPE pins them in a ViT) and
  v dimensions move with the o_proj columns that read them.

Activation matchers see every token of every image (CLS and patches). Heads are paired by the
energy of their features' cross-correlation (q, k and head output), the one statistic that does
not depend on how either head orders its dimensions. LayerNorm normalises over the *merged*
features, so a zip that merges unequal features is an approximation there as everywhere else;
a permuted copy still zips back to the model exactly (tested). ``stop`` < all blocks gives
ZipIt!'s partial zip: a shared trunk (embeddings and the first ``stop`` blocks), then per model
its unmerge into its own residual basis, its own later blocks, final LayerNorm and head.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from merganser.errors import MerganserError
from merganser.zipping.align import (
    Alignment,
    Shape,
    attention_points,
    unit_unmerge,
    within_heads,
)
from merganser.zipping.features import Moments
from merganser.zipping.matching import (
    Axis,
    correlation,
    permute_match,
    solve_lap,
    weight_matching,
    zipit_match,
)

Matcher = Literal["zipit", "permute", "weight", "average"]

_BLOCK = {  # tensor inside block l -> (output point, input point)
    "layernorm_before.weight": ("res", None),
    "layernorm_before.bias": ("res", None),
    "attention.q_proj.weight": ("q.{l}", "res"),
    "attention.q_proj.bias": ("q.{l}", None),
    "attention.k_proj.weight": ("k.{l}", "res"),
    "attention.k_proj.bias": ("k.{l}", None),
    "attention.v_proj.weight": ("v.{l}", "res"),
    "attention.v_proj.bias": ("v.{l}", None),
    "attention.o_proj.weight": ("res", "o.{l}"),
    "attention.o_proj.bias": ("res", None),
    "layernorm_after.weight": ("res", None),
    "layernorm_after.bias": ("res", None),
    "mlp.fc1.weight": ("mlp.{l}", "res"),
    "mlp.fc1.bias": ("mlp.{l}", None),
    "mlp.fc2.weight": ("res", "mlp.{l}"),
    "mlp.fc2.bias": ("res", None),
}
_TOP = {
    "embeddings.cls_token": ("res", None),  # [1, 1, d]: the point is the last axis
    "embeddings.position_embeddings": ("res", None),  # [1, T, d]
    "embeddings.patch_embeddings.projection.weight": ("res", None),  # [d, C, p, p]
    "embeddings.patch_embeddings.projection.bias": ("res", None),
    "layernorm.weight": ("res", None),
    "layernorm.bias": ("res", None),
}
_LAST_AXIS = ("embeddings.cls_token", "embeddings.position_embeddings")


def vit_roles(name: str) -> tuple[str | None, str | None]:
    """(output point, input point) of a ViTModel tensor; any other tensor is an error."""
    if name in _TOP:
        return _TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _BLOCK:
        out, inp = _BLOCK[parts[2]]
        return (out and out.format(l=parts[1]), inp and inp.format(l=parts[1]))
    raise MerganserError(
        f"{name}: not a ViTModel tensor the ViT zipper knows how to move (a pooler or a "
        "mask token is not zipped; load the model without it)"
    )


class ZippedViT(nn.Module):
    """A zipped trunk and one branch per model; ``forward(pixel_values, task)`` gives logits.

    A full zip (every block shared): ``trunk`` is a complete ``ViTModel`` and each branch is
    that model's head reading the merged CLS feature. A partial zip: ``trunk`` holds the
    embeddings and the first ``stop`` blocks, and each branch is the model's unmerge, later
    blocks, final LayerNorm and head.
    """

    def __init__(self, trunk: nn.Module, branches: Sequence[nn.Module], full: bool) -> None:
        super().__init__()
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        self.full = full

    def trunk_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The trunk's output for every token: the final feature (a full zip) or the residual
        state after the shared blocks (a partial one, whose trunk has no final LayerNorm)."""
        return self.trunk(pixel_values=pixel_values).last_hidden_state

    def forward(self, pixel_values: torch.Tensor, task: int = 0) -> torch.Tensor:
        h = self.trunk_states(pixel_values)
        return self.branches[task](h[:, 0] if self.full else h)


class _Branch(nn.Module):
    """Model m's rest of a partial zip: unmerge, its later blocks, final LayerNorm, head."""

    def __init__(self, unmerge: nn.Linear, layers: nn.ModuleList, norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.unmerge, self.layers, self.norm, self.head = unmerge, layers, norm, head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.unmerge(h)
        for layer in self.layers:
            h = _out(layer(h))
        return self.head(self.norm(h)[:, 0])


def zip_vit(
    backbones: Sequence[nn.Module],
    heads: Sequence[nn.Linear],
    batches: Iterable[torch.Tensor],
    matcher: Matcher = "zipit",
    stop: int | None = None,
    alpha: float = 0.3,
    beta: float = 0.5,
    seed: int = 0,
    refit: float | None = None,
) -> ZippedViT:
    """Zip ViTs from different initialisations (Stoica et al., ICLR 2024, arXiv 2305.03053;
    Ainsworth et al., ICLR 2023, arXiv 2209.04836; refit: Nasery et al., CVPR 2025).

    ``backbones``: ``ViTModel``s of one shape (without pooler); ``heads``: one linear head per
    model, reading its final CLS feature. ``batches``: ``pixel_values`` every model reads.
    ``matcher``, ``stop``, ``alpha``, ``beta`` and ``refit``: as in
    :func:`.sequential.zip_sequential`.
    """
    if matcher not in ("zipit", "permute", "weight", "average"):
        raise MerganserError(f"zip: unknown matcher {matcher!r} (zipit, permute, weight, average)")
    if len(backbones) < 2 or len(heads) != len(backbones):
        raise MerganserError("zip: give two or more ViTs and one head per ViT")
    shape = _shape(backbones)
    stop = shape.layers if stop is None else stop
    if not 1 <= stop <= shape.layers:
        raise MerganserError(f"zip: stop must be 1..{shape.layers} (blocks), got {stop}")
    for i, head in enumerate(heads):
        if not isinstance(head, nn.Linear) or head.in_features != shape.hidden:
            raise MerganserError(
                f"zip: head {i} must be an nn.Linear reading {shape.hidden} features"
            )
    nets = [b.eval() for b in backbones]
    states = [{k: v.detach() for k, v in b.state_dict().items()} for b in nets]
    for k in states[0]:
        vit_roles(k)  # an unknown tensor is one line, before any work
    for i, s in enumerate(states[1:], 1):
        for k, t in s.items():
            if k not in states[0] or states[0][k].shape != t.shape:
                raise MerganserError(f"zip: model {i}'s {k} differs from model 0's")
    data = list(batches)
    if not data and (matcher in ("zipit", "permute") or refit is not None):
        raise MerganserError("zip: no images to match or refit on")
    n = len(nets)
    if matcher == "average":
        alignment = _identity(shape, n)
    elif matcher == "weight":
        alignment = _weight_alignment(states, shape, seed)
    else:
        alignment = _activation_alignment(nets, data, shape, stop, matcher, alpha, beta)
    full = stop == shape.layers
    trunk_names = [k for k in states[0] if _in_trunk(k, stop, full)]
    trunk = copy.deepcopy(nets[0])
    merged = {k: alignment.merge_tensor(k, [s[k] for s in states]) for k in trunk_names}
    trunk.load_state_dict({**trunk.state_dict(), **merged})
    if not full:  # the shared blocks only; each branch has its model's final LayerNorm
        trunk.layers = trunk.layers[:stop]
        trunk.layernorm = nn.Identity()
        trunk.config.num_hidden_layers = stop
    branches: list[nn.Module] = []
    for m in range(n):
        u = alignment.u("res", m).float()
        if full:  # in the head's dtype, as the unmerge is in the backbone's
            own = heads[m]
            head = nn.Linear(
                u.shape[1], own.out_features, bias=own.bias is not None, dtype=own.weight.dtype
            )
            with torch.no_grad():
                head.weight.copy_(own.weight.detach().double() @ u.double())
                if own.bias is not None:
                    head.bias.copy_(own.bias)
            branches.append(head)
        else:
            dtype = next(nets[m].parameters()).dtype
            unmerge = nn.Linear(u.shape[1], u.shape[0], bias=False, dtype=dtype)
            with torch.no_grad():
                unmerge.weight.copy_(u)
            rest = nn.ModuleList(copy.deepcopy(list(nets[m].layers[stop:])))
            branches.append(
                _Branch(unmerge, rest, copy.deepcopy(nets[m].layernorm), copy.deepcopy(heads[m]))
            )
    out = ZippedViT(trunk, branches, full).eval()
    if refit is not None:
        _refit(out, nets, heads, alignment, data, stop, refit)
    return out


@torch.no_grad()
def align_vit(
    reference: nn.Module,
    other: nn.Module,
    batches: Iterable[torch.Tensor] = (),
    matcher: Literal["weight", "permute"] = "weight",
    seed: int = 0,
) -> nn.Module:
    """``other`` permuted into ``reference``'s basis (Git Re-Basin, Ainsworth et al., ICLR
    2023): the same function, ready for any merge with ``reference``. A head reading its final
    CLS feature reads the result's through ``head.weight[:, perm]`` where ``perm`` is the
    returned model's ``residual_perm``."""
    if matcher not in ("weight", "permute"):
        raise MerganserError(f"align: expected matcher weight or permute, got {matcher!r}")
    shape = _shape([reference, other])
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in (reference, other)]
    for k in states[0]:
        vit_roles(k)
    if matcher == "weight":
        alignment = _weight_alignment(states, shape, seed)
    else:
        data = list(batches)
        if not data:
            raise MerganserError("align: activation matching needs images")
        nets = [reference.eval(), other.eval()]
        alignment = _activation_alignment(nets, data, shape, shape.layers, "permute", 0, 0)
    out = copy.deepcopy(other)
    out.load_state_dict({name: alignment.align_tensor(name, t, 1) for name, t in states[1].items()})
    out.residual_perm = alignment.u("res", 1).argmax(0)  # other's feature behind each of ours
    return out.eval()


def _alignment(points: dict[str, torch.Tensor], n: int) -> Alignment:
    """An Alignment that reads ViT tensors by their roles and layouts."""
    return Alignment(points, n, vit_roles, _point_rows, _from_point_rows)


def _point_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """The tensor as a matrix whose rows are its output point's features."""
    if name in _LAST_AXIS:
        return t.reshape(-1, t.shape[-1]).T
    return t if t.ndim <= 2 else t.reshape(t.shape[0], -1)


def _from_point_rows(name: str, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A matrix of ``_point_rows``'s layout back in the tensor's shape."""
    return w.T.reshape(shape) if name in _LAST_AXIS else w.reshape(shape)


def _in_trunk(name: str, stop: int, full: bool) -> bool:
    if name.startswith("embeddings."):
        return True
    if name.startswith("layers."):
        return int(name.split(".")[1]) < stop
    return full  # the final LayerNorm


def _shape(backbones: Sequence[nn.Module]) -> Shape:
    if any(hasattr(b, "vit") for b in backbones):
        raise MerganserError(
            "zip: give the backbones and heads apart (model.vit and model.classifier of a "
            "ViTForImageClassification)"
        )
    configs = [getattr(b, "config", None) for b in backbones]
    if any(c is None or getattr(c, "model_type", None) != "vit" for c in configs):
        raise MerganserError("zip: zip_vit takes transformers ViTModels (config.model_type 'vit')")
    if any(getattr(b, "pooler", None) is not None for b in backbones):
        raise MerganserError("zip: a ViTModel with a pooler; load it with add_pooling_layer=False")
    shapes = [Shape.of(c) for c in configs]
    for i, s in enumerate(shapes[1:], 1):
        if s != shapes[0]:
            raise MerganserError(f"zip: model {i}'s shape {s} differs from model 0's {shapes[0]}")
    return shapes[0]


def _out(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _states(net: nn.Module, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
    """Residual states 0..``upto`` (embeddings, then after each block)."""
    h = net.embeddings(pixel_values.to(net.embeddings.patch_embeddings.projection.weight.dtype))
    out = [h]
    for layer in net.layers[:upto]:
        h = _out(layer(h))
        out.append(h)
    return out


def _identity(shape: Shape, n: int) -> Alignment:
    """No matching: feature j of every model is merged feature j (plain averaging)."""
    same = [torch.arange(shape.hidden)] * (n - 1)
    points = {"res": unit_unmerge(same, 1)}
    for layer in range(shape.layers):
        points[f"mlp.{layer}"] = unit_unmerge([torch.arange(shape.intermediate)] * (n - 1), 1)
        points.update(attention_points(shape, layer, [torch.arange(shape.heads)] * (n - 1), None))
    return _alignment(points, n)


def _perm_spec(names: Sequence[str], hd: int) -> dict[str, list[Axis]]:
    """Git Re-Basin permutations of a ViT: residual stream, GELU units, heads as units."""
    spec: dict[str, list[Axis]] = {}
    for name in names:
        out, inp = vit_roles(name)
        for point, axis in ((out, 0), (inp, 1)):
            if point is None:
                continue
            if name in _LAST_AXIS:
                axis = 2
            kind, _, layer = point.partition(".")
            key = f"heads.{layer}" if kind in ("q", "k", "v", "o") else point
            spec.setdefault(key, []).append(Axis(name, axis, hd if key.startswith("heads") else 1))
    return spec


def _weight_alignment(
    states: Sequence[dict[str, torch.Tensor]], shape: Shape, seed: int
) -> Alignment:
    """Git Re-Basin weight matching of every model to model 0: the residual stream, GELU units
    and heads (as units) by coordinate descent, then the dimensions inside each matched pair
    of heads by one assignment each (q and k dims together, v dims with o_proj's columns)."""
    spec = _perm_spec(list(states[0]), shape.head_dim)
    a = {k: t.double() for k, t in states[0].items()}
    found = []
    for s in states[1:]:
        b = {k: t.double() for k, t in s.items()}
        found.append((weight_matching(spec, a, b, seed=seed), b))
    points = {"res": unit_unmerge([f["res"] for f, _ in found], 1)}
    for layer in range(shape.layers):
        points[f"mlp.{layer}"] = unit_unmerge([f[f"mlp.{layer}"] for f, _ in found], 1)
        qk, vo = [], []
        for f, b in found:
            heads = f[f"heads.{layer}"]
            q, v = _head_dims(a, b, f["res"], heads, layer, shape.head_dim)
            qk.append(q)
            vo.append(v)
        qk_u, vo_u = unit_unmerge(qk, 1), unit_unmerge(vo, 1)
        points.update({f"q.{layer}": qk_u, f"k.{layer}": qk_u, f"v.{layer}": vo_u,
                       f"o.{layer}": vo_u})  # fmt: skip
    return _alignment(points, len(states))


def _head_dims(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], res: torch.Tensor,
    heads: torch.Tensor, layer: int, hd: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per feature of model 0, model b's q/k and v/o feature matched to it (a permutation of
    all heads' dims: head ``heads[h]`` of b stands for head h of model 0)."""
    p = f"layers.{layer}.attention."

    def rows(state: dict[str, torch.Tensor], name: str, cols: torch.Tensor | None) -> torch.Tensor:
        w = state[f"{p}{name}.weight"]
        w = w if cols is None else w[:, cols]
        return torch.cat([w, state[f"{p}{name}.bias"][:, None]], 1)

    q = (
        [rows(a, n, None) for n in ("q_proj", "k_proj")],
        [rows(b, n, res) for n in ("q_proj", "k_proj")],
    )
    v = [rows(a, "v_proj", None), a[f"{p}o_proj.weight"].T], [
        rows(b, "v_proj", res), b[f"{p}o_proj.weight"][res].T]  # fmt: skip
    out = []
    for wa, wb in (q, v):
        perm = torch.empty(heads.numel() * hd, dtype=torch.long)
        for h, hb in enumerate(heads.tolist()):
            ia, ib = slice(h * hd, (h + 1) * hd), slice(hb * hd, (hb + 1) * hd)
            score = sum(x[ia] @ y[ib].T for x, y in zip(wa, wb, strict=True))
            perm[ia] = hb * hd + solve_lap(score)
        out.append(perm)
    return out[0], out[1]


@torch.no_grad()
def _activation_alignment(
    nets: Sequence[nn.Module], data: Sequence[torch.Tensor], shape: Shape, stop: int,
    matcher: str, alpha: float, beta: float,
) -> Alignment:  # fmt: skip
    """Every point's unmerge from the models' stacked features on the same images."""
    n = len(nets)

    def match(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return zipit_match(c, n, alpha, beta) if matcher == "zipit" else permute_match(c, n)

    res = Moments()
    mom: dict[tuple[str, int], Moments] = {}
    taps = {"q": "attention.q_proj", "k": "attention.k_proj", "o": "attention.o_proj",
            "mlp": "mlp.fc2"}  # fmt: skip
    stores: list[dict[tuple[str, int], torch.Tensor]] = [{} for _ in nets]
    handles = []
    for net, store in zip(nets, stores, strict=True):
        for layer in range(stop):
            for kind, path in taps.items():
                mod = net.layers[layer].get_submodule(path)
                key = (kind, layer)
                if kind in ("q", "k"):  # their outputs
                    handles.append(mod.register_forward_hook(
                        lambda _m, _a, o, key=key, st=store: st.__setitem__(key, o)))  # fmt: skip
                else:  # the inputs of o_proj (heads' outputs) and of fc2 (GELU units)
                    handles.append(mod.register_forward_pre_hook(
                        lambda _m, a, key=key, st=store: st.__setitem__(key, a[0])))  # fmt: skip
    try:
        for x in data:
            rows = [[h.reshape(-1, h.shape[-1]) for h in _states(net, x, stop)] for net in nets]
            for s in range(stop + 1):  # residual states 0..stop, pooled as the Llama zipper does
                res.add(torch.cat([r[s] for r in rows], -1))
            for key in stores[0]:
                feats = [st[key].reshape(-1, st[key].shape[-1]) for st in stores]
                mom.setdefault(key, Moments()).add(torch.cat(feats, -1))
    finally:
        for handle in handles:
            handle.remove()
    points = {"res": match(correlation(res.covariance()))[1]}
    h, hd = shape.heads, shape.head_dim
    d = h * hd
    for layer in range(shape.layers):
        if layer >= stop:  # not merged: any unmerge does (identity keeps the shapes)
            points[f"mlp.{layer}"] = unit_unmerge([torch.arange(shape.intermediate)] * (n - 1), 1)
            points.update(attention_points(shape, layer, [torch.arange(h)] * (n - 1), None))
            continue
        points[f"mlp.{layer}"] = match(correlation(mom["mlp", layer].covariance()))[1]
        cq, ck, co = (correlation(mom[k, layer].covariance()) for k in ("q", "k", "o"))
        head_perms = []
        for m in range(1, n):
            # energy of each head pair's cross-correlation: blind to each head's dim order
            cross = sum(
                c[:d, m * d : (m + 1) * d].square().reshape(h, hd, h, hd).sum((1, 3))
                for c in (cq, ck, co)
            )
            head_perms.append(solve_lap(cross))
        qk = within_heads((cq + ck) / 2, shape, head_perms, match)
        vo = within_heads(co, shape, head_perms, match)
        points.update({f"q.{layer}": qk, f"k.{layer}": qk, f"v.{layer}": vo, f"o.{layer}": vo})
    return _alignment(points, n)


@torch.no_grad()
def _refit(
    out: ZippedViT, nets: Sequence[nn.Module], heads: Sequence[nn.Linear], alignment: Alignment,
    data: Sequence[torch.Tensor], stop: int, ridge: float,
) -> None:  # fmt: skip
    """PLeaS's least squares in forward order (:mod:`.refit`): every zipped linear for its
    merged target from the merged trunk's own input; then each model's way out of the trunk
    (its head on a full zip, its unmerge on a partial one) for that model's own output."""
    from merganser.zipping.refit import fit_linear, refit_group

    def forward(net: nn.Module, x: torch.Tensor) -> None:
        _states(net, x, stop)

    for layer in range(stop):
        for group in (("q_proj", "k_proj", "v_proj"), ("o_proj",)):
            names = [f"layers.{layer}.attention.{g}" for g in group]
            points = [f"{g[0]}.{layer}" if g != "o_proj" else "res" for g in group]
            refit_group(nets, out.trunk, alignment, names, points, data, ridge, forward)
        for name, point in (("fc1", f"mlp.{layer}"), ("fc2", "res")):
            names = [f"layers.{layer}.mlp.{name}"]
            refit_group(nets, out.trunk, alignment, names, [point], data, ridge, forward)
    z = torch.cat([out.trunk_states(x) for x in data]).double()
    z = z[:, 0] if out.full else z.reshape(-1, z.shape[-1])
    for m, (net, branch) in enumerate(zip(nets, out.branches, strict=True)):
        if out.full:  # the head, for the model's own logits
            target = torch.cat(
                [heads[m](net(pixel_values=x).last_hidden_state[:, 0]) for x in data]
            )
            fit_linear(branch, z, target.double(), ridge)
        else:  # the unmerge, for the model's own residual state after the trunk
            target = torch.cat([_states(net, x, stop)[-1] for x in data]).double()
            fit_linear(branch.unmerge, z, target.reshape(-1, target.shape[-1]), ridge)
