"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575, spec §13.5): merging coefficients
learned by minimising the entropy of the merged model's predictions on unlabelled inputs.

θ = θ₀ + Σₖ λₖ τₖ (task-wise) or θˡ = θ₀ˡ + Σₖ λₖˡ τₖˡ per tensor l (layer-wise), λ initialised
to 0.3 and clamped to [0, 1], Adam at lr 1e-3. AdaMerging++ replaces τₖ by TIES-processed
task vectors (top 20 % by magnitude, elected sign, kept per task). For a causal LM the
prediction is the next token after each prompt, the first token of its answer.
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


def adamerging(
    model: torch.nn.Module,
    base: StateDict,
    models: Sequence[StateDict],
    prompts: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
    score: Scorer,
    config: AdaMergingConfig | None = None,
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """Learn λ by entropy minimisation (Yang et al., arXiv 2310.02575); select on dev.

    ``model`` is an architecture skeleton, ``prompts[k]`` task k's unlabelled batches of
    right-padded ``(input_ids, attention_mask)``. Every ``report_every`` steps the current
    merge is scored on dev; the best-scoring merge is returned (the initial λ included).
    """
    c = config or AdaMergingConfig()
    keys = [k for k, v in base.items() if v.is_floating_point()]
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

    (start,) = score([snapshot()])
    best, best_dev, best_lam = snapshot(), start, lam.detach().clone()
    score.generation(0, best, start)
    model.eval()
    history: list[dict[str, Any]] = []
    for step in range(1, c.steps + 1):
        params = merged(lam)
        loss = torch.zeros(())
        for batches in prompts:
            ids, mask = batches[(step - 1) % len(batches)]
            logits = torch.func.functional_call(
                model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
            ).logits
            last = mask.sum(1) - 1
            loss = loss + entropy(logits[torch.arange(len(ids)), last]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % c.report_every == 0 or step == c.steps:
            cand = snapshot()
            (dev,) = score([cand])
            history.append(
                {"generation": step, "dev": max(dev, best_dev), "entropy": float(loss.detach())}
            )
            if dev > best_dev:
                best, best_dev, best_lam = cand, dev, lam.detach().clone()
            if log:
                log(f"step {step}: entropy {float(loss.detach()):.4f}, dev {dev:.4f}")
            score.generation(step, best, best_dev)
    coefs = (best_lam.clamp(0, 1) if c.clamp else best_lam).tolist()
    return SearchResult(
        best,
        best_dev,
        start,
        len(history) + 1,
        history,
        {"lambdas": coefs if c.granularity == "task" else dict(zip(keys, coefs, strict=True))},
    )
