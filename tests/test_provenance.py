"""Input digests (storage/provenance.py): the same however a tensor's bytes arrive."""

from __future__ import annotations

import random

import torch
from blake3 import blake3

from merganser.storage.provenance import BLOCK, InputDigests


def test_a_tensor_split_anyhow_and_out_of_order_has_its_whole_digest() -> None:
    """Pieces that cut the 4 MiB blocks anywhere, in order or not, give the digest of the
    blocks hashed whole; no piece is left waiting at the end."""
    data = torch.randint(0, 256, (2 * BLOCK + 12_345,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    blocks = [bytes(data[a : a + BLOCK].numpy()) for a in range(0, data.numel(), BLOCK)]
    per = blake3(b"".join(blake3(b).digest() for b in blocks)).hexdigest()
    want = blake3(f"w:{data.numel()}:{per}\n".encode()).hexdigest()
    rng = random.Random(1)
    for shuffle in (False, True):
        cuts = sorted(rng.sample(range(1, data.numel()), 9))
        pieces = list(zip([0, *cuts], [*cuts, data.numel()], strict=True))
        if shuffle:
            rng.shuffle(pieces)
        d = InputDigests()
        for a, b in pieces:
            d.add(0, "w", data.numel(), a, data[a:b].clone())
        assert d.model_digest(0) == want
        assert not d._partial
