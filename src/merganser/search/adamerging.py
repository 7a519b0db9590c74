"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575, spec §13.5): merging coefficients
learned by minimising the entropy of the merged model's predictions on unlabelled inputs.

θ = θ₀ + Σₖ λₖ τₖ (task-wise) or θˡ = θ₀ˡ + Σₖ λₖˡ τₖˡ per tensor l (layer-wise), λ initialised
to 0.3 and clamped to [0, 1], Adam at lr 1e-3. AdaMerging++ replaces τₖ by TIES-processed
task vectors (top 20 % by magnitude, elected sign, kept per task). For a causal LM the
prediction is the next token after each prompt, the first token of its answer; for a
classifier it is the class, each task through its own head (the paper's setting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from merganser.methods.sparsify import topk_mask
from merganser.methods.task_vectors import consensus_mask
from merganser.search.common import Scorer, SearchResult, StateDict


@dataclass(frozen=True)
class AdaMergingConfig:
    granularity: Literal["layer", "task"] = "layer"
    init: float = 0.3
    lr: float = 1e-3
    steps: int = 500
    batch: int = 16
    clamp: bool = True
    ties: bool = False  # AdaMerging++
    density: float = 0.2  # TIES trim for ++ (the paper's K = 20)
    report_every: int = 50
    seed: int = 0


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) along the last axis."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def ties_task_vectors(deltas: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    """TIES trim and sign election, then each task keeps only its agreeing entries (no mean)."""
    trimmed = torch.stack([d * topk_mask(d, density) for d in deltas])
    keep = consensus_mask(trimmed, "mass")
    return list(trimmed * keep)


def last_token_logits(output: Any, batch: Any) -> torch.Tensor:
    """A causal LM's prediction after each right-padded prompt: the logits at its last token."""
    last = batch["attention_mask"].sum(1) - 1
    return output.logits[torch.arange(len(last)), last]


def adamerging(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    base: StateDict,
    models: Sequence[StateDict],
    batches: Sequence[Sequence[Any]],
    score: Scorer | None = None,
    config: AdaMergingConfig | None = None,
    log: Callable[[str], None] | None = None,
    predictions: Callable[[Any, Any], torch.Tensor] | None = None,
) -> SearchResult:
    """Learn λ by entropy minimisation (Yang et al., ICLR 2024, arXiv 2310.02575).

    ``model`` is an architecture skeleton, or one per task (each task's own classification
    head around the shared parameters: a parameter absent from ``base`` stays the module's
    own). ``batches[k]`` are task k's unlabelled batches, in any form the model takes (a
    mapping of keyword tensors, a tuple, a tensor). ``predictions(output, batch)`` gives the
    logits whose entropy is minimised, by default every position of the output's logits (a
    classifier's class predictions); a causal LM's prompts use :func:`last_token_logits`.
    With ``score`` (dev), the merge is scored every ``report_every`` steps and the best one is
    returned (the initial λ included); without, the last.
    """
    from merganser.evaluation.forward import logits_of, row_mask

    c = config or AdaMergingConfig()
    nets = list(model) if isinstance(model, Sequence) else [model] * len(batches)
    if len(nets) != len(batches):
        raise ValueError(f"adamerging: {len(nets)} models for {len(batches)} tasks")
    if any(len(b) == 0 for b in batches):
        raise ValueError("adamerging: every task needs at least one unlabelled batch")
    keys = [k for k, v in base.items() if v.is_floating_point()]
    # Each module takes its canonical names only (a tied weight once); a key no module has
    # would make its λ do nothing.
    takes = [_canonical(net) for net in nets]
    aliases = set().union(*(_aliases(net) for net in nets))
    if unknown := [k for k in base if k not in aliases]:
        raise ValueError(f"adamerging: no module has a parameter or buffer named {unknown[0]!r}")
    n = len(models)
    taus: dict[str, list[torch.Tensor]] = {}
    for k in keys:
        deltas = [m[k].float() - base[k].float() for m in models]
        taus[k] = ties_task_vectors(deltas, c.density) if c.ties else deltas
    shape = (len(keys), n) if c.granularity == "layer" else (1, n)
    lam = torch.full(shape, c.init, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=c.lr, betas=(0.9, 0.999))
    buffers = {k: v for k, v in base.items() if not v.is_floating_point()}

    def merged(coef: torch.Tensor) -> dict[str, torch.Tensor]:
        w = coef.clamp(0, 1) if c.clamp else coef
        out = dict(buffers)
        for i, k in enumerate(keys):
            row = w[i if c.granularity == "layer" else 0]
            t = base[k].float()
            for j in range(n):
                t = t + row[j] * taus[k][j]
            out[k] = t
        return out

    def snapshot() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in merged(lam).items()}

    def predict(output: Any, batch: Any) -> torch.Tensor:
        if predictions is not None:
            return predictions(output, batch)
        logits = logits_of(output)
        mask = row_mask(batch, tuple(logits.shape[:-1]))  # padding positions predict nothing
        return logits[mask] if mask is not None else logits

    best, best_lam = snapshot(), lam.detach().clone()
    start = best_dev = float("nan")
    if score is not None:
        (start,) = score([best])
        best_dev = start
        score.generation(0, best, start)
    for net in nets:
        net.eval()
    history: list[dict[str, Any]] = []
    for step in range(1, c.steps + 1):
        params = merged(lam)
        loss = torch.zeros(())
        for net, names, task in zip(nets, takes, batches, strict=True):
            batch = task[(step - 1) % len(task)]
            output = _forward(net, {k: v for k, v in params.items() if k in names}, batch)
            loss = loss + entropy(predict(output, batch).float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % c.report_every == 0 or step == c.steps:
            ent = float(loss.detach())
            if score is None:
                history.append({"generation": step, "entropy": ent})
                if log:
                    log(f"step {step}: entropy {ent:.4f}")
                continue
            cand = snapshot()
            (dev,) = score([cand])
            history.append({"generation": step, "dev": max(dev, best_dev), "entropy": ent})
            if dev > best_dev:
                best, best_dev, best_lam = cand, dev, lam.detach().clone()
            if log:
                log(f"step {step}: entropy {ent:.4f}, dev {dev:.4f}")
            score.generation(step, best, best_dev)
    if score is None:
        best, best_lam = snapshot(), lam.detach().clone()
    coefs = (best_lam.clamp(0, 1) if c.clamp else best_lam).tolist()
    return SearchResult(
        best,
        best_dev,
        start,
        len(history) + 1,
        history,
        {"lambdas": coefs if c.granularity == "task" else dict(zip(keys, coefs, strict=True))},
    )


def _forward(net: torch.nn.Module, params: dict[str, torch.Tensor], batch: Any) -> Any:
    """``net`` on ``batch`` with ``params`` in place of its own (the rest stay its own)."""
    from merganser.evaluation.forward import arguments

    args, kwargs = arguments(batch)
    return torch.func.functional_call(net, params, args=args, kwargs=kwargs)


def _canonical(net: torch.nn.Module) -> set[str]:
    return {n for n, _ in net.named_parameters()} | {n for n, _ in net.named_buffers()}


def _aliases(net: torch.nn.Module) -> set[str]:
    params = {n for n, _ in net.named_parameters(remove_duplicate=False)}
    return params | {n for n, _ in net.named_buffers(remove_duplicate=False)}
