"""Content digests of the input tensors, computed from the bytes the engine reads anyway.

Each tensor is hashed in fixed 4 MiB blocks, so the digest is the same however the engine
chunks the tensor, whatever the memory budget or thread count; blocks split across work items
are assembled before hashing. A model's digest covers the tensors the merge used. The hash is
BLAKE3: as sound as sha256 and about four times faster here, which matters when every input
byte of a merge passes through it (sha256 cost a 1B-parameter merge a quarter of its time).
"""

from __future__ import annotations

import threading

import torch
from blake3 import blake3

ALGORITHM = "blake3 over 4 MiB tensor blocks"

BLOCK = 4 << 20


class InputDigests:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[tuple[int, str], dict[int, bytes]] = {}
        self._partial: dict[tuple[int, str, int], dict[int, bytes]] = {}
        self._sizes: dict[tuple[int, str], int] = {}

    def add(self, ckpt: int, name: str, total: int, offset: int, raw: torch.Tensor) -> None:
        """Record ``raw`` (bytes [offset, offset+len) of a tensor of ``total`` bytes)."""
        data = memoryview(raw.contiguous().reshape(-1).view(torch.uint8).numpy())
        key = (ckpt, name)
        pos, end = offset, offset + len(data)
        while pos < end:
            b = pos // BLOCK
            b_start, b_end = b * BLOCK, min((b + 1) * BLOCK, total)
            seg_end = min(end, b_end)
            seg = data[pos - offset : seg_end - offset]
            if pos == b_start and seg_end == b_end:
                digest = blake3(seg).digest()
                with self._lock:
                    self._blocks.setdefault(key, {})[b] = digest
                    self._sizes[key] = total
            else:
                self._add_piece(key, b, b_start, b_end, pos, bytes(seg), total)
            pos = seg_end
        if total == 0:
            with self._lock:
                self._blocks.setdefault(key, {})
                self._sizes[key] = 0

    def _add_piece(
        self,
        key: tuple[int, str],
        b: int,
        b_start: int,
        b_end: int,
        pos: int,
        piece: bytes,
        total: int,
    ) -> None:
        with self._lock:
            pieces = self._partial.setdefault((*key, b), {})
            pieces[pos] = piece
            if sum(len(p) for p in pieces.values()) < b_end - b_start:
                return
            whole = b"".join(pieces[k] for k in sorted(pieces))
            del self._partial[(*key, b)]
            self._blocks.setdefault(key, {})[b] = blake3(whole).digest()
            self._sizes[key] = total

    def model_digest(self, ckpt: int) -> str:
        """BLAKE3 over ``name:bytes:blake3(block hashes)`` lines of the tensors read from ckpt."""
        h = blake3()
        for (c, name), blocks in sorted(self._blocks.items()):
            if c != ckpt:
                continue
            per = blake3(b"".join(blocks[i] for i in sorted(blocks))).hexdigest()
            h.update(f"{name}:{self._sizes[c, name]}:{per}\n".encode())
        return h.hexdigest()
