"""The numba kernels behind ``fused`` (imported only when numba is installed).

Each line mirrors a torch operation of the reference path, with its float32 semantics:
``torch.sign`` maps ±0 and NaN to +0, ``clamp(min=0)`` keeps −0 and NaN, ``F.threshold`` keeps
NaN, a sum over stacked models starts at +0 and adds them in order, a scalar multiply or divide
rounds the scalar to float32 first, ``add(alpha=)`` and ``lerp`` are fused multiply-adds on the
CPU, and bfloat16 rounds to nearest even.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from merganser.methods._fused_codes import DROP, MASS, SCALE_DIV, SCALE_MUL, SUM, TRIM, ZERO


@intrinsic
def _as_float(typingctx, word):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the low 32 bits of an integer."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        v = args[0]
        width = v.type.width
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(word), codegen


@intrinsic
def _as_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The bits of a float32, as a uint32."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """a·b + c in float32, rounded once (torch's CPU kernels use FMA instructions)."""

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f, [f] * 3), "llvm.fma.f32"
        )
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _f32(b: np.uint16) -> np.float32:
    return _as_float(np.uint32(b) << np.uint32(16))


@njit(inline="always")
def _bf16(v: np.float32) -> np.uint16:
    if v != v:
        return np.uint16(0x7FC0)
    u = np.uint64(_as_bits(v))
    u = u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))
    return np.uint16((u >> np.uint64(16)) & np.uint64(0xFFFF))


@njit(inline="always")
def _sign(v: np.float32) -> np.float32:
    return np.float32(v > 0) - np.float32(v < 0)


@njit(nogil=True, cache=True)
def band(x, base, lo, hi, out):  # type: ignore[no-untyped-def]
    # Branch-free: with lo near the median, a branch on it would be mispredicted half the time.
    nb = 0
    above = 0
    for j in range(base.size):
        a = abs(_f32(x[j]) - _f32(base[j]))
        out[nb] = a
        nb += (a >= lo) & (a <= hi)
        above += a > hi
    return nb, above


LANES = 16  # float32 lanes of an AVX-512 vector


@intrinsic
def _band_step(typingctx, x, base, j, lo, hi, out, nb):  # type: ignore[no-untyped-def]
    """``band``'s loop body for entries [j, j + 16) in AVX-512 registers: the magnitudes in
    [lo, hi], compressed in order (vcompressps to a register, then one store of all 16 lanes
    at out[nb]: the memory form is microcoded and slow on AMD), and (in band, above hi).
    Only for x86 hosts with AVX-512 (``fused.band`` checks): there is no portable lowering of
    the register form.
    """
    sig = types.UniTuple(types.int64, 2)(x, base, j, lo, hi, out, nb)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        xa, ba, j, lo, hi, oa, nb = args
        xt, bt, _, _, _, ot, _ = sig.args
        i16v, i32v = ir.VectorType(ir.IntType(16), LANES), ir.VectorType(ir.IntType(32), LANES)
        f32v = ir.VectorType(ir.FloatType(), LANES)

        def load(aryty, ary):  # type: ignore[no-untyped-def]
            data = context.make_array(aryty)(context, builder, ary).data
            v = builder.load(builder.bitcast(builder.gep(data, [j]), i16v.as_pointer()), align=2)
            v = builder.shl(builder.zext(v, i32v), ir.Constant(i32v, [16] * LANES))
            return builder.bitcast(v, f32v)

        def splat(s):  # type: ignore[no-untyped-def]
            v = ir.Constant(f32v, ir.Undefined)
            for i in range(LANES):
                v = builder.insert_element(v, s, ir.Constant(ir.IntType(32), i))
            return v

        def intrinsic(name, ret, *argv):  # type: ignore[no-untyped-def]
            fnty = ir.FunctionType(ret, [a.type for a in argv])
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), argv)

        a = intrinsic("llvm.fabs.v16f32", f32v, builder.fsub(load(xt, xa), load(bt, ba)))
        vhi = splat(hi)
        inside = builder.and_(
            builder.fcmp_ordered(">=", a, splat(lo)), builder.fcmp_ordered("<=", a, vhi)
        )
        above = builder.fcmp_ordered(">", a, vhi)
        packed = intrinsic("llvm.x86.avx512.mask.compress.v16f32", f32v, a, a, inside)
        data = context.make_array(ot)(context, builder, oa).data
        builder.store(packed, builder.bitcast(builder.gep(data, [nb]), f32v.as_pointer()), align=4)
        i16, i64 = ir.IntType(16), ir.IntType(64)
        counts = [
            builder.zext(intrinsic("llvm.ctpop.i16", i16, builder.bitcast(m, i16)), i64)
            for m in (inside, above)
        ]
        return context.make_tuple(builder, sig.return_type, counts)

    return sig, codegen


@njit(nogil=True, cache=True)
def band_wide(x, base, lo, hi, out):  # type: ignore[no-untyped-def]
    # ``band`` 16 entries a step; each step's store stays inside ``out``, as nb <= j.
    nb = 0
    above = 0
    whole = base.size - base.size % LANES
    for j in range(0, whole, LANES):
        inside, over = _band_step(x, base, j, lo, hi, out, nb)
        nb += inside
        above += over
    tail, over = band(x[whole:], base[whole:], lo, hi, out[nb:])
    return nb + tail, above + over


# Every model at once: the gather waits on memory, and the base's entry is fetched once.
@njit(nogil=True, cache=True)
def sample(xs, base, idx, out):  # type: ignore[no-untyped-def]
    for k in range(idx.size):
        j = idx[k]
        b = _f32(base[j])
        for i in range(len(xs)):
            out[i, k] = abs(_f32(xs[i][j]) - b)


RADIX = 11  # bits of a key each histogram pass of ``kth_largest`` settles


@njit(nogil=True, cache=True)
def kth_largest(values, rank):  # type: ignore[no-untyped-def]
    """(the rank-th largest of float32 values that are >= +0, with no -0 or NaN, how many are
    larger), by radix selection on their bits, which order such floats as integers. TIES's
    band holds few distinct values, each many times over, where torch.kthvalue's quickselect
    slows down.
    """
    keys = values.view(np.uint32)
    low = keys.min()
    spread = np.uint64(keys.max() - low)
    width = 0  # bits of (key - low) that still vary among the candidates
    while spread >> np.uint64(width):
        width += 1
    bins = 1 << RADIX
    # Four interleaved histograms: a run of equal keys would otherwise wait on each count.
    hist = np.zeros(4 * (bins + 1), np.int64)
    over = 0
    while True:
        shift = max(width - RADIX, 0)
        hist[:] = 0
        span = np.uint64(1) << np.uint64(width)
        for j in range(keys.size):
            d = np.uint64(keys[j] - low)  # candidates: low <= key < low + 2^width
            b = (d >> np.uint64(shift)) if d < span else np.uint64(bins)  # else a spare bin
            hist[(j & 3) * (bins + 1) + b] += 1
        top = 1 << (width - shift)
        b = top - 1
        while True:
            count = hist[b] + hist[bins + 1 + b] + hist[2 * (bins + 1) + b]
            count += hist[3 * (bins + 1) + b]
            if count >= rank:
                break
            rank -= count
            over += count
            b -= 1
        low += np.uint32(b << shift)
        width = shift
        if width == 0:
            return _as_float(low), over


# numpy's pairwise summation (``np.add.reduce`` of a contiguous float64 vector): ranges longer
# than PAIRWISE split in two at a multiple of 8 below the middle; a shorter range of at least 8
# sums in 8 interleaved lanes, added ((0+1)+(2+3))+((4+5)+(6+7)), then its tail in order.
PAIRWISE = 128


@intrinsic
def _l1_full_leaf(typingctx, x, base, words, limit, lo, packed, pack):  # type: ignore[no-untyped-def]
    """``_pairwise_leaf`` of the magnitudes |x − base| and of their kept part over the
    PAIRWISE entries from ``lo``, in vector registers: numpy's 8 lanes are one vector of 8
    float64 sums per statistic, each lane adding its entries in order, as numpy's do. With
    ``pack``, also the keep bits, a byte per 8 entries (lane k is bit k) from packed[lo / 8].
    """
    sig = types.UniTuple(types.float64, 2)(x, base, words, limit, lo, packed, pack)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        xa, ba, wa, limit, lo, pa, pack = args
        xt, bt, wt, _, _, pt, _ = sig.args
        pdata = context.make_array(pt)(context, builder, pa).data
        i16v, i32v = ir.VectorType(ir.IntType(16), 8), ir.VectorType(ir.IntType(32), 8)
        f32v, f64v = ir.VectorType(ir.FloatType(), 8), ir.VectorType(ir.DoubleType(), 8)

        def load(aryty, ary, vt, at, align):  # type: ignore[no-untyped-def]
            data = context.make_array(aryty)(context, builder, ary).data
            return builder.load(
                builder.bitcast(builder.gep(data, [at]), vt.as_pointer()), align=align
            )

        def widen(v):  # type: ignore[no-untyped-def]  # bfloat16 bits -> float32
            return builder.bitcast(
                builder.shl(builder.zext(v, i32v), ir.Constant(i32v, [16] * 8)), f32v
            )

        fabs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(f32v, [f32v]), "llvm.fabs.v8f32"
        )
        vlimit = ir.Constant(i32v, ir.Undefined)
        for k in range(8):
            vlimit = builder.insert_element(vlimit, limit, ir.Constant(ir.IntType(32), k))
        one, zero = ir.Constant(f32v, [1.0] * 8), ir.Constant(f32v, [0.0] * 8)
        acc_m = acc_k = ir.Constant(f64v, [0.0] * 8)  # +0 + v is v: numpy's first row
        for step in range(PAIRWISE // 8):
            at = builder.add(lo, ir.Constant(lo.type, 8 * step))
            a = builder.call(fabs, [builder.fsub(widen(load(xt, xa, i16v, at, 2)),
                                                 widen(load(bt, ba, i16v, at, 2)))])  # fmt: skip
            keep = builder.icmp_unsigned("<", load(wt, wa, i32v, at, 4), vlimit)
            kept = builder.fmul(a, builder.select(keep, one, zero))  # mask_'s d x keep
            with builder.if_then(pack):
                byte = builder.lshr(at, ir.Constant(at.type, 3))
                builder.store(builder.bitcast(keep, ir.IntType(8)), builder.gep(pdata, [byte]))
            acc_m = builder.fadd(acc_m, builder.fpext(a, f64v))
            acc_k = builder.fadd(acc_k, builder.fpext(kept, f64v))

        def total(v):  # type: ignore[no-untyped-def]  # ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))
            r = [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in range(8)]
            pairs = [builder.fadd(r[k], r[k + 1]) for k in range(0, 8, 2)]
            return builder.fadd(builder.fadd(pairs[0], pairs[1]), builder.fadd(pairs[2], pairs[3]))

        return context.make_tuple(builder, sig.return_type, [total(acc_m), total(acc_k)])

    return sig, codegen


@njit(nogil=True, cache=True)
def l1_sums(x, base, words, limit, packed):  # type: ignore[no-untyped-def]
    """Σ|x − base| and Σ|x − base|·keep (keep: ``words[j] < limit``) in float64, each in
    numpy's pairwise order; with ``packed``, the keep bits a bit per entry.
    """
    size = base.size
    mag = np.empty(PAIRWISE)
    kept = np.empty(PAIRWISE)
    # A block of 2^k full leaves (every BLOCK) is one tree of full leaves, which pack as
    # they sum; any other size packs in a loop of its own.
    pack = packed.size > 0 and size >= PAIRWISE and _full_leaves(size)
    leaves = np.empty((max(size // PAIRWISE, 1), 2))
    # The recursion, unrolled: a stack of ranges to sum (n < 0 marks "add the last two").
    los = np.empty(192, np.int64)
    ns = np.empty(192, np.int64)
    sums = np.empty((64, 2))
    los[0], ns[0], top, done = 0, size, 1, 0
    while top:
        top -= 1
        lo, n = los[top], ns[top]
        if n < 0:
            done -= 1
            sums[done - 1, 0] = sums[done - 1, 0] + sums[done, 0]
            sums[done - 1, 1] = sums[done - 1, 1] + sums[done, 1]
        elif n <= PAIRWISE or _full_leaves(n):
            s, k = _l1_tree(x, base, words, limit, lo, n, mag, kept, leaves, packed, pack)
            sums[done, 0], sums[done, 1] = s, k
            done += 1
        else:
            half = n // 2
            half -= half % 8
            los[top], ns[top] = 0, -1
            los[top + 1], ns[top + 1] = lo + half, n - half
            los[top + 2], ns[top + 2] = lo, half
            top += 3
    whole = size >> 3 if packed.size and not pack else 0
    for q in range(whole):
        packed[q] = _kept_bits(words, 8 * q, 8, limit)
    if packed.size > whole and not pack:
        packed[whole] = _kept_bits(words, 8 * whole, size - 8 * whole, limit)
    return (sums[0, 0], sums[0, 1]) if size else (0.0, 0.0)


@njit(inline="always")
def _full_leaves(n):  # type: ignore[no-untyped-def]
    """Whether n is 2^k full leaves: numpy's recursion then halves it evenly down to them."""
    m = n // PAIRWISE
    return n % PAIRWISE == 0 and m & (m - 1) == 0


@njit(inline="always")
def _l1_tree(x, base, words, limit, lo, n, mag, kept, leaves, packed, pack):  # type: ignore[no-untyped-def]
    """The pairwise sums of entries [lo, lo + n) where n is a leaf, or 2^k full leaves: the
    recursion then halves evenly, so the leaves' sums are added pairwise, level by level.
    """
    if n < PAIRWISE:
        _l1_leaf(x[lo : lo + n], base[lo : lo + n], words[lo : lo + n], limit, mag, kept)
        return _pairwise_leaf(mag, n), _pairwise_leaf(kept, n)
    for leaf in range(n // PAIRWISE):
        at = lo + PAIRWISE * leaf
        leaves[leaf, 0], leaves[leaf, 1] = _l1_full_leaf(x, base, words, limit, at, packed, pack)
    width = n // PAIRWISE
    while width > 1:
        width //= 2
        for i in range(width):
            leaves[i, 0] = leaves[2 * i, 0] + leaves[2 * i + 1, 0]
            leaves[i, 1] = leaves[2 * i, 1] + leaves[2 * i + 1, 1]
    return leaves[0, 0], leaves[0, 1]


# Not inlined: inside the summing loop LLVM would not vectorise it (4x slower).
@njit(inline="never")
def _l1_leaf(x, base, words, limit, mag, kept):  # type: ignore[no-untyped-def]
    for j in range(base.size):
        a = abs(_f32(x[j]) - _f32(base[j]))
        mag[j] = np.float64(a)
        kept[j] = np.float64(a * np.float32(words[j] < limit))  # mask_'s d × keep


@njit(inline="always")
def _pairwise_leaf(a, n):  # type: ignore[no-untyped-def]
    if n < 8:
        s = 0.0
        for j in range(n):
            s += a[j]
        return s
    r0, r1, r2, r3, r4, r5, r6, r7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    m = n - n % 8
    for i in range(8, m, 8):
        r0 += a[i]
        r1 += a[i + 1]
        r2 += a[i + 2]
        r3 += a[i + 3]
        r4 += a[i + 4]
        r5 += a[i + 5]
        r6 += a[i + 6]
        r7 += a[i + 7]
    s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    for j in range(m, n):
        s += a[j]
    return s


@njit(inline="always")
def _kept_bits(words, start, n, limit):  # type: ignore[no-untyped-def]
    """DARE's keep bits ``words[start + r] < limit`` for r < n as one byte (little bit order)."""
    b = np.uint32(0)
    for r in range(n):
        b |= np.uint32(words[start + r] < limit) << np.uint32(r)
    return np.uint8(b)


@njit(inline="always")
def _unpack(packed, c, out):  # type: ignore[no-untyped-def]
    """The first ``c`` bits of a packed mask (little bit order) as float32 0s and 1s."""
    for q in range((c + 7) >> 3):
        b = np.uint32(packed[q])
        for r in range(8):  # constant shifts: vectorised, unlike a shift by j & 7
            out[8 * q + r] = np.float32((b >> np.uint32(r)) & np.uint32(1))


@njit(inline="always")
def _trim(x, b, c, t, short, i, row):  # type: ignore[no-untyped-def]
    """TIES's trim of one chunk: keep |δ| > t and the first ``short[i]`` entries equal to t."""
    zero = np.float32(0)
    if short[i] > 0:
        ties = 0
        for j in range(c):
            ties += abs(_f32(x[j]) - _f32(b[j])) == t
        if ties <= short[i]:  # every tie in the chunk is kept: keep |δ| >= t
            short[i] -= ties
            for j in range(c):
                v = _f32(x[j]) - _f32(b[j])
                a = abs(v)
                row[j] = np.copysign(zero if a < t else a, v)
            return
        for j in range(c):  # the quota runs out inside this chunk
            v = _f32(x[j]) - _f32(b[j])
            a = abs(v)
            if a <= t:
                if a == t and short[i] > 0:
                    short[i] -= 1
                else:
                    a = zero
            row[j] = np.copysign(a, v)
        return
    for j in range(c):
        v = _f32(x[j]) - _f32(b[j])
        a = abs(v)
        row[j] = np.copysign(zero if a <= t else a, v)  # F.threshold keeps NaN


CHUNK = 512  # entries per step: every model's row of a chunk stays in the L1 cache


@njit(nogil=True, cache=True, error_model="numpy")
def merge(  # type: ignore[no-untyped-def]
    xs,
    base,
    words,
    packed,
    mode,
    thr,
    short,
    limit,
    scale_op,
    scale,
    weight,
    consensus,
    normalize,
    unit,
    min_weight,
    total,
    lambda_,
    out,
):
    n = len(xs)
    size = base.size
    zero = np.float32(0)
    one = np.float32(1)
    big = np.float32(3.4028234663852886e38)
    d = np.empty((n, CHUNK), np.float32)
    mixed = np.empty(CHUNK, np.float32)
    div = np.empty(CHUNK, np.float32)
    el = np.empty(CHUNK, np.float32)
    kept = np.empty(CHUNK, np.float32)
    bad = 0
    for c0 in range(0, size, CHUNK):
        c = min(CHUNK, size - c0)
        b = base[c0 : c0 + c]
        # Each model's sparsified, rescaled, weighted delta (the torch path's order).
        for i in range(n):
            x = xs[i][c0 : c0 + c]
            row = d[i]
            m = mode[i]
            if m == ZERO:
                row[:c] = zero
            elif m == TRIM:
                _trim(x, b, c, thr[i], short, i, row)
            elif m == DROP and packed[i].size:  # the mask as the l1 pass packed it
                _unpack(packed[i][c0 >> 3 :], c, kept)  # CHUNK is a multiple of 8
                for j in range(c):
                    row[j] = (_f32(x[j]) - _f32(b[j])) * kept[j]
            elif m == DROP:
                w = words[i][c0 : c0 + c]
                lim = limit[i]
                for j in range(c):
                    v = _f32(x[j]) - _f32(b[j])
                    row[j] = v * np.float32(w[j] < lim)  # mask_'s d × keep, branch-free
            else:
                for j in range(c):
                    row[j] = _f32(x[j]) - _f32(b[j])
            if scale_op[i] == SCALE_DIV:
                s = scale[i]
                for j in range(c):
                    row[j] = row[j] / s
            elif scale_op[i] == SCALE_MUL:
                s = scale[i]
                for j in range(c):
                    row[j] = row[j] * s
            if weight[i] != 1:
                s = weight[i]
                for j in range(c):
                    row[j] = row[j] * s
        if consensus == SUM:
            for j in range(c):
                mixed[j] = d[0, j]
            for i in range(1, n):
                for j in range(c):
                    mixed[j] = mixed[j] + d[i, j]
            if normalize:
                for j in range(c):
                    mixed[j] = mixed[j] / total
        else:
            # Elect: +1 where the total is >= 0 or NaN (torch.sign(NaN) is 0), else -1.
            # Loop-invariant tests stay outside the loops over j, which then vectorise.
            for j in range(c):
                el[j] = zero
            for i in range(n):
                if consensus == MASS:
                    for j in range(c):
                        el[j] = el[j] + d[i, j]
                else:
                    for j in range(c):
                        el[j] = el[j] + _sign(d[i, j])
            for j in range(c):
                el[j] = -one if el[j] < 0 else one
            for j in range(c):
                mixed[j] = zero
                div[j] = zero
            for i in range(n):
                w = one if unit else weight[i]
                for j in range(c):
                    v = d[i, j]
                    a = _sign(v) * el[j]
                    a = zero if a < 0 else a  # clamp(min=0) keeps -0
                    mixed[j] = mixed[j] + v * a
                    div[j] = div[j] + a * w  # a·1 is a, -0 included
            if normalize and min_weight > 0:
                for j in range(c):
                    q = div[j]
                    mixed[j] = mixed[j] / (min_weight if q < min_weight else q)
            elif normalize:
                for j in range(c):
                    q = div[j]
                    mixed[j] = mixed[j] / (one if q == 0 else q)
        o = out[c0 : c0 + c]
        for j in range(c):
            r = mixed[j]
            if lambda_ != 1:
                r = r * lambda_
            r = r + _f32(b[j])
            bad += not (abs(r) <= big)
            o[j] = _bf16(r)
    return bad == 0


# Reassociation lets LLVM vectorise the float64 sums: products of bfloat16 values are exact in
# float64, so only the order of the additions differs from the torch path's.
@njit(nogil=True, cache=True, fastmath={"reassoc"})
def dots(a, b):  # type: ignore[no-untyped-def]
    saa = sbb = sab = 0.0
    for j in range(a.size):
        x = np.float64(_f32(a[j]))
        y = np.float64(_f32(b[j]))
        saa += x * x
        sbb += y * y
        sab += x * y
    return saa, sbb, sab


@njit(nogil=True, cache=True)
def slerp(v0, v1, c0, c1, linear, t, out):  # type: ignore[no-untyped-def]
    big = np.float32(3.4028234663852886e38)
    bad = 0
    small = abs(t) < np.float32(0.5)
    for j in range(v0.size):
        x = _f32(v0[j])
        y = _f32(v1[j])
        if linear:  # torch.lerp
            r = _fma(t, y - x, x) if small else _fma(t - np.float32(1), y - x, y)
        else:  # (v0 * c0).add_(v1, alpha=c1)
            r = _fma(y, c1, x * c0)
        bad += not (abs(r) <= big)
        out[j] = _bf16(r)
    return bad == 0


@njit(inline="always")
def _xsl_rr(hi, lo):  # type: ignore[no-untyped-def]
    """PCG64's output of a 128-bit state: the halves xor-ed, rotated by the top 6 bits."""
    rot = hi >> np.uint64(58)
    x = hi ^ lo
    return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))


PCG_LANES = 16  # streams side by side: two AVX-512 vectors, whose steps overlap (faster than one)


@intrinsic
def _pcg_step(typingctx, hs, ls, ah, al, ch, cl, out, i):  # type: ignore[no-untyped-def]
    """One step of PCG_LANES interleaved PCG64 streams as vector operations: out[i + k] is
    lane k's output (XSL-RR of its 128-bit state), then each state s becomes a·s + c (mod
    2¹²⁸). The 64x64 -> 128-bit products are built from 32-bit halves, which vectorise
    (numba leaves LLVM's SLP vectoriser off, so scalar lanes would not).
    """
    sig = types.void(hs, ls, ah, al, ch, cl, out, i)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ha, la, ah, al, ch, cl, oa, i = args
        vt = ir.VectorType(ir.IntType(64), PCG_LANES)

        def ptr(aryty, ary, at):  # type: ignore[no-untyped-def]
            data = context.make_array(aryty)(context, builder, ary).data
            return builder.bitcast(builder.gep(data, [at]), vt.as_pointer())

        def const(v):  # type: ignore[no-untyped-def]
            return ir.Constant(vt, [v] * PCG_LANES)

        def splat(x):  # type: ignore[no-untyped-def]
            v = ir.Constant(vt, ir.Undefined)
            for k in range(PCG_LANES):
                v = builder.insert_element(v, x, ir.Constant(ir.IntType(32), k))
            return v

        zero = ir.Constant(ir.IntType(64), 0)
        hp, lp = ptr(sig.args[0], ha, zero), ptr(sig.args[1], la, zero)
        hi, lo = builder.load(hp, align=8), builder.load(lp, align=8)
        # The output: (hi ^ lo) rotated right by hi's top 6 bits.
        rot = builder.lshr(hi, const(58))
        x = builder.xor(hi, lo)
        left = builder.and_(builder.sub(const(64), rot), const(63))
        word = builder.or_(builder.lshr(x, rot), builder.shl(x, left))
        builder.store(word, ptr(sig.args[6], oa, i), align=8)
        # The step: lo' = lo·al + cl, hi' = mulhi(lo, al) + lo·ah + hi·al + ch + carry.
        vah, val, vch, vcl = splat(ah), splat(al), splat(ch), splat(cl)
        m32 = const(0xFFFFFFFF)
        l0, l1 = builder.and_(lo, m32), builder.lshr(lo, const(32))
        a0, a1 = builder.and_(val, m32), builder.lshr(val, const(32))
        p00, p01 = builder.mul(l0, a0), builder.mul(l0, a1)
        p10, p11 = builder.mul(l1, a0), builder.mul(l1, a1)
        mid = builder.add(
            builder.add(builder.lshr(p00, const(32)), builder.and_(p01, m32)),
            builder.and_(p10, m32),
        )
        mulhi = builder.add(
            builder.add(p11, builder.lshr(p01, const(32))),
            builder.add(builder.lshr(p10, const(32)), builder.lshr(mid, const(32))),
        )
        pl = builder.mul(lo, val)
        nl = builder.add(pl, vcl)
        carry = builder.zext(builder.icmp_unsigned("<", nl, pl), vt)
        ph = builder.add(builder.add(mulhi, builder.mul(lo, vah)), builder.mul(hi, val))
        nh = builder.add(builder.add(ph, vch), carry)
        builder.store(nh, hp, align=8)
        builder.store(nl, lp, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True)
def pcg64(hs, ls, ah, al, ch, cl, out):  # type: ignore[no-untyped-def]
    """PCG_LANES interleaved PCG64 streams into ``out``: lane k starts in state (hs[k], ls[k])
    and each step advances it by (a, c), PCG_LANES steps of the stream."""
    h, lo = hs.copy(), ls.copy()
    n = out.size
    whole = n - n % PCG_LANES
    for i in range(0, whole, PCG_LANES):
        _pcg_step(h, lo, ah, al, ch, cl, out, i)
    for r in range(n - whole):
        out[whole + r] = _xsl_rr(h[r], lo[r])


@njit(nogil=True, cache=True)
def row_ranks(keys, out):  # type: ignore[no-untyped-def]
    """Each entry's position in a stable ascending sort of its row: ``keys`` are the float32
    bits of non-negative magnitudes (their order as integers is their order as floats, NaN
    last), sorted by a least-significant-digit radix sort, 8 bits a pass, which keeps equal
    keys in index order; a pass whose digit is the same for the whole row is skipped.
    """
    rows, cols = keys.shape
    ka, kb = np.empty(cols, np.uint32), np.empty(cols, np.uint32)
    ia, ib = np.empty(cols, np.int64), np.empty(cols, np.int64)
    counts = np.empty((4, 256), np.int64)
    for r in range(rows):
        counts[:] = 0
        for j in range(cols):
            k = keys[r, j]
            ka[j] = k
            ia[j] = j
            for d in range(4):
                counts[d, (k >> np.uint32(8 * d)) & np.uint32(255)] += 1
        for d in range(4):
            digit = counts[d]
            if digit.max() == cols:  # one value of this digit: the pass would not move a key
                continue
            at = 0
            for b in range(256):
                c = digit[b]
                digit[b] = at
                at += c
            shift = np.uint32(8 * d)
            for j in range(cols):
                k = ka[j]
                b = (k >> shift) & np.uint32(255)
                p = digit[b]
                digit[b] = p + 1
                kb[p] = k
                ib[p] = ia[j]
            ka, kb = kb, ka
            ia, ib = ib, ia
        for p in range(cols):
            out[r, ia[p]] = np.float32(p)
