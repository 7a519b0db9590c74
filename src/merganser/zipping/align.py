"""Aligning and zipping Llama-style models trained from different initialisations (spec §8).

A *merge point* is a feature space that several tensors read or write:

* ``res`` — the residual stream. Every block writes into it through a sum, so embeddings, every
  RMSNorm, o_proj and down_proj outputs and every reader's input axis share one transform.
* ``mlp.l`` — block l's MLP hidden units (gate/up rows, down_proj columns).
* ``q.l``, ``k.l``, ``v.l``, ``o.l`` — block l's attention. Heads move as units (KV heads with
  their query group), so q and k of a head stay together; q/k dimensions never move inside a
  head, because RoPE rotates fixed dimension pairs. v rows and the matching o_proj columns may
  additionally be matched *inside* each pair of matched heads (only when there is no GQA).

Each point gets an *unmerge* U (n·d × d, per spec §8.2): row block i says which merged
feature stands for each of model i's features; the merge is M = (U / column sums)ᵀ. A weight
whose output is point p and input point q merges as Σᵢ Mₚ,ᵢ Wᵢ U_q,ᵢ; a permutation is the
special case where each Uᵢ is a permutation matrix, and then Uᵢᵀ Wᵢ U_q,ᵢ is model i
re-expressed in model 0's basis, computing exactly the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.model.naming import LLAMA_BLOCK
from merganser.zipping.features import Features
from merganser.zipping.matching import (
    Axis,
    PermSpec,
    correlation,
    permute_match,
    solve_lap,
    weight_matching,
    zipit_match,
)

MATCHERS = ("zipit", "permute", "weights", "identity")

_ROLES = {  # tensor (inside block l) -> (output point, input point); "{l}" is the block
    "input_layernorm.weight": ("res", None),
    "post_attention_layernorm.weight": ("res", None),
    "self_attn.q_proj.weight": ("q.{l}", "res"),
    "self_attn.q_proj.bias": ("q.{l}", None),
    "self_attn.k_proj.weight": ("k.{l}", "res"),
    "self_attn.k_proj.bias": ("k.{l}", None),
    "self_attn.v_proj.weight": ("v.{l}", "res"),
    "self_attn.v_proj.bias": ("v.{l}", None),
    "self_attn.o_proj.weight": ("res", "o.{l}"),
    "self_attn.o_proj.bias": ("res", None),
    "mlp.gate_proj.weight": ("mlp.{l}", "res"),
    "mlp.gate_proj.bias": ("mlp.{l}", None),
    "mlp.up_proj.weight": ("mlp.{l}", "res"),
    "mlp.up_proj.bias": ("mlp.{l}", None),
    "mlp.down_proj.weight": ("res", "mlp.{l}"),
    "mlp.down_proj.bias": ("res", None),
}
_TOP = {
    "model.embed_tokens.weight": ("res", None),  # rows are tokens: the point is axis 1
    "model.norm.weight": ("res", None),
    "lm_head.weight": (None, "res"),
}


def roles(name: str) -> tuple[str | None, str | None]:
    """(output point, input point) of a Llama tensor; an unknown tensor is an error."""
    if name in _TOP:
        return _TOP[name]
    m = LLAMA_BLOCK.fullmatch(name)
    if m and m.group(2) in _ROLES:
        out, inp = _ROLES[m.group(2)]
        fill = {"l": m.group(1)}
        return (out and out.format(**fill), inp and inp.format(**fill))
    raise MerganserError(f"{name}: not a Llama-style tensor this alignment knows how to move")


@dataclass(frozen=True)
class Shape:
    """The dimensions that decide the points' sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> Shape:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            heads,
            kv,
            head_dim,
        )

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def merge_matrix(unmerge: torch.Tensor) -> torch.Tensor:
    """M = (U / column sums)ᵀ: each merged feature is the average of its group."""
    return (unmerge / unmerge.sum(0, keepdim=True)).T


def unit_unmerge(perms: Sequence[torch.Tensor], unit: int) -> torch.Tensor:
    """Stacked unmerge of unit permutations (model 0 identity), each unit ``unit`` wide."""
    n = perms[0].numel()
    blocks = [torch.eye(n, dtype=torch.float64)] + [
        torch.eye(n, dtype=torch.float64)[p].T.contiguous() for p in perms
    ]
    return torch.cat([torch.kron(b, torch.eye(unit, dtype=torch.float64)) for b in blocks])


def attention_points(
    shape: Shape,
    block: int,
    head_perms: Sequence[torch.Tensor],
    vo: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """q/k/v/o unmerges of a block from KV-head permutations (+ within-head v/o unmerge)."""
    hd, g = shape.head_dim, shape.group
    points = {
        f"q.{block}": unit_unmerge(head_perms, g * hd),
        f"k.{block}": unit_unmerge(head_perms, hd),
        f"v.{block}": unit_unmerge(head_perms, hd),
        f"o.{block}": unit_unmerge(head_perms, g * hd),
    }
    if vo is not None:
        points[f"v.{block}"] = points[f"o.{block}"] = vo
    return points


def within_heads(
    corr: torch.Tensor, shape: Shape, head_perms: Sequence[torch.Tensor], match: Any
) -> torch.Tensor:
    """An unmerge inside heads (v/o; q/k too in a ViT): each merged head's dims matched among
    its partner heads' dims."""
    hd, h, n = shape.head_dim, shape.heads, len(head_perms) + 1
    d = h * hd
    perms = [torch.arange(h), *head_perms]
    u = torch.zeros(n * d, d, dtype=torch.float64)
    for a in range(h):
        idx = torch.cat([m * d + perms[m][a] * hd + torch.arange(hd) for m in range(n)])
        _, block = match(corr[idx][:, idx])
        u[idx, a * hd : (a + 1) * hd] = block
    return u


def activation_unmerges(
    feats: Features,
    shape: Shape,
    n_models: int,
    matcher: str = "zipit",
    alpha: float = 0.3,
    beta: float = 0.125,
    residual_states: int | None = None,
) -> Alignment:
    """Every point's unmerge from activations: ZipIt (``zipit``) or Git Re-Basin (``permute``).

    The residual stream's correlation pools the states 0..``residual_states`` (default: all),
    so a partial zip matches only what its shared blocks see. Heads are matched as units by
    the cosine of their attention patterns, then v/o dims inside each matched set of heads.
    """
    if matcher == "zipit":

        def match(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return zipit_match(c, n_models, alpha, beta)
    elif matcher == "permute":

        def match(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return permute_match(c, n_models)
    else:
        raise MerganserError(f"activation matching: expected zipit or permute, got {matcher!r}")
    states = feats.residual[: (shape.layers if residual_states is None else residual_states) + 1]
    pooled = states[0].covariance()
    for s in states[1:]:
        pooled = pooled + s.covariance()
    points = {"res": match(correlation(pooled))[1]}
    for layer in range(shape.layers):
        points[f"mlp.{layer}"] = match(correlation(feats.mlp[layer].covariance()))[1]
        head_perms = [solve_lap(sim) for sim in feats.heads[layer]]
        vo = None
        if shape.group == 1:
            vo = within_heads(correlation(feats.attn[layer].covariance()), shape, head_perms, match)
        points.update(attention_points(shape, layer, head_perms, vo))
    return Alignment(points, n_models)


def identity_unmerges(shape: Shape, n_models: int) -> Alignment:
    """No matching: feature i of every model is merged feature i (plain averaging; ZipIt's
    ``match_tensors_identity`` baseline)."""
    ident = torch.arange(shape.kv_heads)
    points = {"res": unit_unmerge([torch.arange(shape.hidden)] * (n_models - 1), 1)}
    for layer in range(shape.layers):
        points[f"mlp.{layer}"] = unit_unmerge(
            [torch.arange(shape.intermediate)] * (n_models - 1), 1
        )
        points.update(attention_points(shape, layer, [ident] * (n_models - 1), None))
    return Alignment(points, n_models)


def perm_spec(shape: Shape, names: Sequence[str]) -> PermSpec:
    """Git Re-Basin permutation spec of a Llama model: residual, MLP units, KV heads."""
    spec: dict[str, list[Axis]] = {"res": []}
    hd, g = shape.head_dim, shape.group
    for name in names:
        out, inp = roles(name)
        if name == "model.embed_tokens.weight":
            spec["res"].append(Axis(name, 1))
            continue
        for point, axis in ((out, 0), (inp, 1)):
            if point is None:
                continue
            kind, _, layer = point.partition(".")
            key = f"heads.{layer}" if kind in ("q", "k", "v", "o") else point
            unit = g * hd if kind in ("q", "o") else hd if kind in ("k", "v") else 1
            spec.setdefault(key, []).append(Axis(name, axis, unit))
    return spec


def weight_unmerges(
    states: Sequence[Mapping[str, torch.Tensor]], shape: Shape, max_iter: int = 100, seed: int = 0
) -> Alignment:
    """Every point's unmerge from Git Re-Basin weight matching of each model to model 0."""
    spec = perm_spec(shape, list(states[0]))
    found = [weight_matching(spec, states[0], s, max_iter, seed) for s in states[1:]]
    points = {"res": unit_unmerge([f["res"] for f in found], 1)}
    for layer in range(shape.layers):
        points[f"mlp.{layer}"] = unit_unmerge([f[f"mlp.{layer}"] for f in found], 1)
        points.update(attention_points(shape, layer, [f[f"heads.{layer}"] for f in found], None))
    return Alignment(points, len(states))


def _rows_out(name: str, w: torch.Tensor) -> torch.Tensor:
    """Embedding rows are tokens; transposed, its point is on axis 0 like every other tensor."""
    return w.T if name == "model.embed_tokens.weight" else w


def _unrows_out(name: str, w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return _rows_out(name, w)


@dataclass
class Alignment:
    """Every point's unmerge for n models, with the merges derived once. ``roles`` gives a
    tensor's (output point, input point); ``rows`` lays it out as a matrix whose rows are its
    output point's features, and ``unrows`` puts such a matrix back in the tensor's shape
    (Llama's by default: embedding rows are tokens)."""

    unmerge: dict[str, torch.Tensor]
    n: int
    roles: Callable[[str], tuple[str | None, str | None]] = roles
    rows: Callable[[str, torch.Tensor], torch.Tensor] = _rows_out
    unrows: Callable[[str, torch.Tensor, torch.Size], torch.Tensor] = _unrows_out

    def __post_init__(self) -> None:
        self.merge = {p: merge_matrix(u) for p, u in self.unmerge.items()}

    def u(self, point: str, i: int) -> torch.Tensor:
        """Model i's unmerge block (d × d): its features in terms of the merged ones."""
        d = self.unmerge[point].shape[1]
        return self.unmerge[point][i * d : (i + 1) * d]

    def m(self, point: str, i: int) -> torch.Tensor:
        """Model i's merge block (d × d): its share of each merged feature."""
        d = self.merge[point].shape[0]
        return self.merge[point][:, i * d : (i + 1) * d]

    def merge_tensor(self, name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σᵢ M_out,ᵢ Wᵢ U_in,ᵢ for one tensor (an average where a side has no point)."""
        out, inp = self.roles(name)
        shape = tensors[0].shape
        acc = torch.zeros(shape, dtype=torch.float64)
        for i, t in enumerate(tensors):
            w = self.rows(name, t.double())
            w = w @ self.u(inp, i) if inp else w
            w = self.m(out, i) @ w if out else w / self.n
            acc += self.unrows(name, w, shape)
        return acc.to(tensors[0].dtype).contiguous()

    def align_tensor(self, name: str, tensor: torch.Tensor, i: int) -> torch.Tensor:
        """Model i's tensor in model 0's basis, Uᵢᵀ W U_in,ᵢ (exact for permutations)."""
        out, inp = self.roles(name)
        w = self.rows(name, tensor.double())
        w = w @ self.u(inp, i) if inp else w
        w = self.u(out, i).T @ w if out else w
        return self.unrows(name, w, tensor.shape).to(tensor.dtype).contiguous()
