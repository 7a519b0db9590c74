"""Activation statistics of Llama-style models on shared inputs, for alignment and ZipIt.

Every model runs on the same token batches; forward hooks capture, on non-padding tokens only,
the features at each merge point, and the models' features are stacked (model 0's first) into
running moments, so correlations *across* and *within* models come out of one covariance
(spec §8). Memory is one batch of activations plus the (n·d)² moments per merge point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import LoadedModel, pad_batches


@dataclass
class Moments:
    """Running sums of x and xxᵀ (float64) of row vectors, for a covariance."""

    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.total is None or self.outer is None:
            self.total, self.outer = x.sum(0), x.T @ x
        else:
            self.total += x.sum(0)
            self.outer.addmm_(x.T, x)
        self.count += x.shape[0]

    def __iadd__(self, other: Moments) -> Moments:
        if other.total is not None and other.outer is not None:
            if self.total is None or self.outer is None:
                self.total, self.outer = other.total.clone(), other.outer.clone()
            else:
                self.total += other.total
                self.outer += other.outer
            self.count += other.count
        return self

    def covariance(self) -> torch.Tensor:
        """E[xxᵀ] − E[x]E[x]ᵀ (ZipIt's CovarianceMetric)."""
        if self.total is None or self.outer is None or self.count == 0:
            raise MerganserError("no features were recorded (empty calibration data?)")
        mean = self.total / self.count
        return self.outer / self.count - torch.outer(mean, mean)


@dataclass
class Features:
    """Stacked moments per merge point and attention-pattern similarity per layer."""

    residual: list[Moments]  # state s = embeddings (0) and after each block (1..L)
    mlp: list[Moments]  # per block: the input of down_proj
    attn: list[Moments]  # per block: the input of o_proj (the heads' outputs)
    # per block, per model m ≥ 1: cosine of model 0's vs model m's KV-head attention patterns
    heads: list[list[torch.Tensor]] = field(default_factory=list)
    tokens: int = 0


def _set_attention(net: Any, impl: str) -> None:
    if hasattr(net, "set_attn_implementation"):
        net.set_attn_implementation(impl)
    else:  # transformers before set_attn_implementation existed
        net.config._attn_implementation = impl


def _capture(net: Any) -> tuple[dict[Any, Any], list[Any]]:
    """Hooks that store this forward pass's features in the returned dict."""
    store: dict[Any, Any] = {}
    inner = net.model
    handles = [
        inner.embed_tokens.register_forward_hook(lambda m, a, out: store.__setitem__(0, out))
    ]
    for i, layer in enumerate(inner.layers):

        def keep(key: Any) -> Any:
            return lambda m, a, out: store.__setitem__(
                key, out[0] if isinstance(out, tuple) else out
            )

        def keep_in(key: Any) -> Any:
            return lambda m, args: store.__setitem__(key, args[0])

        handles += [
            layer.register_forward_hook(keep(i + 1)),
            layer.mlp.down_proj.register_forward_pre_hook(keep_in(("mlp", i))),
            layer.self_attn.o_proj.register_forward_pre_hook(keep_in(("attn", i))),
            layer.self_attn.register_forward_hook(
                lambda m, a, out, i=i: store.__setitem__(("pattern", i), out[1])
            ),
        ]
    return store, handles


def collect_features(
    models: Sequence[LoadedModel], texts: Sequence[str], batch: int = 16
) -> Features:
    """Run every model on ``texts`` and accumulate the stacked features at each merge point."""
    if len(models) < 2:
        raise MerganserError("alignment needs at least two models")
    cfg = models[0].model.config
    layers = cfg.num_hidden_layers
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    group = cfg.num_attention_heads // kv
    feats = Features(
        residual=[Moments() for _ in range(layers + 1)],
        mlp=[Moments() for _ in range(layers)],
        attn=[Moments() for _ in range(layers)],
        heads=[
            [torch.zeros(kv, kv, dtype=torch.float64) for _ in models[1:]] for _ in range(layers)
        ],
    )
    norms = [[torch.zeros(kv, dtype=torch.float64) for _ in models] for _ in range(layers)]
    lm = models[0]
    seqs = [[*lm.bos, *lm.encode(t), lm.eos] for t in texts]
    if not seqs:
        raise MerganserError("alignment: no calibration texts")
    hooks = []
    old_impl = []
    for m in models:
        m.model.eval()
        old_impl.append(m.model.config._attn_implementation)
        _set_attention(m.model, "eager")  # the only implementation that returns patterns
        hooks.append(_capture(m.model))
    try:
        for ids, mask in pad_batches(seqs, lm.tokenizer.pad_token_id or 0, batch):
            keep = mask.bool()
            feats.tokens += int(keep.sum())
            for (store, _), m in zip(hooks, models, strict=True):
                store.clear()
                with torch.no_grad():
                    m.model(input_ids=ids, attention_mask=mask, use_cache=False)
            stores = [s for s, _ in hooks]
            for s in range(layers + 1):
                feats.residual[s].add(torch.cat([st[s][keep] for st in stores], -1))
            for i in range(layers):
                feats.mlp[i].add(torch.cat([st[("mlp", i)][keep] for st in stores], -1))
                feats.attn[i].add(torch.cat([st[("attn", i)][keep] for st in stores], -1))
                # [B, H, T, T] -> per KV head, the query rows that are real tokens
                pats = []
                for st in stores:
                    p = st[("pattern", i)].double()
                    b, _, t, _ = p.shape
                    p = p.reshape(b, kv, group, t, t).permute(0, 3, 1, 2, 4)[keep]
                    pats.append(p.reshape(p.shape[0], kv, -1))  # rows × kv × (group·T)
                for mi, p in enumerate(pats):
                    norms[i][mi] += p.square().sum((0, 2))
                for mi, p in enumerate(pats[1:]):
                    feats.heads[i][mi] += torch.einsum("rau,rbu->ab", pats[0], p)
    finally:
        for (_, handles), m, impl in zip(hooks, models, old_impl, strict=True):
            for h in handles:
                h.remove()
            _set_attention(m.model, impl)
    for i in range(layers):
        for mi in range(1, len(models)):
            denom = torch.outer(norms[i][0], norms[i][mi]).sqrt().clamp_min(1e-12)
            feats.heads[i][mi - 1] /= denom
    return feats
