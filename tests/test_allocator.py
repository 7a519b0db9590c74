"""tune_malloc keeps megabyte-sized temporaries in the heap: reusing one faults no pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from merganser.allocator import tune_malloc

CHURN = """
import resource, sys, torch
from merganser.allocator import tune_malloc
if sys.argv[1] == "1":
    assert tune_malloc()
def churn():
    for _ in range(50):  # the temporaries of a block merge: 1 MiB each, freed at once
        a = torch.ones(1 << 18)
        b = a * 2
        c = b + a
        del a, b, c
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 50 * 3 * (1 << 20) // 4096  # pages the second churn would touch if none were reused


def _faults(tuned: bool) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, "1" if tuned else "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout)


def test_tuned_malloc_reuses_freed_blocks_without_page_faults() -> None:
    if not tune_malloc():
        pytest.skip("malloc here is not glibc's")
    untuned, tuned = _faults(False), _faults(True)
    assert tuned < PAGES // 20, (tuned, untuned)
    assert untuned > 4 * tuned, (tuned, untuned)  # the setting, not the workload, saves them


def test_the_cli_tunes_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    from merganser import cli

    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    assert cli.main(["methods"]) == 0
    assert calls == [1]
