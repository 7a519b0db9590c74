"""The search's checkpoint: an append-only journal of every evaluation, keyed by content.

Searches are deterministic given their seed, so resuming is replaying: the search runs again
from the start and every candidate already scored (same weights, byte for byte) is answered
from the journal instead of re-evaluated. A search killed mid-generation therefore loses at
most the evaluations that were in flight, and a resumed one ends where an uninterrupted one
would. Lines are flushed and fsynced after each batch; a torn last line is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from merganser.errors import MerganserError
from merganser.evaluate import Score
from merganser.search.workers import Packed

JOURNAL_NAME = "evaluations.jsonl"


def candidate_key(candidate: Packed) -> str:
    """sha256 over names, shapes and float32 bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(candidate):
        a = np.ascontiguousarray(candidate[k])
        h.update(f"{k}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class Journal:
    def __init__(self, folder: Path, config_digest: str, resume: bool):
        self.path = folder / JOURNAL_NAME
        self.entries: dict[tuple[str, str], dict[str, Score]] = {}
        if resume and self.path.exists():
            self._load(config_digest)
        else:
            self.path.write_text(json.dumps({"config": config_digest}) + "\n")
        self._f = self.path.open("a", encoding="utf-8")

    def _load(self, config_digest: str) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0])["config"]
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            raise MerganserError(f"{self.path}: not a merganser search journal") from None
        if head != config_digest:
            raise MerganserError(
                f"{self.path}: written by a different search configuration; "
                "resume needs the same SEARCH.yaml (start afresh with --force)"
            )
        for line in lines[1:]:
            try:
                e = json.loads(line)
                scores = {t: Score(**s) for t, s in e["scores"].items()}
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill
            self.entries[e["key"], e["split"]] = scores
        # Rewrite without torn lines so appends start on a fresh line.
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write(json.dumps({"config": config_digest}) + "\n")
            for (key, split), scores in self.entries.items():
                f.write(self._line(key, split, scores))
        os.replace(tmp, self.path)

    @staticmethod
    def _line(key: str, split: str, scores: dict[str, Score]) -> str:
        return (
            json.dumps(
                {"key": key, "split": split, "scores": {t: asdict(s) for t, s in scores.items()}}
            )
            + "\n"
        )

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
