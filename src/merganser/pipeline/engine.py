"""The streaming engine: computes a plan's tensors in a thread pool under a memory budget.

Each work item reads its inputs (positional reads release the GIL) and hands its result to a
sink. Items are admitted in plan order only while their estimated footprint fits the budget, so
peak memory is bounded whatever the model size.

On the CPU, methods that are elementwise or have a BlockMerge run block by block: the raw
inputs are read into buffers each thread reuses (no page faults, no float32 copy of a tensor),
and each BLOCK of entries is upcast, merged and cast back while it sits in the CPU cache. A
tensor too large for one item is cut into chunks (elementwise) or read in segments once per
statistic pass (a BlockMerge; later passes come from the page cache). Elsewhere (GPU,
vocabulary filling, calibration statistics, whole-tensor methods) an item is upcast whole.

On a GPU, items are also admitted under a device budget. A tensor that must be merged whole
and needs more than that budget is merged on the CPU instead, so a merge never runs out of
GPU memory on one large tensor (an embedding, say) that the CPU can stream.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Executor, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from merganser.errors import MerganserError, size_text
from merganser.methods.blockwise import BLOCK, BlockMerge, Load
from merganser.methods.registry import WholeModelStats
from merganser.model.vocab import align_rows
from merganser.pipeline.plan import Plan, TensorTask
from merganser.storage.dtypes import dtype_name, itemsize
from merganser.storage.formats import dequantize_fp8_block
from merganser.storage.provenance import BLOCK as DIGEST_BLOCK
from merganser.storage.provenance import InputDigests

# (task, result or a flat chunk of it, its first element). The sink must be done with the tensor
# when it returns: its memory is reused for the next chunk.
Sink = Callable[[TensorTask, torch.Tensor, int], None]
# A compute slot: held while an item does math, not while it reads or waits for the writer.
ComputeSlot = AbstractContextManager[Any]
NO_SLOT: ComputeSlot = contextlib.nullcontext()

# BLOCK (methods/blockwise.py), entries per compute block: a block's float32 working set stays
# in a core's cache. A constant: sums over blocks (L1 norms of DARE/TIES rescaling, Model
# Stock's norms) depend on it, and outputs must not depend on settings.
# Bytes of result a block-by-block merge hands to the sink at a time: each compute thread
# holds one piece, so 4 MiB rather than 16 took 24 MB off a 125M SLERP merge's peak RSS (of
# 600), at the same speed warm and cold.
OUT_PIECE = 4 << 20


@dataclass(frozen=True)
class EngineOptions:
    memory_budget: int
    threads: int = 2
    torch_threads: int = 1
    device: str = "cpu"
    # Bytes of GPU memory the items in flight may hold at once (None: no bound; unused on CPU).
    device_budget: int | None = None
    allow_nonfinite: bool = False
    # Upper bound for one work item; smaller items spread big tensors over all threads.
    max_item_bytes: int = 64 << 20
    # A BlockMerge (TIES, SLERP, ...) holds a tensor up to this size for all its passes, so it
    # reads it from the disk once (O_DIRECT when cold). A larger tensor is read in segments of
    # this size, once per pass, through the page cache, whose fill costs CPU: a cold 1B TIES
    # merge took a fifth less CPU, and SLERP a quarter, once their MLP matrices fit here.
    max_hold_bytes: int = 128 << 20
    # Items read ahead per compute thread by elementwise merges: cold reads want many requests
    # in flight (O_DIRECT reads here ran at 0.75 GB/s with 64 MiB in flight, 1.3 with 256 MiB).
    read_ahead: int = 1
    # Inputs of a BlockMerge's tensor each thread reads side by side (one I/O thread each):
    # O_DIRECT reads one request at a time per thread, and the disk wants more in flight
    # (cold 1B TIES, SLERP and DARE-TIES merges took 3-16 % less wall time with 4 than with 1).
    read_streams: int = 4
    # Fused numba kernels for TIES, DARE and SLERP on bfloat16 (methods/fused.py): the torch
    # path's bits (SLERP: see fused.py) at a fraction of its CPU time. Off, or without numba,
    # torch does the math.
    fused: bool = True


@dataclass(frozen=True)
class WorkItem:
    task: TensorTask
    start: int
    count: int
    cost: int
    whole: bool
    # Where its math runs, and whether block by block (see the module docstring).
    device: str = "cpu"
    blocks: bool = False


class MemoryBudget:
    """A byte-counting semaphore: ``acquire`` blocks until ``n`` bytes are free."""

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._cv = threading.Condition()

    def acquire(self, n: int, abort: threading.Event) -> bool:
        with self._cv:
            while self.free < n and not abort.is_set():
                self._cv.wait(timeout=0.2)
            if abort.is_set():
                return False
            self.free -= n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.free += n
            self._cv.notify_all()


def blockwise(plan: Plan, task: TensorTask, device: str) -> bool:
    """Whether ``task`` runs block by block on ``device`` (see the module docstring)."""
    m = plan.method
    simple = (
        task.fill is None
        and task.stats is None
        and task.scales is None
        and not task.copy_only
        and not task.vocab
    )
    return (
        device == "cpu"
        and simple
        and (
            m.elementwise
            or (m.blockwise is not None and bool(m.blockwise(task.params, task.shape)))
        )
    )


def block_merge(plan: Plan, task: TensorTask) -> BlockMerge | None:
    """The method's BlockMerge for ``task``, or None where the method is elementwise."""
    bw = plan.method.blockwise
    return None if bw is None else bw(task.params, task.shape)


def bytes_per_element(plan: Plan, task: TensorTask, in_blocks: bool = False) -> int:
    """Estimated peak bytes one element of ``task`` needs while it is being merged."""
    ckpts = plan.checkpoints
    inputs = task.inputs
    raw = sum(itemsize(ckpts[ci].tensors[n].dtype) for ci, n in inputs)
    if task.copy_only or in_blocks:
        return raw + itemsize(task.out_dtype)
    work = int(4 * (len(inputs) + 2 + plan.method.workspace * len(inputs)))
    if task.vocab:  # aligning rows: each input's moved copy, the fill sum and the fill
        work += 4 * (2 * len(inputs) + 2)
    if task.stats:
        # Statistics need not match the tensor's size (a Gram is in × in); each is read once and
        # then held in float64 while solving, so count it three times over.
        stat_bytes = sum(ckpts[ci].tensors[n].nbytes for ci, n in filter(None, task.stats))
        work += -(-3 * stat_bytes // max(1, task.numel))
    return raw + work + itemsize(task.out_dtype)


def work_items(plan: Plan, options: EngineOptions, chunks: bool = True) -> list[WorkItem]:
    """Split the plan into items that each fit in the budget; fail early if one cannot."""
    gpu_cap = options.device_budget if options.device != "cpu" else None
    cap = min(options.max_item_bytes, options.memory_budget)
    if gpu_cap is not None:
        cap = min(cap, gpu_cap)
    items: list[WorkItem] = []
    for task in plan.tasks:
        if not chunks and task.copy_only:
            continue
        # Cut or dequantised inputs are read whole (a chunk would split rows or scale blocks).
        chunkable = (
            (plan.method.elementwise or task.copy_only)
            and task.fill is None
            and task.scales is None
            and not task.vocab
        )
        device = "cpu" if task.copy_only else options.device  # a copy does no math
        one_item = not chunks or not chunkable
        if (
            gpu_cap is not None
            and one_item
            and bytes_per_element(plan, task) * task.numel > gpu_cap
        ):
            device = "cpu"  # merged whole, and too large for the GPU's budget
        in_blocks = chunks and blockwise(plan, task, device)
        per = bytes_per_element(plan, task, in_blocks)
        need = per * task.numel
        item = functools.partial(WorkItem, task, device=device, blocks=in_blocks)

        if in_blocks and not plan.method.elementwise:
            # A BlockMerge needs the whole tensor in one item; it may read it in segments.
            bm = block_merge(plan, task)
            block = BLOCK if bm is None else bm.block
            items.append(item(0, task.numel, held(plan, task, options, block) * per, True))
            continue
        if need <= cap or task.numel <= 1:
            items.append(item(0, task.numel, need, True))
            continue
        if one_item:
            _within_budget(task, need, f"to merge with {plan.method.name!r}", options)
            items.append(item(0, task.numel, need, True))
            continue
        step = aligned(plan, task, cap // per)
        for start in range(0, task.numel, step):
            count = min(step, task.numel - start)
            items.append(item(start, count, per * count, False))
    return items


def _within_budget(task: TensorTask, need: int, doing: str, options: EngineOptions) -> None:
    """One line naming the tensor when it alone needs more than the memory budget."""
    if need > options.memory_budget:
        raise MerganserError(
            f"tensor {task.name} {list(task.shape)} needs about {size_text(need)} {doing}, "
            f"more than --memory-budget {size_text(options.memory_budget)}"
        )


def held(plan: Plan, task: TensorTask, options: EngineOptions, block: int = BLOCK) -> int:
    """Entries of ``task`` a BlockMerge holds at once (its segment), within max_hold_bytes."""
    per = bytes_per_element(plan, task, True)
    cap = min(options.max_hold_bytes, options.memory_budget)
    return min(task.numel, segment(plan, task, cap, per, block))


def segment(plan: Plan, task: TensorTask, cap: int, per: int, block: int = BLOCK) -> int:
    """Entries of a tensor held at once within ``cap`` bytes: whole blocks, at least one."""
    entries = max(BLOCK, aligned(plan, task, cap // per))
    if block != BLOCK:  # a BlockMerge's own blocks (whole rows), no more than other segments
        return max(block, entries // block * block)
    return entries


def aligned(plan: Plan, task: TensorTask, n: int) -> int:
    """``n`` entries rounded down to whole digest blocks of every input where that leaves any,
    else to whole compute blocks: chunks that split no digest block are hashed straight from
    the read buffer, with no piece kept aside to assemble.
    """
    narrowest = min(itemsize(plan.checkpoints[ci].tensors[n].dtype) for ci, n in task.inputs)
    for unit in (max(BLOCK, DIGEST_BLOCK // narrowest), BLOCK):
        if n >= unit:
            return n // unit * unit
    return max(1, n)


class _Scratch(threading.local):
    """Per-thread byte buffers, grown on demand and reused across items."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self.bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes].view(dtype)


def merge_blocks(
    plan: Plan,
    item: WorkItem,
    options: EngineOptions,
    scratch: _Scratch,
    digests: InputDigests | None = None,
    compute: ComputeSlot = NO_SLOT,
    io: Executor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Merge ``item`` block by block; yields (first element, flat result) per segment.

    Reads happen outside ``compute`` (a slot among the compute threads), the math inside it;
    a BlockMerge's inputs are read side by side on ``io`` when given.
    """
    task = item.task
    refs = task.inputs
    has_base = task.base is not None
    bm = block_merge(plan, task)
    block = BLOCK if bm is None else bm.block
    step = min(item.count, held(plan, task, options, block))
    segs = [(s, min(step, item.start + item.count - s))
            for s in range(item.start, item.start + item.count, step)]  # fmt: skip
    # Segments are read once per pass: through the page cache, or later passes go to the disk.
    again = bm is not None and len(segs) > 1
    fast = bm is not None and fusable(plan, task, options) and bm.fused()

    def read(start: int, count: int) -> list[torch.Tensor]:
        bufs = []
        for j, (ci, name) in enumerate(refs):
            size = count * itemsize(plan.checkpoints[ci].tensors[name].dtype)
            bufs.append(scratch.get(f"raw.{j}", size, torch.uint8))  # this thread's buffers

        def one(j: int) -> torch.Tensor:
            ci, name = refs[j]
            return plan.checkpoints[ci].read(name, start, count, out=bufs[j], again=again)

        if io is None or bm is None or len(refs) == 1:
            return [one(j).reshape(-1) for j in range(len(refs))]
        reads = [io.submit(one, j) for j in range(len(refs))]
        wait(reads)  # all of them, failed or not: none may write into the buffers later
        return [r.result().reshape(-1) for r in reads]

    def record(start: int, raws: list[torch.Tensor]) -> None:
        if digests is not None:
            for (ci, name), r in zip(refs, raws, strict=True):
                info = plan.checkpoints[ci].tensors[name]
                digests.add(ci, name, info.nbytes, start * itemsize(info.dtype), r)

    def split(values: list[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        return (values[:-1], values[-1]) if has_base else (values, None)

    def upcast(raws: list[torch.Tensor], a: int, n: int) -> tuple[list[torch.Tensor], Any]:
        # Float32 blocks, each thread's reused; the fused kernels read the stored values.
        work = [scratch.get(f"f32.{j}", block * 4, torch.float32) for j in range(len(raws))]
        return split([work[j][:n].copy_(rounded(plan, r[a : a + n])) for j, r in enumerate(raws)])

    def gather(
        raws: list[torch.Tensor], a: int, idx: torch.Tensor
    ) -> tuple[list[torch.Tensor], Any]:
        return split([rounded(plan, r[a + idx]).float() for r in raws])

    def chosen(raws: list[torch.Tensor]) -> Load:
        return lambda idx: gather(raws, 0, _positions(idx))

    cached = read(*segs[0]) if bm is not None and len(segs) == 1 else None
    p = 0
    while bm is not None and bm.wants_pass(p):
        for s, c in segs:
            raws = cached if cached is not None else read(s, c)
            if bm.sampled(p):
                with compute:
                    if fast:
                        bm.observe_raw(p, s, *split(raws))
                    else:
                        bm.observe(p, s, c, chosen(raws))
                continue
            with compute:
                for a in range(0, c, block):
                    n = min(block, c - a)
                    if fast:
                        bm.observe_raw(p, s + a, *split([r[a : a + n] for r in raws]))
                        continue

                    def load(
                        idx: torch.Tensor | None, raws: list = raws, a: int = a, n: int = n
                    ) -> Any:
                        return upcast(raws, a, n) if idx is None else gather(raws, a, idx)

                    bm.observe(p, s + a, n, load)
        with compute:
            bm.end_pass(p)
        p += 1
    # The result leaves in pieces: a whole segment's worth would add a third to SLERP's memory.
    piece = max(block, OUT_PIECE // itemsize(task.out_dtype) // block * block)
    for s, c in segs:
        raws = cached if cached is not None else read(s, c)
        with compute:
            record(s, raws)  # each input byte once, in the merge pass
        for p0 in range(0, c, piece):
            pn = min(piece, c - p0)
            out = scratch.get("out", pn * itemsize(task.out_dtype), task.out_dtype)
            with compute:
                for a in range(p0, p0 + pn, block):
                    n = min(block, p0 + pn - a)
                    if fast:
                        xs, b = split([r[a : a + n] for r in raws])
                        if not bm.merge_raw(s + a, xs, b, out[a - p0 : a - p0 + n]):
                            raise _nonfinite(task)
                        continue
                    tensors, base = upcast(raws, a, n)
                    if bm is not None:
                        res = bm.merge(s + a, tensors, base)
                    else:
                        res = plan.method(tensors, base, **task.params)
                    # Checked in the output dtype: a finite float32 can round to Inf there.
                    _check_finite(task, out[a - p0 : a - p0 + n].copy_(res), options)
            # The sink may wait for the writer, and must not hold a compute slot while it does.
            yield s + p0, out.view(task.shape) if item.whole and pn == task.numel else out


def _positions(idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        raise TypeError("a sampled pass loads chosen positions only")
    return idx


def _check_finite(task: TensorTask, out: torch.Tensor, options: EngineOptions) -> None:
    if options.allow_nonfinite:
        return
    # A finite sum proves every entry finite in one cheap pass; only a non-finite sum (or an
    # overflow of a huge but finite sum) needs the exact, costlier check. bfloat16 is summed
    # natively (float32 accumulation inside): asking for a float32 result cost ten times more.
    # float16 is summed into float32, as its own range is too small for a sum of weights.
    acc = torch.float32 if out.dtype == torch.float16 else None
    if math.isfinite(float(out.sum(dtype=acc))):
        return
    if not bool(torch.isfinite(out).all()):
        raise _nonfinite(task)


def _nonfinite(task: TensorTask) -> MerganserError:
    return MerganserError(
        f"tensor {task.name}: merge produced NaN or Inf in {dtype_name(task.out_dtype)} (check "
        "the inputs, the parameters and out_dtype, or pass --allow-nonfinite)"
    )


def _out_of_memory(item: WorkItem, options: EngineOptions) -> MerganserError:
    budget = options.device_budget or 0
    return MerganserError(
        f"tensor {item.task.name}: out of memory on {item.device} with "
        f"--gpu-memory {size_text(budget)} (pass a smaller --gpu-memory, or --device cpu)"
    )


def fusable(plan: Plan, task: TensorTask, options: EngineOptions) -> bool:
    """Whether a BlockMerge's fused kernels may merge ``task``: bfloat16 in and out, nothing
    rounded first, and non-finite results an error (their NaN bits could differ from torch's).
    """
    bf16 = torch.bfloat16
    return (
        options.fused
        and not options.allow_nonfinite
        and task.out_dtype == bf16
        and plan.compute_dtype in (None, bf16)
        and all(plan.checkpoints[ci].tensors[name].dtype == bf16 for ci, name in task.inputs)
    )


def read_raw(
    plan: Plan,
    item: WorkItem,
    ref: tuple[int, str],
    digests: InputDigests | None = None,
    again: bool = False,
) -> torch.Tensor:
    """One input of the item as stored on disk (recorded in ``digests`` when given; ``again``:
    it will be read again, see Checkpoint.read).
    """
    ci, name = ref
    ckpt = plan.checkpoints[ci]
    if item.whole:
        t, start = ckpt.read(name, again=again), 0
    else:
        t, start = ckpt.read(name, item.start, item.count, again=again), item.start
    if digests is not None:
        info = ckpt.tensors[name]
        digests.add(ci, name, info.nbytes, start * t.element_size(), t)
    return t


def load_inputs(
    plan: Plan, item: WorkItem, digests: InputDigests | None = None, again: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The item's inputs as float32 on its device (sources, then base or None)."""

    task = item.task
    scales = task.scales or [None] * len(task.inputs)

    def load(ref: tuple[int, str], scale: tuple[int, str, tuple[int, int]] | None) -> torch.Tensor:
        t = read_raw(plan, item, ref, digests, again)
        if scale is not None:  # FP8 block-scaled: float32 values first
            s = read_raw(plan, item, (scale[0], scale[1]), digests, again)
            t = dequantize_fp8_block(t, s, scale[2])
        t = rounded(plan, t)
        # Copy first, convert after: a blocking host-to-GPU copy that also changes the dtype
        # converts on the CPU, then copies twice the bytes of a bf16 tensor.
        return t.to(device=item.device).float()

    n = len(task.sources)
    tensors = [load(ref, scales[i]) for i, ref in enumerate(task.sources)]
    base = load(task.base, scales[n]) if task.base else None
    if task.fill is not None:
        filler = load(task.fill, None)
        tensors = [fit(t, task.shape, filler) for t in tensors]
        base = fit(base, task.shape, filler) if base is not None else None
    if task.vocab and plan.vocab is not None:
        # Rows in the output vocabulary's order; a token a model lacks gets the shared fill.
        v = plan.vocab
        refs = task.inputs
        everyone = tensors + ([base] if base is not None else [])
        ckpts = [ci for ci, _ in refs]
        fill_from = ckpts.index(v.fill_from) if v.fill_from in ckpts else None
        overrides = {
            out_id: (None if src is None else ckpts.index(src), row, force)
            for out_id, (src, row, force) in v.overrides.items()
        }
        perms = [v.perms[ci] for ci in ckpts]
        pieces = [v.pieces.get(ci, {}) for ci in ckpts]
        aligned = align_rows(everyone, perms, fill_from, v.rows, overrides, pieces)
        tensors, base = aligned[:n], (aligned[n] if base is not None else None)
    return tensors, base


def rounded(plan: Plan, t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the recipe's ``dtype`` first, as mergekit does before merging."""
    if plan.compute_dtype is not None and t.dtype != plan.compute_dtype:
        return t.to(plan.compute_dtype)
    return t


def fit(t: torch.Tensor, shape: tuple[int, ...], filler: torch.Tensor) -> torch.Tensor:
    """Cut ``t`` to ``shape``; where it is smaller, take the values of ``filler`` (vocab policy)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = filler[tuple(slice(0, n) for n in shape)].clone()
    region = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape, strict=True))
    out[region] = t[region]
    return out


def compute_item(
    plan: Plan,
    item: WorkItem,
    options: EngineOptions,
    digests: InputDigests | None = None,
    compute: ComputeSlot = NO_SLOT,
) -> torch.Tensor:
    """Merge one work item and return it in the output dtype (flat unless ``item.whole``)."""
    task = item.task
    if task.copy_only:
        return read_raw(plan, item, task.sources[0], digests).to(task.out_dtype)
    tensors, base = load_inputs(plan, item, digests)
    extra = {}
    if task.stats is not None:
        extra["stats"] = [
            None if r is None else read_raw(plan, item, r, digests).to(item.device)
            for r in task.stats
        ]
    with compute:
        out = plan.method(tensors, base, **task.params, **extra)
        del tensors, base, extra
        # Checked in the output dtype: a finite float32 result can round to Inf there.
        out = out.to(dtype=task.out_dtype)
        _check_finite(task, out, options)
        return out.cpu()


def run(
    plan: Plan,
    sink: Sink,
    options: EngineOptions,
    progress: Callable[[int, bool], None] | None = None,
    digests: InputDigests | None = None,
    items: list[WorkItem] | None = None,
    on_abort: Callable[[], None] | None = None,
) -> None:
    """Compute every tensor of ``plan`` and pass each result (or chunk) to ``sink``.

    ``on_abort`` is called as soon as the run fails or is interrupted, before it waits for the
    items in flight: a sink that makes writers wait (for bytes an unfinished item would have
    produced) must release them there.
    """
    scratch = _Scratch()
    io = None
    if options.read_streams > 1 and not plan.method.elementwise:
        streams = max(1, options.threads) * options.read_streams
        io = ThreadPoolExecutor(streams, thread_name_prefix="read")

    def work(item: WorkItem, compute: ComputeSlot) -> None:
        try:
            if item.blocks:
                parts: Iterable[tuple[int, torch.Tensor]] = merge_blocks(
                    plan, item, options, scratch, digests, compute, io
                )
            else:
                parts = [(item.start, compute_item(plan, item, options, digests, compute))]
            for start, out in parts:
                sink(item.task, out, start)
                if progress is not None:
                    progress(out.numel() * out.element_size(), False)
        except ValueError as e:  # a method refusing its inputs (TSV-M's k = 0, antipodes...)
            raise MerganserError(f"tensor {item.task.name!r}: {e}") from None
        if progress is not None:
            progress(0, True)  # a blockwise item sends several parts; it is one piece

    # Elementwise merges are bound by I/O, so they read ahead; the statistic passes of the
    # others are bound by compute, where reading ahead would only hold more memory.
    ahead = options.read_ahead if plan.method.elementwise else 0
    try:
        items = items if items is not None else work_items(plan, options)
        _run_items(items, work, options, on_abort, ahead)
    finally:
        if io is not None:
            io.shutdown(wait=True)


# Entries of one piece a ``chunked`` statistic observes at a time (at most; whole blocks, fewer
# where the memory budget is small).
STAT_PIECE = 1 << 20


def stat_items(plan: Plan, options: EngineOptions, stats: WholeModelStats) -> list[WorkItem]:
    """The pieces a statistic's passes read: whole tensors, or for a ``chunked`` statistic
    (one whose observations add up over any split of a tensor) pieces of STAT_PIECE entries of
    every tensor that is read as stored, so its memory does not grow with the tensors."""
    if not getattr(stats, "chunked", False):
        return work_items(plan, options, chunks=False)
    items: list[WorkItem] = []
    ckpts = plan.checkpoints
    gpu_cap = options.device_budget if options.device != "cpu" else None
    for task in plan.tasks:
        if task.copy_only:
            continue
        if task.fill is not None or task.scales is not None or task.vocab:
            need = bytes_per_element(plan, task) * task.numel  # rows moved or dequantised
            _within_budget(task, need, "to read whole", options)
            device = "cpu" if gpu_cap is not None and need > gpu_cap else options.device
            items.append(WorkItem(task, 0, task.numel, need, True, device))
            continue
        # each input's stored bytes and float32 copy, and the statistic's own int64 per entry
        per = sum(itemsize(ckpts[ci].tensors[n].dtype) + 4 for ci, n in task.inputs) + 24
        step = min(STAT_PIECE, max(BLOCK, options.memory_budget // per // BLOCK * BLOCK))
        for start in range(0, task.numel, step):
            count = min(step, task.numel - start)
            items.append(
                WorkItem(task, start, count, per * count, count == task.numel, options.device)
            )
    return items


def gather_stats(
    plan: Plan,
    stats: WholeModelStats,
    options: EngineOptions,
    items: list[WorkItem] | None = None,
) -> None:
    """Stream every mergeable tensor through ``stats`` once per pass, then attach its results."""
    if items is None:
        items = stat_items(plan, options, stats)
    for p in range(stats.passes):

        def observe(item: WorkItem, compute: ComputeSlot, p: int = p) -> None:
            tensors, base = load_inputs(plan, item, again=True)  # the merge rereads
            with compute:
                task = item.task
                stats.observe(p, task.name, tensors, base, task.params, item.start, task.shape)

        _run_items(items, observe, options)
        stats.end_pass(p)
    for task in plan.tasks:
        if not task.copy_only:
            task.params.update(stats.params_for(task.name))


def _run_items(
    items: list[WorkItem],
    fn: Callable[[WorkItem, ComputeSlot], None],
    options: EngineOptions,
    on_abort: Callable[[], None] | None = None,
    read_ahead: int = 0,
) -> None:
    """Run ``fn`` over ``items`` on a thread pool, admitting items while they fit the budget.

    The pool holds ``read_ahead`` more items per thread than there are compute threads: ``fn``
    reads outside the compute slot it is given, and does its math inside it.
    """
    budget = MemoryBudget(options.memory_budget)
    gpu = MemoryBudget(options.device_budget) if options.device_budget is not None else None
    threads = max(1, options.threads)
    compute = threading.BoundedSemaphore(threads)
    abort = threading.Event()
    lock = threading.Lock()
    first: list[BaseException] = []  # the cause; failures it sets off in other items follow it
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, options.torch_threads))

    def stop() -> None:
        abort.set()
        if on_abort is not None:
            on_abort()

    def work(item: WorkItem, held: int, on_gpu: int) -> None:
        try:
            if not abort.is_set():
                fn(item, compute)
        except BaseException as e:
            oom = isinstance(e, torch.OutOfMemoryError)
            with lock:
                if not first:
                    first.append(_out_of_memory(item, options) if oom else e)
            stop()
            raise
        finally:
            budget.release(held)
            if gpu is not None:
                gpu.release(on_gpu)

    futures: list[Future[None]] = []
    pool = ThreadPoolExecutor(threads * (1 + read_ahead), thread_name_prefix="merge")
    try:
        for item in items:
            # An item larger than the whole budget runs alone once everything else drained.
            held = min(item.cost, budget.total)
            if not budget.acquire(held, abort):
                break
            # A GPU item's float32 work lives on the device: it holds that budget too.
            on_gpu = min(item.cost, gpu.total) if gpu is not None and item.device != "cpu" else 0
            if gpu is not None and not gpu.acquire(on_gpu, abort):
                budget.release(held)
                break
            futures.append(pool.submit(work, item, held, on_gpu))
        wait(futures, return_when=FIRST_EXCEPTION)
        if first:
            raise first[0]
    except BaseException:
        stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(old_threads)
