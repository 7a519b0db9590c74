"""pagecache: cachestat residency, and the prefetch a command-line merge starts with."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from conftest import evict_or_skip, run_cli, write_recipe

from merganser import cli
from merganser.storage import pagecache

PIECE = 64 << 10


def _files(tmp_path: Path, n: int, size: int = 8 << 20) -> list[Path]:
    out = []
    for i in range(n):
        p = tmp_path / f"m{i}" / "model.safetensors"
        p.parent.mkdir()
        p.write_bytes(os.urandom(size))
        out.append(p)
    return out


def _resident(path: Path, offset: int, n: int) -> bool | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pagecache.resident(fd, offset, n)
    finally:
        os.close(fd)


def test_weight_files_follow_the_plan_order(tmp_path) -> None:
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shards = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    weight_map = {"a": shards[0], "b": shards[1], "c": shards[0]}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert pagecache.weight_files(sharded) == [sharded / n for n in sorted(shards)]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"x")
    (plain / "extra.safetensors").write_bytes(b"x")
    assert pagecache.weight_files(plain) == [plain / "model.safetensors"]
    loose = tmp_path / "loose"
    loose.mkdir()
    for n in ("b.safetensors", "a.safetensors"):
        (loose / n).write_bytes(b"x")
    assert pagecache.weight_files(loose) == [loose / "a.safetensors", loose / "b.safetensors"]
    assert pagecache.weight_files(plain / "model.safetensors") == [plain / "model.safetensors"]


def test_prefetch_reads_the_leading_bytes_of_every_model_up_to_its_limit(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(pagecache.Prefetch, "PIECE", PIECE)
    files = _files(tmp_path, 2)
    for f in files:
        evict_or_skip(f)
    pf = pagecache.Prefetch([[f] for f in files], limit=4 * PIECE).start()
    pf._thread.join(timeout=30)
    # Four reads of a piece, then it stops (the kernel's own read-ahead may cache more, and
    # pieces it cached first are skipped, not counted).
    assert pf.stop() == 4 * PIECE
    for f in files:  # the models side by side: neither is left cold
        assert _resident(f, 0, PIECE) is True


def test_prefetch_skips_cached_ranges_and_missing_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pagecache.Prefetch, "PIECE", PIECE)
    files = _files(tmp_path, 2, size=5 * PIECE + 123)
    for f in files:
        evict_or_skip(f)
    files[0].read_bytes()
    cached = pagecache.Prefetch([[tmp_path / "gone.safetensors", files[0]]], 1 << 30).start()
    cached._thread.join(timeout=30)
    assert not cached._thread.is_alive()  # it stops at the end of the files
    assert cached.stop() == 0  # no byte read again
    cold = pagecache.Prefetch([[files[1]]], 1 << 30).start()
    cold._thread.join(timeout=30)
    # The kernel's own read-ahead may cache some pieces first, which are then skipped.
    assert 0 < cold.stop() <= files[1].stat().st_size
    assert _resident(files[1], 0, files[1].stat().st_size) is True


def test_prefetch_queues_within_its_window(tmp_path, monkeypatch) -> None:
    # A window of one piece per model: every further piece waits for the one queued before.
    monkeypatch.setattr(pagecache.Prefetch, "PIECE", PIECE)
    monkeypatch.setattr(pagecache.Prefetch, "WINDOW", 2 * PIECE)
    files = _files(tmp_path, 2, size=40 * PIECE + 5)
    for f in files:
        evict_or_skip(f)
    waits = []
    real_pread = os.pread
    monkeypatch.setattr(pagecache.os, "pread", lambda *a: waits.append(a) or real_pread(*a))
    pf = pagecache.Prefetch([[f] for f in files], 1 << 30).start()
    pf._thread.join(timeout=30)
    assert 0 < pf.stop() <= 2 * files[0].stat().st_size
    for f in files:
        assert _resident(f, 0, f.stat().st_size) is True
    assert waits  # the window was full at times, so it waited rather than queue more


def test_prefetch_of_no_files_ends_quietly(monkeypatch) -> None:
    failed: list = []
    monkeypatch.setattr(threading, "excepthook", failed.append)
    pf = pagecache.Prefetch([[], []], 1 << 30).start()
    pf._thread.join(timeout=30)
    assert not pf._thread.is_alive() and pf.stop() == 0
    assert failed == []


def test_prefetch_reads_where_the_kernel_takes_no_read_ahead(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(pagecache.Prefetch, "PIECE", PIECE)
    files = _files(tmp_path, 1)
    evict_or_skip(files[0])
    monkeypatch.setattr(pagecache.os, "posix_fadvise", lambda *a: None)  # advice ignored
    pf = pagecache.Prefetch([files], limit=3 * PIECE).start()
    pf._thread.join(timeout=30)
    assert pf.stop() == 3 * PIECE  # read, a piece at a time, after the advice came to nothing
    assert _resident(files[0], 0, 3 * PIECE) is True


def test_only_a_merge_through_the_cache_prefetches(tmp_path, tiny_family) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(m)} for m in tiny_family]},
    )
    parser = cli.build_parser()
    pf = cli._prefetch(parser.parse_args(["merge", str(recipe), str(tmp_path / "o")]))
    assert isinstance(pf, pagecache.Prefetch)
    assert [m for [m] in pf.models] == [m / "model.safetensors" for m in tiny_family]
    pf.stop()
    direct = ["merge", str(recipe), str(tmp_path / "o"), "--read", "direct"]
    assert cli._prefetch(parser.parse_args(direct)) is None
    bad = ["merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o")]
    assert cli._prefetch(parser.parse_args(bad)) is None
    assert cli._prefetch(parser.parse_args(["methods"])) is None


def test_a_command_line_merge_with_a_bad_recipe_still_reports_it(tmp_path) -> None:
    r = run_cli("merge", str(tmp_path / "missing.yaml"), str(tmp_path / "o"))
    assert r.returncode == 1
    assert "missing.yaml" in r.stderr
    assert not (tmp_path / "o").exists()


def test_prefetch_skips_a_path_with_a_nul(tmp_path) -> None:
    """A recipe path holding a NUL made the prefetch thread print a traceback (os.open raises
    ValueError, not OSError); the merge itself reports such a path in one line.
    """
    from merganser.storage.pagecache import _Stream

    good = tmp_path / "w.bin"
    good.write_bytes(b"x" * 10)
    s = _Stream([Path(str(tmp_path) + "/bad\0name"), good], 1 << 20)
    buf = memoryview(bytearray(1 << 16))
    while s.next_piece(buf) is not None:
        pass
