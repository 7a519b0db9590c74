"""The search's checkpoint: an append-only journal of every evaluation, keyed by content.

Searches are deterministic given their seed, so resuming is replaying: the search runs again
from the start and every candidate already scored (same weights, byte for byte) is answered
from the journal instead of re-evaluated. A search killed mid-generation therefore loses at
most the evaluations that were in flight, and a resumed one ends where an uninterrupted one
would. Lines are flushed and fsynced after each batch; each carries a checksum (see Journal).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import Score
from merganser.search.workers import Packed
from merganser.storage import safejson

JOURNAL_NAME = "evaluations.jsonl"


def candidate_key(candidate: Packed) -> str:
    """sha256 over names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(candidate):
        a = np.ascontiguousarray(candidate[k])
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


FORMAT = 2  # lines carry a checksum; version 1 journals had none


def _checksum(body: dict[str, Any]) -> str:
    """First 16 hex digits of sha256 over the line's canonical JSON without its checksum."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _score(value: Any) -> Score:
    """A journal's score, checked: accuracy in [0, 1], a non-negative loss (or NaN), n >= 0."""
    if not isinstance(value, dict) or set(value) != {"accuracy", "loss", "n"}:
        raise ValueError("a score must have exactly accuracy, loss and n")
    acc, loss, n = value["accuracy"], value["loss"], value["n"]
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not 0 <= acc <= 1:
        raise ValueError(f"accuracy {acc!r} is outside [0, 1]")
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or loss < 0:
        raise ValueError(f"loss {loss!r} is not a non-negative number")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n {n!r} is not a non-negative integer")
    return Score(float(acc), float(loss), n)


class Journal:
    """OUT/evaluations.jsonl: a header naming the search's configuration digest, then one
    checksummed line per evaluation. Resuming checks every line: a line that fails (edited,
    garbage, scores out of range) refuses the resume with its line number, unless ``repair``
    drops such lines (they are evaluated again). A last line cut short without its newline is
    what a kill mid-write leaves; it is dropped with a notice.
    """

    def __init__(self, folder: Path, config_digest: str, resume: bool, repair: bool = False):
        self.path = folder / JOURNAL_NAME
        self.entries: dict[tuple[str, str], dict[str, Score]] = {}
        self.dropped: list[int] = []  # line numbers dropped while resuming
        if resume and self.path.exists():
            self._load(config_digest, repair)
        else:
            self.path.write_text(self._head(config_digest))
        self._f = self.path.open("a", encoding="utf-8")

    @staticmethod
    def _head(config_digest: str) -> str:
        return json.dumps({"config": config_digest, "format": FORMAT}) + "\n"

    def _load(self, config_digest: str, repair: bool) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MerganserError(f"{self.path}: cannot read ({e})") from None
        lines = text.split("\n")
        torn = lines.pop() if lines else ""  # "" when the file ends with a newline
        try:
            head = safejson.loads(lines[0])
            digest, version = head["config"], head.get("format", 1)
        except (IndexError, KeyError, TypeError, ValueError):
            raise MerganserError(f"{self.path}: not a merganser search journal") from None
        if digest != config_digest:
            raise MerganserError(
                f"{self.path}: written by a different search configuration; "
                "resume needs the same SEARCH.yaml (start afresh with --force)"
            )
        if version != FORMAT and not repair:
            raise MerganserError(
                f"{self.path}: journal format {version!r} has no checksums to check "
                "(resume with --resume-repair to accept it, or start afresh with --force)"
            )
        for no, line in enumerate(lines[1:], 2):
            try:
                key, split, scores = self._parse(line, checked=version == FORMAT)
            except ValueError as e:
                if not repair:
                    raise MerganserError(
                        f"{self.path}:{no}: damaged journal line ({e}); resume with "
                        "--resume-repair to drop damaged lines, or start afresh with --force"
                    ) from None
                self.dropped.append(no)
                continue
            self.entries[key, split] = scores
        if torn:
            self.dropped.append(len(lines) + 1)
            print(
                f"merganser: {self.path}:{len(lines) + 1}: dropped a line cut short "
                "(a kill mid-write); it is evaluated again",
                file=sys.stderr,
            )
        # Rewrite without dropped lines so appends start on a fresh line.
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(self._head(config_digest))
            for (key, split), scores in self.entries.items():
                f.write(self._line(key, split, scores))
        os.replace(tmp, self.path)

    @staticmethod
    def _parse(line: str, checked: bool) -> tuple[str, str, dict[str, Score]]:
        e = safejson.loads(line, allow_nan=True)
        if not isinstance(e, dict):
            raise ValueError("not a JSON object")
        body = {k: v for k, v in e.items() if k != "sum"}
        if checked and e.get("sum") != _checksum(body):
            raise ValueError("checksum does not match")
        key, split, scores = body.get("key"), body.get("split"), body.get("scores")
        if not isinstance(key, str) or split not in ("dev", "test") or not isinstance(scores, dict):
            raise ValueError("expected key, split (dev or test) and scores")
        return key, split, {str(t): _score(s) for t, s in scores.items()}

    @staticmethod
    def _line(key: str, split: str, scores: dict[str, Score]) -> str:
        body = {"key": key, "split": split, "scores": {t: asdict(s) for t, s in scores.items()}}
        return json.dumps({**body, "sum": _checksum(body)}) + "\n"

    def get(self, key: str, split: str) -> dict[str, Score] | None:
        return self.entries.get((key, split))

    def record(self, items: list[tuple[str, str, dict[str, Score]]]) -> None:
        for key, split, scores in items:
            self.entries[key, split] = scores
            self._f.write(self._line(key, split, scores))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
