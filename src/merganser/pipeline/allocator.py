"""Process-wide malloc settings for merge runs (glibc only).

A block-by-block merge allocates and frees megabyte-sized temporaries thousands of times.
glibc serves those from fresh mmaps, or hands freed heap tops back to the kernel, so every
reuse faults its pages in again: 1M page faults and ~20% of the CPU time of a 1B-parameter
task-arithmetic merge. Keeping such blocks in the heap costs no more peak memory.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept before any is returned to the kernel


def tune_malloc() -> bool:
    """Keep freed blocks up to 32 MiB in the heap; False where malloc is not glibc's.

    Process-wide, so the CLI calls it; a program that embeds merganser decides for itself.
    """
    try:
        # The process's own symbols: find_library would run ldconfig at every start.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Setting the mmap threshold also turns off glibc's dynamic threshold, which would
    # otherwise move it back below our blocks' sizes.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
