"""tune_malloc keeps megabyte-sized temporaries in the heap: reusing one faults no pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHURN = """
import ctypes, resource, sys
from merganser.pipeline.allocator import tune_malloc
if sys.argv[1] == "1" and not tune_malloc():
    sys.exit(3)  # not glibc's malloc
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 16 << 20
def churn():
    # Three temporaries in use at once, then freed, like a block's. Straight from malloc (torch's
    # CPU allocator calls it too): what else the process allocated cannot move the heap's top.
    for _ in range(20):
        ps = [libc.malloc(SIZE) for _ in range(3)]
        for p in ps:
            ctypes.memset(p, 1, SIZE)
        for p in ps:
            libc.free(p)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = 20 * 3 * (16 << 20) // 4096  # pages the second churn would touch if none were reused


def _faults(tuned: bool) -> int:
    # In a child: tuning is process-wide, and this process runs the other tests.
    out = subprocess.run(
        [sys.executable, "-c", CHURN, "1" if tuned else "0"], capture_output=True, text=True
    )
    if out.returncode == 3:
        pytest.skip("malloc here is not glibc's")
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_tuned_malloc_reuses_freed_blocks_without_page_faults() -> None:
    tuned, untuned = _faults(True), _faults(False)
    assert tuned < PAGES // 20, (tuned, untuned)
    assert untuned > 4 * tuned, (tuned, untuned)  # the setting, not the workload, saves them


def test_the_cli_tunes_malloc(monkeypatch: pytest.MonkeyPatch) -> None:
    from merganser import cli

    calls = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: calls.append(1) or True)
    assert cli.main(["methods"]) == 0
    assert calls == [1]
