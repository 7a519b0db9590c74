"""Synthetic sequence tasks for the offline zoo: ``TAG:input=`` → answer, character level.

Each task has disjoint train/dev/test streams (different seeds), so selection on dev never
sees test examples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefgh"
DIGITS = "0123456789"
SPLIT_SEEDS = {"train": 0, "dev": 1_000_003, "test": 2_000_003}


@dataclass(frozen=True)
class Task:
    name: str
    tag: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, answer)

    def example(self, rng: random.Random) -> tuple[str, str]:
        x, y = self.make(rng)
        return f"{self.tag}:{x}=", y

    def examples(self, split: str, n: int, seed: int = 0) -> list[tuple[str, str]]:
        rng = random.Random(SPLIT_SEEDS[split] + 7919 * seed + hash_tag(self.tag))
        return [self.example(rng) for _ in range(n)]


def hash_tag(tag: str) -> int:
    return sum(ord(c) * 131**i for i, c in enumerate(tag))


def _word(rng: random.Random, lo: int = 3, hi: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _shift(c: str) -> str:
    return LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}+{b}", str(a + b)


def _count(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 4, 7)
    return w, str(w.count("a"))


_SKILLS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": lambda r: (w := _word(r), w[::-1]),
    "sort": lambda r: (w := _word(r), "".join(sorted(w))),
    "add": _add,
    "shift": lambda r: (w := _word(r), "".join(_shift(c) for c in w)),
    "count": _count,
}

# The experts' tasks. Their tags are new to the base: like an instruction-tuned expert, each
# expert learns to route a new instruction to a skill the base already has (under an alias),
# which keeps task vectors small — the regime in which merging works.
EXPERT_TASKS: dict[str, Task] = {
    name: Task(name, tag, _SKILLS[name])
    for name, tag in (("reverse", "R"), ("sort", "S"), ("add", "A"), ("shift", "N"), ("count", "K"))
}

# The base's "pretraining" mixture: generic skills plus every expert skill under an alias tag.
PRETRAIN_TASKS: dict[str, Task] = {
    "copy": Task("copy", "C", lambda r: (w := _word(r, 2, 6), w)),
    "first": Task("first", "F", lambda r: (w := _word(r), w[0])),
    "last": Task("last", "L", lambda r: (w := _word(r), w[-1])),
    "double": Task("double", "W", lambda r: (w := _word(r, 2, 3), w + w)),
    **{
        f"{name}_alias": Task(f"{name}_alias", tag, _SKILLS[name])
        for name, tag in (
            ("reverse", "V"),
            ("sort", "O"),
            ("add", "P"),
            ("shift", "T"),
            ("count", "Q"),
        )
    },
}

ALL_TASKS = {**EXPERT_TASKS, **PRETRAIN_TASKS}


def get_task(name: str) -> Task:
    try:
        return ALL_TASKS[name]
    except KeyError:
        from merganser.errors import MerganserError

        raise MerganserError(f"unknown task {name!r} (known: {', '.join(ALL_TASKS)})") from None
