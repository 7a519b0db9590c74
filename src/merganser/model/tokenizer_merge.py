"""The output tokenizer of a merge whose inputs' tokenizers differ: read each input's tokens
(transformers' fast tokenizers, no remote code), build the target (``union``, ``base`` or one
model's), and say where every output id's row comes from. The row arithmetic is vocab.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merganser.errors import RecipeError
from merganser.model import hf
from merganser.model.vocab import Vocab, padded, union_tokens


@dataclass
class VocabPlan:
    """Where each output row of the vocabulary tensors comes from, per input checkpoint."""

    rows: int  # output rows (the vocabulary, padded)
    perms: dict[int, torch.Tensor]  # checkpoint -> its row for each output id, or -1
    in_rows: dict[int, int]  # checkpoint -> its embedding rows
    fill_from: int | None  # checkpoint whose row fills a token it has (the base_model)
    tokenizer: Any  # the output tokenizer (transformers), saved with the output
    report: list[str] = field(default_factory=list)
    # The recipe's tokenizer.tokens: output id -> (checkpoint whose row fills it, or None for
    # zeros; its row; force).
    overrides: dict[int, tuple[int | None, int, bool]] = field(default_factory=dict)
    # fill: pieces: checkpoint -> output id -> its own rows to average for a token it lacks.
    pieces: dict[int, dict[int, list[int]]] = field(default_factory=dict)


def read_vocab(folder: Path, rows: int) -> tuple[Any, Vocab]:
    """A model folder's tokenizer and its tokens (``rows``: its embedding rows)."""
    from transformers import AutoTokenizer

    hf.require_tokenizer(folder, "tokenizer_source")
    tok = hf.load(folder, "its tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
    if not getattr(tok, "is_fast", False):
        raise RecipeError(f"{folder}: tokenizer_source needs a fast (tokenizer.json) tokenizer")
    added = {a.content: i for i, a in tok.added_tokens_decoder.items()}
    regular = {t: i for t, i in tok.get_vocab().items() if t not in added}
    return tok, Vocab(regular, added, rows)


@dataclass(frozen=True)
class TokenRow:
    """A configured token's fill: from ``model``'s row for ``token`` (or row ``token_id``),
    or zeros where ``model`` is None; ``force``: for every model, not only those lacking it.
    """

    model: int | None
    token: str | None = None
    token_id: int | None = None
    force: bool = False


def plan_vocab(
    source: str | Path,
    folders: list[Path],
    rows: list[int],
    base: int | None,
    pad_to: int | None,
    where: str,
    tokens: dict[str, TokenRow] | None = None,
    fill: str = "mergekit",
) -> VocabPlan | None:
    """The vocabulary plan for ``source`` (``union``, ``base``, or a model folder) over the
    inputs ``folders`` (with their embedding ``rows``), or None where every input has the same
    tokens at the same ids and nothing is padded (the tokenizer is then copied as usual).
    ``base``: the base_model's index among the inputs, if any.
    """
    loaded = [read_vocab(f, n) for f, n in zip(folders, rows, strict=True)]
    vocabs = [v for _, v in loaded]
    first = base if base is not None else 0
    if isinstance(source, Path) and source in folders:
        owner = vocabs[folders.index(source)]
    elif isinstance(source, Path):  # a tokenizer from outside the merge: all its ids get rows
        v = read_vocab(source, 1 << 62)[1]
        owner = Vocab(v.regular, v.added, max(v.ids().values()) + 1)
    else:
        owner = vocabs[first]
    same = all(v.ids() == owner.ids() and v.rows == owner.rows for v in vocabs)
    if same and not pad_to and not tokens:
        return None
    owner_folder = source if isinstance(source, Path) else folders[first]
    _check_fits(owner, owner_folder, where)
    tok = _copy(owner_folder)
    if source == "union":
        ordered = [vocabs[first]] + [v for i, v in enumerate(vocabs) if i != first]
        _, new = union_tokens(ordered)
        _add(tok, new, [t for t, _ in loaded])
    if tokens:  # every configured token is in the output vocabulary
        _add(tok, [t for t in tokens if t not in tok.get_vocab()], [t for t, _ in loaded])
    by_id = {i: t for t, i in tok.get_vocab().items()}
    n = max(owner.rows, max(by_id) + 1)
    perms, report = {}, []
    for i, v in enumerate(vocabs):
        ids = v.ids()
        perms[i] = torch.tensor(
            [ids.get(by_id[k], -1) if k in by_id else (k if k < v.rows else -1) for k in range(n)],
            dtype=torch.long,
        )
        lacked = sum(1 for k in by_id if perms[i][k] < 0)
        if lacked:
            how = "the base's row where it has one, else " if base is not None else ""
            report.append(
                f"{folders[i]} lacks {lacked} of the output's {len(by_id)} tokens; filled with "
                f"{how}the mean of the rows of the inputs that have each (zero where none has)"
            )
    out_ids = tok.get_vocab()
    overrides = {}
    for t, spec in (tokens or {}).items():
        row = 0
        if spec.model is not None:
            ids = vocabs[spec.model].ids()
            want = spec.token if spec.token is not None else t
            row = spec.token_id if spec.token_id is not None else ids.get(want, -1)
            if not 0 <= row < vocabs[spec.model].rows:
                raise RecipeError(
                    f"{where}: tokens.{t}: {folders[spec.model]} has no row for "
                    f"{want if spec.token_id is None else f'id {row}'}"
                )
        overrides[out_ids[t]] = (spec.model, row, spec.force)
    pieces: dict[int, dict[int, list[int]]] = {}
    if fill == "pieces":
        for i, (own_tok, v) in enumerate(loaded):
            pieces[i] = _pieces(own_tok, tok, by_id, perms[i], v.rows)
            if pieces[i]:
                report.append(
                    f"{folders[i]}: {len(pieces[i])} missing tokens filled from their pieces in "
                    "its own vocabulary"
                )
    return VocabPlan(
        padded(n, pad_to), perms, dict(enumerate(rows)), base, tok, report, overrides, pieces
    )


def _pieces(
    own: Any, out_tok: Any, by_id: dict[int, str], perm: torch.Tensor, rows: int
) -> dict[int, list[int]]:
    """For each output token a model lacks: the ids its own tokenizer splits the token's
    text into (those with a row); a token it cannot split that way keeps the shared fill.
    """
    out = {}
    for k, token in by_id.items():
        if perm[k] >= 0:
            continue
        text = out_tok.convert_tokens_to_string([token])
        ids = [i for i in own(text, add_special_tokens=False)["input_ids"] if 0 <= i < rows]
        if ids:
            out[k] = ids
    return out


def _add(tok: Any, new: list[str], sources: list[Any]) -> None:
    """Add the union's new tokens to ``tok``, keeping an added token's own settings (special,
    normalised) from the model it comes from; regular tokens become added tokens, as in
    mergekit (matched before the tokenizer's own model).
    """
    from transformers import AddedToken

    settings = {}
    for source in reversed(sources):  # the first model that has a token gives its settings
        settings.update({a.content: a for a in source.added_tokens_decoder.values()})
    tok.add_tokens(
        [
            AddedToken(t, special=settings[t].special, normalized=settings[t].normalized)
            if t in settings
            else AddedToken(t, normalized=False)
            for t in new
        ]
    )


def _check_fits(v: Vocab, folder: Path, where: str) -> None:
    both = {**v.regular, **v.added}
    if over := [t for t, i in both.items() if i >= v.rows]:
        raise RecipeError(
            f"{where}: {folder}'s tokenizer has {len(over)} token(s) beyond its {v.rows} "
            f"embedding rows (e.g. {over[0]!r}); merganser does not strip tokenizers"
        )


def _copy(folder: Path) -> Any:
    """A fresh copy of a loaded tokenizer (tokens are added to the copy, not the original)."""
    from transformers import AutoTokenizer

    return hf.load(folder, "its tokenizer", lambda: AutoTokenizer.from_pretrained(folder))
