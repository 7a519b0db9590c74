"""The output writer: shards staged in blocks from many threads, hashed and written in order."""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from blake3 import blake3
from conftest import ties_recipe

import merganser
import merganser.storage.writer as writer
from merganser.storage.safetensors_header import read_header
from merganser.storage.writer import AtomicOutput, layout


@pytest.mark.parametrize("seed", range(6))
def test_writers_racing_over_shared_blocks_stage_every_byte(tmp_path, monkeypatch, seed) -> None:
    """Threads take chunks in file order, as the engine hands out work, and write them at once;
    chunks share staging blocks and several wait for the same block while staging is full. The
    files must come out byte for byte, with matching checksums, and nothing may hang.
    """
    rng = random.Random(seed)
    monkeypatch.setattr(writer, "STAGE_BLOCK", 64)
    monkeypatch.setattr(writer, "STAGE_LIMIT", 2)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i:03d}": torch.randint(0, 256, (rng.randint(1, 300),), dtype=torch.uint8, generator=g)
        for i in range(60)
    }
    shards, slots = layout(((n, tuple(t.shape), t.dtype) for n, t in tensors.items()), 3000)
    chunks: queue.SimpleQueue = queue.SimpleQueue()
    for name, t in tensors.items():
        start = 0
        while start < t.numel():
            n = rng.randint(1, 90)
            chunks.put((name, start, t[start : start + n]))
            start += n
    out = AtomicOutput(tmp_path / "out")
    out.open_shards(shards, slots)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                try:
                    name, start, data = chunks.get_nowait()
                except queue.Empty:
                    return
                out.write(name, data, start)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "writers hung"
    assert not errors
    out.close_shards()
    manifest = out.verify_and_index()
    assert len(manifest) > 1
    for shard in shards:
        data = (out.tmp / shard.filename).read_bytes()
        assert manifest[shard.filename]["blake3"] == blake3(data).hexdigest()
        infos, _ = read_header(out.tmp / shard.filename)
        for name, info in infos.items():
            got = torch.frombuffer(
                bytearray(data[info.start : info.start + info.nbytes]), dtype=torch.uint8
            )
            assert torch.equal(got, tensors[name])
    out.abort()


def _write_in_order(tmp_path, count: int, numel: int, shard_size: int) -> None:
    """Write ``count`` random tensors one after another, then check every shard's checksum."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i:03d}": torch.randint(0, 256, (numel,), dtype=torch.uint8, generator=g)
        for i in range(count)
    }
    shards, slots = layout(((n, tuple(t.shape), t.dtype) for n, t in tensors.items()), shard_size)
    out = AtomicOutput(tmp_path / "out")
    out.open_shards(shards, slots)
    for name, t in tensors.items():
        out.write(name, t, 0)
    out.close_shards()
    manifest = out.verify_and_index()
    for shard in shards:
        data = (out.tmp / shard.filename).read_bytes()
        assert manifest[shard.filename]["blake3"] == blake3(data).hexdigest()
    out.abort()


def test_the_stream_passes_a_block_before_its_write_can_free_it(tmp_path, monkeypatch) -> None:
    """``result()`` reads a missing block at or after the stream's next one as not yet staged,
    and would halt the stream: so the stream must move past a block before the block's write
    can free it. Writes that finish inside ``submit`` (the fastest a write can be) show it.
    """
    monkeypatch.setattr(writer, "STAGE_BLOCK", 64)
    monkeypatch.setattr(writer, "STAGE_LIMIT", 2)
    freed_early: list[tuple[int, int]] = []

    class InlineWrites:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def submit(self, fn, shard, block, *rest) -> None:
            fn(shard, block, *rest)
            stream = fn.__self__
            with stream._cv:
                if stream._next <= (shard, block):
                    freed_early.append((shard, block))

        def shutdown(self, wait: bool = True) -> None:
            pass

    monkeypatch.setattr(writer, "ThreadPoolExecutor", InlineWrites)
    _write_in_order(tmp_path, count=8, numel=200, shard_size=1000)
    assert freed_early == []


@pytest.mark.parametrize("fallocate", ["refused", "missing"])
def test_shards_are_sized_where_blocks_cannot_be_reserved(tmp_path, monkeypatch, fallocate):
    """File systems without fallocate (EOPNOTSUPP) and systems without posix_fallocate (macOS)
    still get whole, correct shards; other errors (a full disk) still fail.
    """
    import errno
    import os

    if fallocate == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:

        def refuse(fd, offset, size):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", refuse)
    t = torch.arange(5000, dtype=torch.float32)
    shards, slots = layout([("w", tuple(t.shape), t.dtype)], 10**9)
    out = AtomicOutput(tmp_path / "out")
    out.open_shards(shards, slots)
    out.write("w", t)
    out.close_shards()
    manifest = out.verify_and_index()
    data = (out.tmp / "model.safetensors").read_bytes()
    assert manifest["model.safetensors"]["blake3"] == blake3(data).hexdigest()
    info = read_header(out.tmp / "model.safetensors")[0]["w"]
    got = torch.frombuffer(bytearray(data[info.start : info.start + info.nbytes]), dtype=t.dtype)
    assert torch.equal(got, t)
    out.abort()


def test_a_full_disk_fails_when_the_shards_are_opened(tmp_path, monkeypatch) -> None:
    import errno
    import os

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    shards, slots = layout([("w", (10,), torch.float32)], 10**9)
    out = AtomicOutput(tmp_path / "out")
    with pytest.raises(OSError, match="No space left"):
        out.open_shards(shards, slots)
    out.abort()
    assert not any(tmp_path.iterdir())


def test_staging_stays_bounded_while_the_disk_writes_slowly(tmp_path, monkeypatch) -> None:
    """Results that come faster than the disk takes them wait: at most STAGE_LIMIT blocks are
    staged, WRITE_DEPTH more being written and the one the stream needs next, however far the
    writes fall behind (it had been 196 blocks here).
    """
    monkeypatch.setattr(writer, "STAGE_BLOCK", 64)
    monkeypatch.setattr(writer, "STAGE_LIMIT", 3)
    monkeypatch.setattr(writer, "WRITE_DEPTH", 2)
    peak = 0
    real_write = writer._ShardStream._write
    real_entry = writer._ShardStream._entry

    def slow_write(self, *args) -> None:
        time.sleep(0.01)
        real_write(self, *args)

    def counted_entry(self, *args):
        nonlocal peak
        entry = real_entry(self, *args)
        peak = max(peak, self._staged)
        return entry

    monkeypatch.setattr(writer._ShardStream, "_write", slow_write)
    monkeypatch.setattr(writer._ShardStream, "_entry", counted_entry)
    _write_in_order(tmp_path, count=40, numel=256, shard_size=10**6)
    assert 0 < peak <= writer.STAGE_LIMIT + writer.WRITE_DEPTH + 1, peak


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The names of the files and folders fsynced while the test runs, in order."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc to name a descriptor's file")
    names: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        names.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return names


def test_every_file_and_folder_is_synced_before_the_rename(tmp_path, synced) -> None:
    """Shards, written side files, copied tokenizer files, the temporary folder and the target's
    parent are each fsynced once, so a power cut cannot leave a partial output in place.
    """
    recipe = ties_recipe(tmp_path, {"a.w": (96, 64), "b.w": (64, 64), "c.w": (64,)}, seed=3)
    (Path(recipe["base_model"]) / "tokenizer.json").write_text('{"model": {}}')
    opts = merganser.MergeOptions(out_shard_size=20_000, progress=False)
    out = merganser.merge(recipe, tmp_path / "out", opts)
    files = sorted(p.name for p in out.iterdir())
    assert len(list(out.glob("model-*.safetensors"))) == 2 and "tokenizer.json" in files
    tmp_name = next(n for n in synced if ".merganser-tmp-" in n)
    assert sorted(synced) == sorted([*files, tmp_name, tmp_path.name])


def test_publish_syncs_then_replaces_the_target_whole(tmp_path, synced) -> None:
    """The zip, calibrate and search outputs: the new folder's files and the folders are synced
    before the target changes, and a previous target, folder or file, is gone without a trace.
    """

    def folder(name: str, **files: str) -> Path:
        (tmp_path / name).mkdir()
        for k, v in files.items():
            (tmp_path / name / k).write_text(v)
        return tmp_path / name

    target = folder("out", stale="x", a="old")
    writer.publish(folder(".new", a="1", b="2"), target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "1", "b": "2"}
    assert sorted(synced) == sorted(["a", "b", ".new", tmp_path.name])
    (tmp_path / "f").write_text("a file")
    writer.publish(folder(".dir", c="3"), tmp_path / "f")
    assert (tmp_path / "f" / "c").read_text() == "3"
    (tmp_path / ".g").write_text("new")
    writer.publish(tmp_path / ".g", tmp_path / "f" / "c")
    assert (tmp_path / "f" / "c").read_text() == "new"
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["f", "f/c", "out", "out/a", "out/b"]
