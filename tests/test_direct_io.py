"""Reading around the page cache: O_DIRECT reads of cold ranges, cached ranges from the cache,
and the engine reading ahead of its compute threads."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import evict_or_skip, load_folder, random_models, write_model

import merganser
from merganser.pipeline import engine
from merganser.storage import direct_io, pagecache
from merganser.storage.checkpoint import Checkpoint


def _direct_fd(path: Path) -> int:
    fd = direct_io.open_direct(path, os.O_RDONLY)
    if fd is None:
        pytest.skip("this file system has no O_DIRECT")
    return fd


def _need_direct(path: Path) -> None:
    os.close(_direct_fd(path))


def _warm(path: Path) -> None:
    path.read_bytes()


@pytest.mark.parametrize(
    ("offset", "n"),
    [(0, 1), (1, 4095), (4095, 2), (4096, 8192), (123, 20_000), (8191, 16_385), (30_000, 4)],
)
def test_direct_reads_return_exactly_the_bytes_asked_for(tmp_path, monkeypatch, offset, n):
    # A bounce buffer of 8 KiB makes most of these take several aligned reads.
    monkeypatch.setattr(direct_io, "BOUNCE", 8192)
    monkeypatch.setattr(direct_io, "_bounce", direct_io._Bounce())
    data = os.urandom(40_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    fd = _direct_fd(path)
    try:
        dest = torch.full((n,), 7, dtype=torch.uint8)
        assert direct_io.pread_direct(fd, dest, offset) == n
        assert bytes(dest.numpy()) == data[offset : offset + n]
        # Past the end of the file the read comes back short.
        tail = torch.empty(100, dtype=torch.uint8)
        assert direct_io.pread_direct(fd, tail, len(data) - 30) == 30
        assert bytes(tail[:30].numpy()) == data[-30:]
    finally:
        os.close(fd)


def test_resident_tells_cold_ranges_from_cached_ones(tmp_path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    evict_or_skip(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 8192, 4096)  # caches pages 1-2 (and whatever readahead adds after them)
        assert pagecache.resident(fd, 4096, 8192) is True
        assert pagecache.resident(fd, 5000, 100) is True
        assert pagecache.resident(fd, 0, 4096) is False
    finally:
        os.close(fd)


def _family(tmp_path: Path) -> list[Path]:
    shapes = {f"layers.{i}.weight": (300, 257) for i in range(6)}
    return random_models(tmp_path, shapes, 3, 3, "m")


def _recipe(paths: list[Path]) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in paths[1:]],
    }


def _count_direct_reads(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = direct_io.pread_direct

    def spy(fd, dest, offset):
        calls.append(dest.numel())
        return real(fd, dest, offset)

    monkeypatch.setattr(direct_io, "pread_direct", spy)
    return calls


@pytest.mark.parametrize(
    ("mode", "cold", "read_ahead", "direct_expected"),
    [
        ("auto", True, 1, True),
        ("auto", False, 1, False),
        ("cache", True, 0, False),
        ("direct", False, 3, True),
    ],
)
def test_every_read_mode_merges_the_same_bytes(
    tmp_path, monkeypatch, mode, cold, read_ahead, direct_expected
) -> None:
    paths = _family(tmp_path)
    want = load_folder(merganser.merge(_recipe(paths), tmp_path / "ref"))
    files = [p / "model.safetensors" for p in paths]
    _need_direct(files[0])
    for f in files:
        evict_or_skip(f) if cold else _warm(f)
    calls = _count_direct_reads(monkeypatch)
    opts = merganser.MergeOptions(
        read_mode=mode, read_ahead=read_ahead, threads=2, memory_budget=100_000
    )
    got = load_folder(merganser.merge(_recipe(paths), tmp_path / "out", opts))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert bool(calls) == direct_expected
    if mode == "auto":
        # The merge left the cold inputs out of the page cache.
        fd = os.open(files[1], os.O_RDONLY)
        assert pagecache.resident(fd, 0, files[1].stat().st_size) is (not cold)
        os.close(fd)


def test_bytes_read_again_go_through_the_page_cache(tmp_path, monkeypatch) -> None:
    path = write_model(tmp_path / "m", {"w": torch.randn(1000, 100)})
    f = path / "model.safetensors"
    evict_or_skip(f)
    calls = _count_direct_reads(monkeypatch)
    with Checkpoint(path) as c:
        first = c.read("w", 0, 5000, again=True)
        assert calls == []
        assert torch.equal(c.read("w", 0, 5000), first)  # now cached: still no O_DIRECT
        assert calls == []
        assert torch.equal(c.read("w", 50_000, 5000), c.read("w").reshape(-1)[50_000:55_000])


def test_alignment_the_device_refuses_falls_back_to_the_page_cache(tmp_path, monkeypatch) -> None:
    t = torch.randn(500, 77)
    path = write_model(tmp_path / "m", {"w": t})
    _need_direct(path / "model.safetensors")

    def refused(fd, dest, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    calls = []
    monkeypatch.setattr(direct_io, "pread_direct", lambda *a: calls.append(1) or refused(*a))
    with Checkpoint(path, read_mode="direct") as c:
        assert torch.equal(c.read("w"), t)
        assert torch.equal(c.read("w", 1000, 10), t.reshape(-1)[1000:1010])
    assert len(calls) == 1  # refused once, then the page cache for this file


def test_read_errors_name_the_file(tmp_path, monkeypatch) -> None:
    path = write_model(tmp_path / "m", {"w": torch.randn(64, 64)})
    _need_direct(path / "model.safetensors")

    def failing(fd, dest, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(direct_io, "pread_direct", failing)
    c = Checkpoint(path, read_mode="direct")
    with c, pytest.raises(merganser.MerganserError, match=r"model\.safetensors: read failed"):
        c.read("w")


def test_an_unknown_read_mode_or_a_negative_read_ahead_is_refused(tmp_path) -> None:
    path = write_model(tmp_path / "m", {"w": torch.ones(2)})
    with pytest.raises(merganser.MerganserError, match="read mode 'fast': expected one of auto"):
        Checkpoint(path, read_mode="fast")  # type: ignore[arg-type]
    recipe = {"merge_method": "linear", "models": [{"model": str(path)}]}
    with pytest.raises(merganser.MerganserError, match="--read-ahead must be 0 or more"):
        merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(read_ahead=-1))
    assert not (tmp_path / "out").exists()


def test_the_cli_offers_exactly_the_read_modes() -> None:
    from merganser.cli import build_parser
    from merganser.storage.checkpoint import READ_MODES

    merge = build_parser()._subparsers._group_actions[0].choices["merge"]  # type: ignore[union-attr]
    read = next(a for a in merge._actions if "--read" in a.option_strings)
    assert tuple(read.choices) == READ_MODES
    assert read.default == merganser.MergeOptions().read_mode


def test_items_read_ahead_while_at_most_threads_compute(tmp_path) -> None:
    """With 2 compute threads reading 3 items ahead each, up to 8 items are in flight, but
    never more than 2 inside their compute slot."""
    lock = threading.Lock()
    state = {"in": 0, "computing": 0, "max_in": 0, "max_computing": 0}

    def fn(item, compute) -> None:
        with lock:
            state["in"] += 1
            state["max_in"] = max(state["max_in"], state["in"])
        time.sleep(0.02)  # "reading"
        with compute:
            with lock:
                state["computing"] += 1
                state["max_computing"] = max(state["max_computing"], state["computing"])
            time.sleep(0.01)
            with lock:
                state["computing"] -= 1
        with lock:
            state["in"] -= 1

    items = [engine.WorkItem(None, 0, 1, 1, True) for _ in range(40)]  # type: ignore[arg-type]
    opts = engine.EngineOptions(memory_budget=1 << 20, threads=2)
    engine._run_items(items, fn, opts, read_ahead=3)
    assert state["max_computing"] == 2
    assert 2 < state["max_in"] <= 8


def _blockwise_family(tmp_path: Path) -> dict:
    paths = random_models(tmp_path, {f"w{i}": (1100, 300) for i in range(3)}, 4, 5, "b")
    return {
        "merge_method": "ties",
        "base_model": str(paths[0]),
        "dtype": "bfloat16",
        "models": [{"model": str(p)} for p in paths[1:]],
        "parameters": {"density": 0.4},
    }


def test_a_block_merge_reads_its_inputs_side_by_side(tmp_path, monkeypatch) -> None:
    """--read-streams: a TIES tensor's four inputs are read on the I/O threads (more reads in
    flight), with the output of reading them one at a time."""
    recipe = _blockwise_family(tmp_path)
    names: list[str] = []
    real = Checkpoint.read

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        names.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", spy)
    outs = {}
    for streams in (1, 4):
        names.clear()
        opts = merganser.MergeOptions(read_streams=streams, threads=2)
        outs[streams] = load_folder(merganser.merge(recipe, tmp_path / f"o{streams}", opts))
        on_io = sum(n.startswith("read") for n in names)
        assert on_io == (0 if streams == 1 else len(names)), (streams, names)
    for k in outs[1]:
        assert torch.equal(outs[1][k].view(torch.int16), outs[4][k].view(torch.int16)), k


def test_a_failed_side_by_side_read_stops_the_merge_with_its_error(tmp_path, monkeypatch) -> None:
    recipe = _blockwise_family(tmp_path)
    real = Checkpoint.read

    def failing(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "w1" and threading.current_thread().name.startswith("read"):
            raise merganser.MerganserError(f"{self.path}: read failed (Input/output error)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", failing)
    with pytest.raises(merganser.MerganserError, match="read failed"):
        merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(threads=2))
    assert not (tmp_path / "out").exists()
    with pytest.raises(merganser.MerganserError, match="--read-streams must be 1 or more"):
        merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(read_streams=0))
