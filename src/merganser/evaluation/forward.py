"""Forward passes over any network: which layers data-aware merging reads, how a batch is fed,
where the logits are, and the two statistics RegMean and Fisher merging need.

A *batch* is what the network takes: a mapping of keyword tensors (``net(**batch)``, as a
Hugging Face model takes ``input_ids``/``pixel_values``), a tuple (``net(*batch)``) or one
tensor (``net(batch)``). Every tensor in it has the examples along its first axis.

The layers are every ``nn.Linear`` (weight ``[out, in]``) and every transformers ``Conv1D``
(GPT-2's, weight ``[in, out]``): both compute ``x @ W`` on the last axis of their input, so
one input Gram ``XᵀX`` (in × in) serves either; the Conv1D names are listed so that RegMean
solves in the right layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from merganser.errors import MerganserError

Batch = Mapping[str, torch.Tensor] | Sequence[torch.Tensor] | torch.Tensor
# ``(net, batch) -> scalar``: a log-likelihood (or loss) whose per-example squared gradient is
# the Fisher; replaces the built-in "sample a label from the logits" objective.
LogLikelihood = Callable[[nn.Module, Batch], torch.Tensor]
Logits = Callable[[Any], torch.Tensor]

# Padding masks a batch may carry, tried in this order against a layer input's leading axes.
_MASKS = ("attention_mask", "decoder_attention_mask")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored ``[in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_layers(net: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """Every linear layer by weight name: ``(module, in_out)``, ``in_out`` for Conv1D."""
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name, mod in net.named_modules():
        if isinstance(mod, nn.Linear) or is_conv1d(mod):
            out[f"{name}.weight" if name else "weight"] = (mod, is_conv1d(mod))
    return out


def arguments(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as call arguments: keywords for a mapping, positions for a tuple, else one."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def call(net: nn.Module, batch: Batch) -> Any:
    """Run ``net`` on one batch."""
    args, kwargs = arguments(batch)
    return net(*args, **kwargs)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: a tensor, ``.logits``, ``["logits"]`` or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise MerganserError(
            f"the model's output ({type(output).__name__}) has no logits; give a function "
            "from output to logits, or a log-likelihood"
        )
    return logits


def batch_size(batch: Batch) -> int:
    """Examples in a batch (the first axis of its first tensor)."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
    if isinstance(first, (tuple, list)):
        first = first[0]
    return int(first.shape[0])


def map_batch(batch: Batch, fn: Callable[[Any], Any]) -> Batch:
    """``fn`` applied to every item of a batch, keeping its form (mapping, tuple, tensor)."""
    if isinstance(batch, Mapping):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(t) for t in batch)
    return fn(batch)


def rows(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of a batch (tensors without the examples axis stay whole)."""
    n = batch_size(batch)

    def cut(t: Any) -> Any:
        ok = isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n
        return t[start:stop] if ok else t

    return map_batch(batch, cut)


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    """A batch with its tensors on ``device``."""
    return map_batch(batch, lambda t: t.to(device) if isinstance(t, torch.Tensor) else t)


def row_mask(batch: Batch, lead: tuple[int, ...]) -> torch.Tensor | None:
    """The batch's padding mask whose shape is a layer input's leading axes (None: keep all)."""
    if not isinstance(batch, Mapping) or len(lead) != 2:
        return None
    for key in _MASKS:
        m = batch.get(key)
        if isinstance(m, torch.Tensor) and tuple(m.shape) == lead:
            return m.bool()
    return None


class GramRecorder:
    """Forward pre-hooks that add each linear layer's input Gram XᵀX (float64) and row count.

    RegMean (Jin et al., ICLR 2023, arXiv 2212.09849): the statistic is the inner product of a
    layer's inputs; rows that are padding (``attention_mask`` 0) are left out unless
    ``mask_padding`` is False.
    """

    def __init__(self, net: nn.Module, mask_padding: bool = True) -> None:
        self.layers = linear_layers(net)
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.mask_padding = mask_padding
        self.batch: Batch | None = None
        self._handles = [
            mod.register_forward_pre_hook(self._hook(name))
            for name, (mod, _) in self.layers.items()
        ]

    def _hook(self, name: str) -> Callable[..., None]:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.batch is None:
                return
            x = args[0].detach()
            mask = row_mask(self.batch, tuple(x.shape[:-1])) if self.mask_padding else None
            x = (x[mask] if mask is not None else x.reshape(-1, x.shape[-1])).double()
            g = self.grams.get(name)
            self.grams[name] = x.T @ x if g is None else g.addmm_(x.T, x)
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return fn

    @torch.no_grad()
    def run(self, net: nn.Module, batch: Batch) -> None:
        """One forward pass whose layer inputs are recorded."""
        self.batch = batch
        try:
            call(net, batch)
        finally:
            self.batch = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()

    def means(self) -> dict[str, torch.Tensor]:
        """Each layer's Gram divided by its row count (float64)."""
        return {n: g / max(1, self.rows[n]) for n, g in self.grams.items()}

    def in_out(self) -> list[str]:
        """The recorded layers whose weight is ``[in, out]`` (Conv1D)."""
        return sorted(n for n in self.grams if self.layers[n][1])


def sampled_log_likelihood(
    logits_fn: Logits, gen: torch.Generator, labels: str = "sampled"
) -> LogLikelihood:
    """Σ log p(y) over a one-example batch's predictions: ``y`` drawn from the model (the true
    Fisher, Matena & Raffel, NeurIPS 2022, arXiv 2111.09832) or, with ``labels="empirical"``,
    the batch's own ``labels``. Every position of the logits (all axes but the last) is one
    prediction; positions the batch masks as padding are left out.
    """

    def ll(net: nn.Module, batch: Batch) -> torch.Tensor:
        logits = logits_fn(call(net, batch)).float()
        logp = torch.log_softmax(logits, dim=-1)
        mask = row_mask(batch, tuple(logp.shape[:-1]))
        flat = logp[mask] if mask is not None else logp.reshape(-1, logp.shape[-1])
        if labels == "sampled":
            with torch.no_grad():
                # Drawn on the CPU generator so a seed gives the same labels on any device.
                y = torch.multinomial(flat.exp().cpu(), 1, generator=gen).squeeze(1)
        else:
            target = batch.get("labels") if isinstance(batch, Mapping) else None
            if not isinstance(target, torch.Tensor):
                raise MerganserError("fisher labels empirical: each batch needs a 'labels' tensor")
            y = target[mask] if mask is not None and target.shape == mask.shape else target
            y = y.reshape(-1)
            if y.numel() != flat.shape[0]:
                raise MerganserError(
                    f"fisher labels empirical: {y.numel()} labels for {flat.shape[0]} predictions"
                )
        return flat.gather(1, y.to(flat.device)[:, None].long()).sum()

    return ll


def diagonal_fisher(
    net: nn.Module,
    batches: Iterable[Batch],
    log_likelihood: LogLikelihood,
    on_example: Callable[[], None] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over examples of each trainable parameter's squared gradient (float64) and the count.

    One backward pass per example, as the diagonal Fisher is a mean of per-example squares.
    """
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    try:
        for batch in batches:
            for i in range(batch_size(batch)):
                net.zero_grad(set_to_none=True)
                log_likelihood(net, rows(batch, i, i + 1)).backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name].add_(p.grad.double().square())
                count += 1
                if on_example is not None:
                    on_example()
    finally:
        net.zero_grad(set_to_none=True)
    return fisher, count


def on_disk(net: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter-shaped tensors (a Fisher) under the names a checkpoint of ``net`` stores.

    transformers 5 renames (and fuses) some weights when it loads them (ViT's ``encoder.layer.0.
    attention.attention.query`` becomes ``layers.0.attention.q_proj``); its own reversal, the one
    ``save_pretrained`` applies, maps statistics back so that they match the files merged.
    """
    revert = _reverter(net)
    return state if revert is None else revert(net, state)


def gram_names_on_disk(net: nn.Module, grams: dict[str, torch.Tensor]) -> dict[str, str]:
    """For each recorded layer's weight name, its name in a checkpoint of ``net``.

    A weight transformers stores as several tensors (split along the output axis) would need
    the same Gram under each name; one that maps anywhere else is refused by name rather than
    given a Gram that does not fit it.
    """
    revert = _reverter(net)
    if revert is None:
        return {n: n for n in grams}
    params = dict(net.named_parameters(remove_duplicate=False))  # tied heads too
    out = {}
    for name in grams:
        w = params[name].detach()
        try:
            stored = revert(net, {name: w})
        except Exception:
            stored = {}
        if len(stored) != 1 or tuple(next(iter(stored.values())).shape) != tuple(w.shape):
            raise MerganserError(
                f"{name}: transformers stores this weight in another layout "
                f"({', '.join(stored) or 'unknown'}); its Gram cannot be named for the checkpoint"
            )
        out[name] = next(iter(stored))
    return out


def _reverter(net: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    if not hasattr(net, "config") or not hasattr(net, "save_pretrained"):
        return None  # a plain module: its names are its state dict's
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return None
    return revert_weight_conversion
