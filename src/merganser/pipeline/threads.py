"""How many worker threads a CPU merge gets when none are asked for: measured, once per machine.

A CPU merge streams its inputs through memory (page-cache copies, checksums, bfloat16 blocks)
and does a few float operations per entry in each thread. Past the point where the memory
system is saturated, more threads only add buffers and contention: on a 16-core machine 1B
merges ran slower with 16 threads than with 2-4 (docs/performance.md). Where that point lies
depends on the machine, so it is measured: a short probe copies bfloat16 blocks out of a
source larger than the caches and merges them with the fused kernels (TIES's sign election), on
1, 2, 4, ... and all cores side by side, and the default is the fewest threads within
``GAIN`` of the best throughput. The answer is kept in the user's cache directory, keyed by the
CPU, its core count and the probe's version; deleting the file measures again.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

# The fewest threads whose throughput is within this share of the best measured.
GAIN = 0.9
PROBE_VERSION = 1
MODELS = 4  # inputs per probe merge, besides the base
ENTRIES = 1 << 20  # per input: 2 MiB of bfloat16, a block of 10 MiB
ROUNDS = 16  # blocks each thread copies and merges per timing (fewer made the probe noisy)
REPEATS = 3  # timings per thread count; the fastest counts
_MEASURED: dict[str, int] = {}  # this process's answers: the cache is read (or probed) once


def candidates(cores: int) -> list[int]:
    """Thread counts the probe tries: powers of two below ``cores``, and ``cores``."""
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return [*counts, cores]


def choose(rates: dict[int, float]) -> int:
    """The fewest threads whose throughput is within ``GAIN`` of the best."""
    best = max(rates.values())
    return min(t for t, r in rates.items() if r >= GAIN * best)


def cache_file() -> Path:
    """Where the measured count is kept: ``$MERGANSER_CACHE/threads.json``, by default
    ``$XDG_CACHE_HOME/merganser/threads.json`` (``~/.cache/merganser/threads.json``)."""
    root = os.environ.get("MERGANSER_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "merganser")
    return Path(root) / "threads.json"


def machine(cores: int | None = None) -> str:
    """The key a measurement is kept under: CPU model, core count, probe version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)  # fmt: skip
    except OSError:
        pass
    return f"{model} | {cores or os.cpu_count() or 1} cores | probe {PROBE_VERSION}"


def measured_threads(
    cores: int | None = None, measure: Callable[[int], float] | None = None
) -> int:
    """The default CPU thread count: kept from an earlier measurement on this machine, or
    measured now (a second or two) and kept."""
    cores = cores or os.cpu_count() or 1
    if cores == 1:
        return 1
    path, key = cache_file(), machine(cores)
    if key in _MEASURED and measure is None:
        return min(_MEASURED[key], cores)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("threads"), int) and entry["threads"] >= 1:
        if measure is None:
            _MEASURED[key] = entry["threads"]
        return min(entry["threads"], cores)
    rates = {t: (measure or probe)(t) for t in candidates(cores)}
    threads = choose(rates)
    if measure is None:
        _MEASURED[key] = threads
    known[key] = {"threads": threads, "rates": {str(t): round(r, 1) for t, r in rates.items()}}
    try:  # a read-only home keeps the answer for this run only
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return threads


def probe(threads: int) -> float:
    """Millions of input entries per second that ``threads`` threads copy and merge side by
    side, each from its own source, as a CPU merge's compute threads do."""
    import numpy as np
    import torch

    from merganser.methods import fused

    n = (MODELS + 1) * ENTRIES
    # One source of at least 4 blocks, and one per thread: larger than the caches, so blocks
    # come from memory, as a merge's come from the page cache.
    count = max(4, threads)
    pattern = np.random.default_rng(0).integers(0x3C00, 0x3D00, n, dtype=np.int16)
    source = np.tile(pattern, count)  # copies, not draws: a 64-core probe stays quick
    blocks = [torch.empty(n, dtype=torch.bfloat16) for _ in range(threads)]
    outs = [torch.empty(ENTRIES, dtype=torch.bfloat16) for _ in range(threads)]
    settings = fused.Settings(MODELS)
    settings.set_mix([1.0] * MODELS, "mass", True, 1.0)

    def work(i: int, ready: threading.Barrier) -> None:
        ready.wait()
        block = blocks[i]
        xs = [block[m * ENTRIES : (m + 1) * ENTRIES] for m in range(MODELS)]
        for r in range(ROUNDS):
            at = (i + r) % count * n
            np.copyto(block.view(torch.int16).numpy(), source[at : at + n])
            if fused.available():
                fused.merge(settings, xs, block[MODELS * ENTRIES :], [None] * MODELS, outs[i])
            else:  # no numba: upcast and add in torch (it releases the GIL, too)
                block.float().view(MODELS + 1, ENTRIES).sum(0)

    best = float("inf")
    for _ in range(REPEATS):
        ready = threading.Barrier(threads + 1)
        pool = [threading.Thread(target=work, args=(i, ready)) for i in range(threads)]
        for th in pool:
            th.start()
        ready.wait()
        t0 = time.perf_counter()
        for th in pool:
            th.join()
        best = min(best, time.perf_counter() - t0)
    return threads * ROUNDS * n / best / 1e6
