"""The default CPU thread count: measured by a probe once per machine, kept, chosen by rule."""

from __future__ import annotations

import json
import math

import pytest

from merganser.pipeline import threads


def test_candidates_are_powers_of_two_below_the_cores_and_the_cores() -> None:
    assert threads.candidates(1) == [1]
    assert threads.candidates(2) == [1, 2]
    assert threads.candidates(6) == [1, 2, 4, 6]
    assert threads.candidates(16) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize(
    ("rates", "want"),
    [
        ({1: 100.0, 2: 180.0, 4: 190.0, 8: 170.0}, 2),  # 180 is within 10 % of 190
        ({1: 100.0, 2: 120.0, 4: 200.0, 8: 205.0, 16: 150.0}, 4),
        ({1: 100.0, 2: 95.0}, 1),  # a second thread that does not help is not taken
        ({1: 100.0, 2: 189.0}, 2),
    ],
)
def test_choose_takes_the_fewest_threads_within_gain_of_the_best(rates, want) -> None:
    assert threads.choose(rates) == want


def _saturating(at: int):  # type: ignore[no-untyped-def]
    """A fake probe: throughput grows with threads up to ``at``, then falls off."""
    calls: list[int] = []

    def measure(t: int) -> float:
        calls.append(t)
        return 100.0 * min(t, at) - 3.0 * max(t - at, 0)

    return measure, calls


def test_the_measured_count_is_kept_per_machine(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MERGANSER_CACHE", str(tmp_path / "cache"))
    measure, calls = _saturating(4)
    assert threads.measured_threads(16, measure) == 4
    assert calls == [1, 2, 4, 8, 16]
    kept = json.loads((tmp_path / "cache" / "threads.json").read_text())
    assert kept[threads.machine(16)]["threads"] == 4
    assert threads.measured_threads(16, measure) == 4  # read back, not measured again
    assert calls == [1, 2, 4, 8, 16]
    # Another core count is another machine: measured and kept beside the first.
    assert threads.measured_threads(3, measure) == 3
    assert calls[5:] == [1, 2, 3]
    assert len(json.loads((tmp_path / "cache" / "threads.json").read_text())) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"threads": 0}}'])
def test_a_damaged_cache_is_measured_again_and_rewritten(tmp_path, monkeypatch, content) -> None:
    monkeypatch.setenv("MERGANSER_CACHE", str(tmp_path))
    (tmp_path / "threads.json").write_text(content.replace("KEY", threads.machine(8)))
    measure, calls = _saturating(2)
    assert threads.measured_threads(8, measure) == 2
    assert calls == [1, 2, 4, 8]
    assert json.loads((tmp_path / "threads.json").read_text())[threads.machine(8)]["threads"] == 2


def test_an_unwritable_cache_still_gives_a_count(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MERGANSER_CACHE", str(blocker / "below"))  # a file in the way
    measure, calls = _saturating(8)
    assert threads.measured_threads(8, measure) == 8
    assert threads.measured_threads(1, measure) == 1  # one core: nothing to measure
    assert calls == [1, 2, 4, 8]


def test_the_probe_measures_a_positive_rate(monkeypatch) -> None:
    monkeypatch.setattr(threads, "ROUNDS", 2)  # short: only that it runs is tested here
    rates = [threads.probe(t) for t in (1, 2)]
    assert all(math.isfinite(r) and r > 0 for r in rates)


def test_without_a_writable_cache_the_probe_runs_once_per_process(tmp_path, monkeypatch) -> None:
    """A search that merges hundreds of times must not probe before every merge."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MERGANSER_CACHE", str(tmp_path / "file" / "below"))
    monkeypatch.setattr(threads, "_MEASURED", {})
    measure, calls = _saturating(2)
    monkeypatch.setattr(threads, "probe", measure)
    assert [threads.measured_threads(4) for _ in range(3)] == [2, 2, 2]
    assert calls == [1, 2, 4]
