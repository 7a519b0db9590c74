"""Training loops for the zoo: a base on a broad mixture, then one expert per task."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from merganser.evaluation.zoo.tasks import SPLIT_SEEDS, Task, hash_tag
from merganser.evaluation.zoo.tokenizer import BOS, EOS, PAD, CharTokenizer


def batch_tensors(
    pairs: Sequence[tuple[str, str]], tok: CharTokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt answer [EOS]`` ids, attention mask, labels on the answer."""
    seqs, labels = [], []
    for prompt, answer in pairs:
        p = [BOS, *tok.encode(prompt)]
        a = [*tok.encode(answer), EOS]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(y)] = torch.tensor(y)
        mask[i, : len(s)] = 1
    return ids, mask, lab


def train(
    model: torch.nn.Module,
    tasks: Sequence[Task],
    steps: int,
    lr: float,
    batch: int,
    seed: int,
    log: Callable[[int, float], None] | None = None,
    device: str = "cpu",
) -> None:
    """AdamW with warm-up and cosine decay on a uniform mixture of ``tasks`` (train split)."""
    tok = CharTokenizer()
    home = next(model.parameters()).device
    model.to(device)
    rngs = [random.Random(SPLIT_SEEDS["train"] + 104729 * seed + hash_tag(t.tag)) for t in tasks]
    pick = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        ),
    )
    model.train()
    for step in range(steps):
        pairs = []
        for _ in range(batch):
            i = pick.randrange(len(tasks))
            pairs.append(tasks[i].example(rngs[i]))
        ids, mask, labels = (t.to(device) for t in batch_tensors(pairs, tok))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(step, float(loss))
    model.to(home).eval()
