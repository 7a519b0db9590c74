"""The streaming engine: computes a plan's tensors in a thread pool under a memory budget.

Each work item reads its inputs (positional reads release the GIL), upcasts to float32, calls
the method, checks for NaN/Inf, casts to the output dtype and hands the result to a sink. Items
are admitted in plan order only while their estimated footprint fits the budget, so peak memory
is bounded whatever the model size; tensors too large for one item are cut into flat chunks when
the method is elementwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from merganser.dtypes import itemsize
from merganser.errors import MerganserError
from merganser.plan import Plan, TensorTask
from merganser.provenance import InputDigests
from merganser.stats import WholeModelStats

Sink = Callable[[TensorTask, torch.Tensor, int], None]


@dataclass(frozen=True)
class EngineOptions:
    memory_budget: int
    threads: int = 2
    torch_threads: int = 1
    device: str = "cpu"
    allow_nonfinite: bool = False
    # Upper bound for one work item; smaller items spread big tensors over all threads.
    max_item_bytes: int = 256 << 20


@dataclass(frozen=True)
class WorkItem:
    task: TensorTask
    start: int
    count: int
    cost: int
    whole: bool


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


def bytes_per_element(plan: Plan, task: TensorTask) -> int:
    """Estimated peak bytes one element of ``task`` needs while it is being merged."""
    ckpts = plan.checkpoints
    inputs = [*task.sources, *([task.base] if task.base else [])]
    raw = sum(itemsize(ckpts[ci].tensors[n].dtype) for ci, n in inputs)
    if task.copy_only:
        return raw + itemsize(task.out_dtype)
    work = int(4 * (len(inputs) + 2 + plan.method.workspace * len(inputs)))
    if task.stats:
        # Statistics need not match the tensor's size (a Gram is in × in); each is read once and
        # then held in float64 while solving, so count it three times over.
        stat_bytes = sum(ckpts[ci].tensors[n].nbytes for ci, n in filter(None, task.stats))
        work += -(-3 * stat_bytes // max(1, task.numel))
    return raw + work + itemsize(task.out_dtype)


def work_items(plan: Plan, options: EngineOptions, chunks: bool = True) -> list[WorkItem]:
    """Split the plan into items that each fit in the budget; fail early if one cannot."""
    cap = min(options.max_item_bytes, options.memory_budget)
    items: list[WorkItem] = []
    for task in plan.tasks:
        if not chunks and task.copy_only:
            continue
        per = bytes_per_element(plan, task)
        need = per * task.numel
        if need <= cap or task.numel <= 1:
            items.append(WorkItem(task, 0, task.numel, need, True))
            continue
        chunkable = (plan.method.elementwise or task.copy_only) and task.fill is None
        if not chunks or not chunkable:
            if need > options.memory_budget:
                raise MerganserError(
                    f"tensor {task.name} {list(task.shape)} needs about {need / 2**30:.2f} GiB "
                    f"to merge with {plan.method.name!r}, more than --memory-budget "
                    f"{options.memory_budget / 2**30:.2f} GiB"
                )
            items.append(WorkItem(task, 0, task.numel, need, True))
            continue
        step = max(1, cap // per)
        for start in range(0, task.numel, step):
            count = min(step, task.numel - start)
            items.append(WorkItem(task, start, count, per * count, False))
    return items


def read_raw(
    plan: Plan, item: WorkItem, ref: tuple[int, str], digests: InputDigests | None = None
) -> torch.Tensor:
    """One input of the item as stored on disk (recorded in ``digests`` when given)."""
    ci, name = ref
    ckpt = plan.checkpoints[ci]
    if item.whole:
        t, start = ckpt.read(name), 0
    else:
        t, start = ckpt.read(name, item.start, item.count), item.start
    if digests is not None:
        info = ckpt.tensors[name]
        digests.add(ci, name, info.nbytes, start * t.element_size(), t)
    return t


def load_inputs(
    plan: Plan, item: WorkItem, options: EngineOptions, digests: InputDigests | None = None
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The item's inputs as float32 on the compute device (sources, then base or None)."""

    def load(ref: tuple[int, str]) -> torch.Tensor:
        t = read_raw(plan, item, ref, digests)
        if plan.compute_dtype is not None and t.dtype != plan.compute_dtype:
            t = t.to(plan.compute_dtype)  # mergekit rounds inputs to `dtype` before merging
        return t.to(device=options.device, dtype=torch.float32)

    task = item.task
    tensors = [load(ref) for ref in task.sources]
    base = load(task.base) if task.base else None
    if task.fill is not None:
        filler = load(task.fill)
        tensors = [fit(t, task.shape, filler) for t in tensors]
        base = fit(base, task.shape, filler) if base is not None else None
    return tensors, base


def fit(t: torch.Tensor, shape: tuple[int, ...], filler: torch.Tensor) -> torch.Tensor:
    """Cut ``t`` to ``shape``; where it is smaller, take the values of ``filler`` (vocab policy)."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = filler[tuple(slice(0, n) for n in shape)].clone()
    region = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape, strict=True))
    out[region] = t[region]
    return out


def compute_item(
    plan: Plan, item: WorkItem, options: EngineOptions, digests: InputDigests | None = None
) -> torch.Tensor:
    """Merge one work item and return it in the output dtype (flat unless ``item.whole``)."""
    task = item.task
    if task.copy_only:
        return read_raw(plan, item, task.sources[0], digests).to(task.out_dtype)
    tensors, base = load_inputs(plan, item, options, digests)
    extra = {}
    if task.stats is not None:
        extra["stats"] = [
            None if r is None else read_raw(plan, item, r, digests).to(options.device)
            for r in task.stats
        ]
    out = plan.method(tensors, base, **task.params, **extra)
    del tensors, base, extra
    if not options.allow_nonfinite and not bool(torch.isfinite(out).all()):
        raise MerganserError(
            f"tensor {task.name}: merge produced NaN or Inf (check the inputs and parameters, "
            "or pass --allow-nonfinite)"
        )
    return out.to(dtype=task.out_dtype).cpu()


def run(
    plan: Plan,
    sink: Sink,
    options: EngineOptions,
    progress: Callable[[int], None] | None = None,
    digests: InputDigests | None = None,
    items: list[WorkItem] | None = None,
) -> None:
    """Compute every tensor of ``plan`` and pass each result (or chunk) to ``sink``."""

    def work(item: WorkItem) -> None:
        out = compute_item(plan, item, options, digests)
        sink(item.task, out, item.start)
        if progress is not None:
            progress(out.numel() * out.element_size())

    _run_items(items if items is not None else work_items(plan, options), work, options)


def gather_stats(
    plan: Plan,
    stats: WholeModelStats,
    options: EngineOptions,
    items: list[WorkItem] | None = None,
) -> None:
    """Stream every mergeable tensor through ``stats`` once per pass, then attach its results."""
    if items is None:
        items = work_items(plan, options, chunks=False)
    for p in range(stats.passes):

        def observe(item: WorkItem, p: int = p) -> None:
            tensors, base = load_inputs(plan, item, options)
            stats.observe(p, item.task.name, tensors, base, item.task.params)

        _run_items(items, observe, options)
        stats.end_pass(p)
    for task in plan.tasks:
        if not task.copy_only:
            task.params.update(stats.params_for(task.name))


def _run_items(
    items: list[WorkItem], fn: Callable[[WorkItem], None], options: EngineOptions
) -> None:
    """Run ``fn`` over ``items`` on a thread pool, admitting items while they fit the budget."""
    budget = MemoryBudget(options.memory_budget)
    abort = threading.Event()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, options.torch_threads))

    def work(item: WorkItem, held: int) -> None:
        try:
            if not abort.is_set():
                fn(item)
        except BaseException:
            abort.set()
            raise
        finally:
            budget.release(held)

    futures: list[Future[None]] = []
    pool = ThreadPoolExecutor(max(1, options.threads), thread_name_prefix="merge")
    try:
        for item in items:
            # An item larger than the whole budget runs alone once everything else drained.
            held = min(item.cost, budget.total)
            if not budget.acquire(held, abort):
                break
            futures.append(pool.submit(work, item, held))
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if exc is not None:
                raise exc
    except BaseException:
        abort.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(old_threads)
