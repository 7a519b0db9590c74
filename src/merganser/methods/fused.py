"""Fused CPU kernels for the task-arithmetic core (TIES, DARE) and SLERP over stored bfloat16
blocks.

The torch path upcasts each block, then runs a dozen whole-block kernels (subtract, trim,
sign, elect, mask, sum, divide, add, cast), each a pass over memory. These numba kernels do the
same float32 operations, in the same order, one entry at a time straight from the stored
bfloat16 values, so the result is bit for bit that of ``generalized_task_arithmetic`` (checked
in tests/test_fused.py) at a fraction of the CPU time. They release the GIL, so the engine's
threads run them side by side.

SLERP's statistic, three float64 sums of exact products, is added up in another order than
torch's: its coefficients can differ from the torch path's in the last bits of a float64,
which changes a result only where a coefficient's float32 rounding falls on the boundary.

DARE's masks draw numpy's PCG64 words through ``PCG64Words`` wherever numba imports, whatever
the ``fused`` option: the same words, a third faster.

numba is a dependency; where it cannot be imported (or with ``fused: false`` in the engine
options) the torch path runs, with the same result.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from merganser.methods._fused_codes import (  # noqa: F401  (used as fused.KEEP etc.)
    DROP,
    FREQUENCY,
    KEEP,
    MASS,
    SCALE_DIV,
    SCALE_MUL,
    SCALE_NONE,
    SUM,
    TRIM,
    ZERO,
)


@functools.cache
def kernels() -> Any:
    """The compiled kernels module, or None where numba cannot be imported."""
    try:
        from merganser.methods import _fused_kernels
    except ImportError:
        return None
    return _fused_kernels


def available() -> bool:
    """Whether the fused kernels can run here."""
    return kernels() is not None


def supports(models: int, consensus: str | None) -> bool:
    """Whether the kernels give the torch path's bits for this many models and election: for
    any number, since both add the models in recipe order (task_vectors.ordered_sum).
    """
    return available() and models >= 1


def bits(t: torch.Tensor) -> np.ndarray:
    """A uint16 numpy view of a CPU bfloat16 tensor (no copy)."""
    return t.view(torch.int16).numpy().view(np.uint16)


@functools.cache
def wide() -> bool:
    """Whether numba compiles for this host and it has AVX-512 (``band_wide``)."""
    import llvmlite.binding
    import numba

    if not available() or numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return False  # another target: the x86 intrinsic might not be selectable there
    return bool(llvmlite.binding.get_host_cpu_features().get("avx512f"))


def band(
    x: torch.Tensor, base: torch.Tensor, lo: float, hi: float, out: np.ndarray
) -> tuple[int, int]:
    """|x − base| for bfloat16 blocks: writes the values in [lo, hi] to ``out`` and returns
    (how many, how many are above hi), as ``sparsify._band`` counts them.
    """
    # The wide kernel loads 16 entries at a time: it needs contiguous blocks.
    contiguous = x.is_contiguous() and base.is_contiguous()
    kernel = kernels().band_wide if wide() and contiguous else kernels().band
    return kernel(bits(x), bits(base), np.float32(lo), np.float32(hi), out)


def sample(xs: list[torch.Tensor], base: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """|x − base| at positions ``idx`` of bfloat16 segments, in float32, a row per x."""
    out = np.empty((len(xs), idx.numel()), np.float32)
    kernels().sample(tuple(bits(x) for x in xs), bits(base), idx.numpy(), out)
    return torch.from_numpy(out)


def l1_sums(
    x: torch.Tensor,
    base: torch.Tensor,
    words: np.ndarray,
    limit: int,
    packed: np.ndarray | None = None,
) -> tuple[float, float]:
    """(Σ|x − base|, the same over DARE's kept entries) of one block in float64, each summed
    as ``blockwise.sum64`` sums (entry j is kept where ``words[j] < limit``, BlockBernoulli);
    with ``packed``, also writes the mask a bit per entry (little bit order, as
    ``np.packbits(..., bitorder="little")``).
    """
    packed = np.zeros(0, np.uint8) if packed is None else packed
    before, after = kernels().l1_sums(bits(x), bits(base), words, np.uint32(limit), packed)
    return float(before), float(after)


def row_ranks(mag: torch.Tensor) -> torch.Tensor:
    """Each entry's position (float32) in a stable ascending sort of its row of the
    non-negative float32 ``mag`` (rows, cols): ``argsort(stable=True)``'s inverse, with equal
    values ranked in index order, NaN last.
    """
    out = torch.empty(mag.shape, dtype=torch.float32)
    kernels().row_ranks(mag.contiguous().numpy().view(np.uint32), out.numpy())
    return out


class Settings:
    """The per-model and merge settings of one fused merge; see ``merge``."""

    def __init__(self, n: int):
        self.mode = np.zeros(n, np.int64)
        self.thr = np.zeros(n, np.float32)
        self.short = np.zeros(n, np.int64)
        self.limit = np.zeros(n, np.uint32)
        self.scale_op = np.zeros(n, np.int64)
        self.scale = np.ones(n, np.float32)
        self.weight = np.ones(n, np.float32)
        self.consensus = SUM
        self.normalize = False
        self.unit = True
        self.min_weight = np.float32(1)
        self.total = np.float32(1)  # the divisor of an unelected normalized sum
        self.lambda_ = np.float32(1)

    def set_mix(
        self, weight: list[float], consensus: str | None, normalize: bool, lambda_: float
    ) -> None:
        """The mixing settings of ``generalized_task_arithmetic``."""
        self.weight[:] = weight
        self.unit = all(w == 1 for w in weight)
        self.consensus = {None: SUM, "mass": MASS, "frequency": FREQUENCY}[consensus]
        self.normalize = normalize
        self.min_weight = np.float32(min(weight))
        total = float(sum(weight))
        self.total = np.float32(total if abs(total) >= 1e-8 else 1.0)
        self.lambda_ = np.float32(lambda_)


def merge(
    p: Settings,
    xs: list[torch.Tensor],
    base: torch.Tensor,
    masks: list[np.ndarray | None],
    out: torch.Tensor,
) -> bool:
    """One block of ``generalized_task_arithmetic`` from bfloat16 inputs into the bfloat16
    ``out``; ``masks`` holds each DROP model's mask: its draws (uint32, BlockBernoulli.words),
    or the mask packed a bit per entry (uint8, ``magnitudes``). Trimmed models use up
    ``p.short`` (ties at the threshold kept lowest index first). False if any result is not
    finite.
    """
    k = kernels()
    words, packed = np.zeros(0, np.uint32), np.zeros(0, np.uint8)
    return k.merge(
        tuple(bits(x) for x in xs),
        bits(base),
        tuple(m if m is not None and m.dtype == np.uint32 else words for m in masks),
        tuple(m if m is not None and m.dtype == np.uint8 else packed for m in masks),
        p.mode,
        p.thr,
        p.short,
        p.limit,
        p.scale_op,
        p.scale,
        p.weight,
        p.consensus,
        p.normalize,
        p.unit,
        p.min_weight,
        p.total,
        p.lambda_,
        bits(out),
    )


def dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(‖a‖², ‖b‖², a·b) of bfloat16 blocks, summed in float64."""
    return kernels().dots(bits(a), bits(b))


def slerp(
    v0: torch.Tensor,
    v1: torch.Tensor,
    coef: tuple[float, float] | None,
    t: float,
    out: torch.Tensor,
) -> bool:
    """SLERP's ``_apply`` on bfloat16 blocks into the bfloat16 ``out``: c₀·v₀ + c₁·v₁, or
    ``torch.lerp(v0, v1, t)`` where ``coef`` is None. False if any result is not finite.
    """
    c0, c1 = coef if coef is not None else (0.0, 0.0)
    f = np.float32
    return kernels().slerp(bits(v0), bits(v1), f(c0), f(c1), coef is None, f(t), bits(out))


_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's LCG multiplier (numpy's)
_U128, _U64 = (1 << 128) - 1, (1 << 64) - 1


def _jump(m: int, inc: int) -> tuple[int, int]:
    """(A, C) such that m steps of PCG64's LCG take a state s to A·s + C (mod 2¹²⁸)."""
    a_total, c_total, a, c = 1, 0, _PCG_MULT, inc
    while m:
        if m & 1:
            a_total, c_total = (a_total * a) & _U128, (c_total * a + c) & _U128
        a, c = (a * a) & _U128, (c * a + c) & _U128
        m >>= 1
    return a_total, c_total


class PCG64Words:
    """numpy's ``PCG64.random_raw`` for one stream increment, drawn PCG_LANES lanes at a time
    in vector registers (the same words: tests/test_fused.py compares them).
    """

    def __init__(self, inc: int):
        self._step = _jump(1, inc)
        a, c = _jump(kernels().PCG_LANES, inc)
        self._lanes = tuple(np.uint64(v) for v in (a >> 64, a & _U64, c >> 64, c & _U64))

    def __call__(self, state: int, count: int) -> np.ndarray:
        """The next ``count`` raw 64-bit outputs of a generator in ``state``."""
        a, c = self._step
        lanes = []
        for _ in range(kernels().PCG_LANES):
            state = (a * state + c) & _U128  # numpy steps, then outputs the new state
            lanes.append(state)
        hs = np.array([s >> 64 for s in lanes], np.uint64)
        ls = np.array([s & _U64 for s in lanes], np.uint64)
        out = np.empty(count, np.uint64)
        kernels().pcg64(hs, ls, *self._lanes, out)
        return out
