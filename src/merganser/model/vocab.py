"""Vocabulary alignment for models whose tokenizers differ (mergekit 0.1.5's
``tokenizer_source: union | base | <model>``, spec algorithms-2.md §10): the output vocabulary,
where each model's rows go, and the rows a model lacks. Pure functions over token dictionaries
and tensors; reading and writing tokenizers happens elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Vocab:
    """One model's tokens: regular tokens and added tokens (content -> id), and how many
    embedding rows the model has (tokens at or beyond it have no row).
    """

    regular: Mapping[str, int]
    added: Mapping[str, int]
    rows: int

    def ids(self) -> dict[str, int]:
        """Every token with a row, regular and added."""
        both = {**self.regular, **self.added}
        return {t: i for t, i in both.items() if i < self.rows}


def union_tokens(vocabs: Sequence[Vocab]) -> tuple[list[str], list[str]]:
    """The union vocabulary, in id order: the first vocabulary's tokens with rows, in its
    own order; then each other model's regular tokens it lacks (model by model, each in the
    order of its ids); then the added tokens not yet present (as mergekit builds it, but in id
    order where mergekit follows dict order). Returns (tokens, the new ones to add).
    """
    first = vocabs[0].ids()
    tokens = sorted(first, key=first.__getitem__)
    seen = set(tokens)
    new: list[str] = []
    for v in vocabs[1:]:
        for t in sorted((t for t, i in v.regular.items() if i < v.rows), key=v.regular.__getitem__):
            if t not in seen:
                seen.add(t)
                new.append(t)
    for v in vocabs[1:]:
        for t in sorted((t for t, i in v.added.items() if i < v.rows), key=v.added.__getitem__):
            if t not in seen:
                seen.add(t)
                new.append(t)
    return tokens + new, new


def permutation(tokens: Sequence[str], vocab: Vocab) -> torch.Tensor:
    """For each output token, the model's row for it, or -1 where the model lacks it."""
    ids = vocab.ids()
    return torch.tensor([ids.get(t, -1) for t in tokens], dtype=torch.long)


def align_rows(
    tensors: Sequence[torch.Tensor],
    perms: Sequence[torch.Tensor],
    base: int | None,
    rows: int,
    overrides: Mapping[int, tuple[int | None, int, bool]] | None = None,
    pieces: Sequence[Mapping[int, Sequence[int]]] | None = None,
) -> list[torch.Tensor]:
    """Each model's matrix with its rows in the output vocabulary's order (mergekit's
    PermutedVocabulary): a model's own row where it has the token; else one shared fill row —
    the base's row where the base has it, otherwise the mean of the rows of the models that
    have it (the donor's row when one has it, zero when none does). ``rows`` ≥ the vocabulary:
    rows beyond it (``pad_to_multiple_of``) are each model's mean aligned row.
    ``overrides`` (the recipe's ``tokenizer.tokens``): output id -> (input whose row fills it,
    or None for zeros; that input's row; force: every model takes the fill, not only those
    lacking the token). ``pieces`` (per model): output id -> the model's own rows whose mean
    fills that token for that model (it lacks the token; a forced override still wins).
    """
    n = perms[0].numel()
    width = tensors[0].shape[1:]
    device = tensors[0].device
    total = torch.zeros((n, *width), dtype=torch.float32, device=device)
    count = torch.zeros(n, dtype=torch.float32, device=device)
    own = []
    for t, p in zip(tensors, perms, strict=True):
        p = p.to(device)
        has = p >= 0
        rows_of = t.float()[p.clamp(min=0)]
        rows_of[~has] = 0
        own.append((has, rows_of))
        total += rows_of
        count += has
    fill = total / count.clamp(min=1).view(-1, *([1] * len(width)))
    if base is not None:
        has, rows_of = own[base]
        fill[has] = rows_of[has]
    forced = torch.zeros(n, dtype=torch.bool, device=device)
    for out_id, (src, row, force) in (overrides or {}).items():
        fill[out_id] = 0.0 if src is None else tensors[src][row].float()
        forced[out_id] = force
    out = []
    for j, (has, rows_of) in enumerate(own):
        keep = has & ~forced
        aligned = torch.where(keep.view(-1, *([1] * len(width))), rows_of, fill)
        for out_id, ids in (pieces[j] if pieces else {}).items():
            if not has[out_id] and not forced[out_id]:
                aligned[out_id] = tensors[j].float()[list(ids)].mean(dim=0)
        if rows > n:
            pad = aligned.mean(dim=0, keepdim=True).expand(rows - n, *width)
            aligned = torch.cat([aligned, pad])
        out.append(aligned)
    return out


def padded(n: int, multiple: int | None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (None: unchanged)."""
    return n if not multiple else -(-n // multiple) * multiple
