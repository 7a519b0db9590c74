"""The output writer: shards staged in blocks from many threads, hashed and written in order."""

from __future__ import annotations

import queue
import random
import threading
import time

import pytest
import torch
from blake3 import blake3

import merganser.writer as writer
from merganser.safetensors_header import read_header
from merganser.writer import AtomicOutput, layout


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
