"""The generic fuzzer (fuzz_cli.py) over every subcommand, a bounded slice with a fixed seed:
0 tracebacks, 0 hangs, 0 internal errors, 0 silent non-finite outputs, 0 writes outside the
output. ``make fuzz`` runs 2,000 cases (FUZZ_CASES, FUZZ_SEED to change them).
"""

from __future__ import annotations

import os
import sys

from fuzz_cli import SUBCOMMANDS, fuzz


def test_fuzzed_inputs_to_every_subcommand(tmp_path) -> None:
    cases = int(os.environ.get("FUZZ_CASES", "180"))
    seed = int(os.environ.get("FUZZ_SEED", "0"))
    tally = fuzz(cases, seed, tmp_path)
    sys.__stdout__.write(f"\nfuzz (seed {seed}): {tally.line()}\n")
    assert not tally.bad, "\n".join([tally.line(), *tally.failures[:20]])
    assert set(tally.by_command) == set(SUBCOMMANDS)
    assert tally.refused > 0 and tally.ok > 0, tally.line()
