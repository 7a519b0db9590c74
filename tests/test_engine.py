"""Engine behaviour: chunking, determinism across threads and budgets, parameter evaluation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import load_folder, ties_recipe, tree_digest, write_model

import merganser
from merganser.errors import MerganserError
from merganser.model.naming import depth
from merganser.pipeline.engine import EngineOptions, work_items
from merganser.pipeline.plan import build_plan
from merganser.pipeline.recipe import Gradient, parse_recipe


def _family(tmp_path, layers: int = 3):
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{kind}.weight" for i in range(layers) for kind in ("mlp.up", "attn.q")
    ]
    cfg = {"num_hidden_layers": layers}
    make = lambda: {n: torch.randn(64, 33, generator=g).to(torch.bfloat16) for n in names}  # noqa: E731
    return [write_model(tmp_path / f"m{i}", make(), cfg) for i in range(3)]


def _recipe(paths):
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": [0.3, 1.2]}} for p in paths[1:]],
        "parameters": {"lambda": 0.7},
    }


def test_output_bytes_do_not_depend_on_threads_budget_or_chunking(tmp_path) -> None:
    paths = _family(tmp_path)
    runs = {
        "1 thread": merganser.MergeOptions(threads=1),
        "4 threads": merganser.MergeOptions(threads=4, torch_threads=2),
        "tiny budget (chunked)": merganser.MergeOptions(threads=3, memory_budget=4096),
    }
    digests = {}
    for name, opts in runs.items():
        out = merganser.merge(_recipe(paths), tmp_path / name.replace(" ", "_"), opts)
        digests[name] = tree_digest(out)
    first = next(iter(digests.values()))
    assert all(d == first for d in digests.values()), digests


def test_default_threads_are_measured_on_cpu_and_the_cores_for_a_gpu(monkeypatch) -> None:
    from merganser import api
    from merganser.pipeline import threads

    monkeypatch.setattr(api.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads, "measured_threads", lambda cores: min(cores, 5))
    assert merganser.MergeOptions().engine_options().threads == 5
    assert merganser.MergeOptions(device="cuda").engine_options().threads == 16
    assert merganser.MergeOptions(threads=9).engine_options().threads == 9
    monkeypatch.setattr(api.os, "cpu_count", lambda: 2)
    assert merganser.MergeOptions().engine_options().threads == 2


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties", "model_stock", "dppa", "sce"])
def test_stochastic_and_sparse_methods_are_byte_identical_across_threads(tmp_path, method) -> None:
    """Many tensors finish in the order the threads take them: whole-model statistics (DPPA's
    per-layer sums) must not depend on it."""
    paths = _family(tmp_path, layers=8)
    params = {"della": {"density": 0.5, "epsilon": 0.1}, "dppa": {}, "sce": {"select_topk": 0.5}}
    recipe = {
        **_recipe(paths),
        "merge_method": method,
        "random_seed": 3,
        "parameters": params.get(method, {"density": 0.5}),
    }
    a = merganser.merge(recipe, tmp_path / "a", merganser.MergeOptions(threads=1))
    b = merganser.merge(recipe, tmp_path / "b", merganser.MergeOptions(threads=4))
    assert tree_digest(a) == tree_digest(b)
    other = merganser.merge({**recipe, "random_seed": 4}, tmp_path / "c")
    if method in ("dare_ties", "della"):  # the seed draws their masks
        assert tree_digest(other) != tree_digest(a)


def test_chunks_split_no_input_digest_block_where_the_budget_allows(tmp_path) -> None:
    """Chunk starts fall on the input digest's 4 MiB blocks, so each chunk is hashed straight
    from its read buffer (bf16: 2M entries a block); a budget too small for one block still
    works, with chunks of whole compute blocks.
    """
    from merganser.pipeline.engine import BLOCK
    from merganser.storage.provenance import BLOCK as DIGEST_BLOCK

    w = torch.zeros(4096, 3000, dtype=torch.bfloat16)  # 12.3M entries: several digest blocks
    paths = [write_model(tmp_path / f"m{i}", {"w": w + i}) for i in range(2)]
    plan = build_plan(
        parse_recipe({"merge_method": "linear", "models": [{"model": str(p)} for p in paths]})
    )
    try:
        for budget, unit in ((64 << 20, DIGEST_BLOCK // 2), (8 << 20, BLOCK)):
            items = work_items(plan, EngineOptions(memory_budget=budget))
            assert len(items) > 1 and sum(i.count for i in items) == w.numel()
            assert all(i.start % unit == 0 for i in items)
            assert all(i.count % unit == 0 for i in items[:-1])
    finally:
        plan.close()


def test_big_tensors_are_chunked_to_fit_the_budget(tmp_path) -> None:
    plan = build_plan(parse_recipe(_recipe(_family(tmp_path))))
    try:
        items = work_items(plan, EngineOptions(memory_budget=4096))
        assert len(items) > len(plan.tasks)
        assert all(i.cost <= 4096 for i in items)
        assert sum(i.count for i in items) == sum(t.numel for t in plan.tasks)
    finally:
        plan.close()


def test_non_elementwise_tensor_larger_than_budget_fails_before_work(tmp_path) -> None:
    plan = build_plan(parse_recipe(_recipe(_family(tmp_path))))
    try:
        plan.method = dataclasses.replace(plan.method, elementwise=False)
        with pytest.raises(MerganserError, match=r"more than --memory-budget"):
            work_items(plan, EngineOptions(memory_budget=4096))
    finally:
        plan.close()


def _ties_plan(tmp_path, big: int):
    """TIES over a base and two experts: one (big, 256) matrix and two small ones."""
    shapes = {"big.weight": (big, 256), "a.weight": (64, 256), "b.weight": (32, 256)}
    return build_plan(parse_recipe(ties_recipe(tmp_path, shapes, seed=1)))


def test_a_tensor_too_large_for_the_gpu_budget_is_merged_on_the_cpu_in_blocks(tmp_path) -> None:
    from merganser.pipeline.engine import bytes_per_element

    plan = _ties_plan(tmp_path, big=2048)
    try:
        by_name = {t.name: t for t in plan.tasks}
        whole = {n: bytes_per_element(plan, t) * t.numel for n, t in by_name.items()}
        gpu = whole["a.weight"]  # fits a.weight and b.weight, not big.weight
        assert whole["big.weight"] > gpu >= whole["b.weight"]
        opts = EngineOptions(memory_budget=1 << 30, device="cuda", device_budget=gpu)
        items = {i.task.name: i for i in work_items(plan, opts)}
        assert (items["big.weight"].device, items["big.weight"].blocks) == ("cpu", True)
        for name in ("a.weight", "b.weight"):
            assert (items[name].device, items[name].blocks) == ("cuda", False)
            assert items[name].cost <= gpu
        # Without a GPU budget every tensor goes to the GPU, whole.
        unbounded = work_items(plan, dataclasses.replace(opts, device_budget=None))
        assert {(i.device, i.blocks) for i in unbounded} == {("cuda", False)}
    finally:
        plan.close()


def test_elementwise_gpu_items_are_chunked_to_the_gpu_budget(tmp_path) -> None:
    plan = build_plan(parse_recipe(_recipe(_family(tmp_path))))
    try:
        opts = EngineOptions(memory_budget=1 << 30, device="cuda", device_budget=4096)
        items = work_items(plan, opts)
        assert len(items) > len(plan.tasks)
        assert all(i.device == "cuda" and i.cost <= 4096 for i in items)
        assert sum(i.count for i in items) == sum(t.numel for t in plan.tasks)
    finally:
        plan.close()


def test_gpu_items_in_flight_hold_the_gpu_budget() -> None:
    """Items on the GPU are admitted only while their costs fit the device budget (an item
    larger than all of it runs alone); CPU items do not count against it.
    """
    import threading
    import time

    from merganser.pipeline import engine

    lock = threading.Lock()
    on_gpu: list[int] = []  # costs of the GPU items in flight
    seen: list[list[int]] = []  # on_gpu each time a GPU item started
    cpu = {"now": 0, "peak": 0}

    def fn(item, compute) -> None:
        with lock:
            if item.device == "cuda":
                on_gpu.append(item.cost)
                seen.append(sorted(on_gpu))
            else:
                cpu["now"] += item.cost
                cpu["peak"] = max(cpu["peak"], cpu["now"])
        time.sleep(0.02)
        with lock:
            if item.device == "cuda":
                on_gpu.remove(item.cost)
            else:
                cpu["now"] -= item.cost

    def item(cost: int, device: str) -> engine.WorkItem:
        return engine.WorkItem(None, 0, 1, cost, True, device)  # type: ignore[arg-type]

    items = [item(4, "cuda") for _ in range(12)] + [item(25, "cuda")]
    items += [item(4, "cpu") for _ in range(12)]
    opts = EngineOptions(memory_budget=1 << 20, threads=8, device="cuda", device_budget=10)
    engine._run_items(items, fn, opts)
    assert len(seen) == 13
    assert [25] in seen  # the item larger than the budget ran alone ...
    assert all(s == [25] or (25 not in s and sum(s) <= 10) for s in seen)  # ... the rest within
    assert [4, 4] in seen  # two small ones did run side by side
    assert cpu["peak"] > 10  # the CPU items ran side by side, beyond the GPU budget


def test_a_gpu_budget_must_be_positive(tmp_path) -> None:
    with pytest.raises(MerganserError, match="--gpu-memory must be positive"):
        merganser.merge(
            _recipe(_family(tmp_path)), tmp_path / "o", merganser.MergeOptions(gpu_memory=0)
        )
    assert not (tmp_path / "o").exists()


def test_running_out_of_gpu_memory_is_a_one_line_error_naming_the_tensor() -> None:
    from types import SimpleNamespace

    from merganser.pipeline import engine

    def fn(item, compute) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    task = SimpleNamespace(name="model.embed_tokens.weight")
    items = [engine.WorkItem(task, 0, 1, 1, True, "cuda")]  # type: ignore[arg-type]
    opts = EngineOptions(memory_budget=1 << 20, device="cuda", device_budget=3 << 30)
    with pytest.raises(MerganserError) as e:
        engine._run_items(items, fn, opts)
    msg = str(e.value)
    assert "\n" not in msg and "model.embed_tokens.weight" in msg
    assert "--gpu-memory 3.00 GiB" in msg


def test_layer_gradient_and_depth_follow_mergekit(tmp_path) -> None:
    assert depth("model.embed_tokens.weight", 3) == 0.0
    assert depth("model.norm.weight", 3) == 0.0 and depth("lm_head.weight", 3) == 0.0
    assert [depth(f"model.layers.{i}.mlp.up.weight", 3) for i in range(3)] == [0.0, 0.5, 1.0]
    g = Gradient((0.0, 1.0, 0.0))
    assert [g.at(t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.5, 1.0, 0.5, 0.0]

    paths = _family(tmp_path)
    plan = build_plan(parse_recipe(_recipe(paths)))
    try:
        w = {t.name: t.params["weight"][0] for t in plan.tasks}
        assert w["model.embed_tokens.weight"] == pytest.approx(0.3)
        assert w["model.layers.1.mlp.up.weight"] == pytest.approx(0.75)
        assert w["model.layers.2.attn.q.weight"] == pytest.approx(1.2)
        assert w["lm_head.weight"] == pytest.approx(0.3)  # outside the stack: t = 0
    finally:
        plan.close()


def test_filter_overrides_first_match_wins(tmp_path) -> None:
    paths = _family(tmp_path)
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(paths[0])}],
        "parameters": {
            "normalize": False,
            "weight": [
                {"filter": "mlp", "value": [2.0, 4.0]},
                {"filter": "attn", "value": 0.5},
                {"value": 1.0},
            ],
        },
    }
    out = load_folder(merganser.merge(recipe, tmp_path / "o"))
    src = load_folder(paths[0])
    for name, x in src.items():
        if "mlp" in name:
            i = int(name.split(".")[2])
            expected = x.float() * (2.0 + i)
        elif "attn" in name:
            expected = x.float() * 0.5
        else:
            expected = x.float()
        assert torch.equal(out[name], expected.to(torch.bfloat16)), name


def test_per_model_value_beats_top_level_default(tmp_path) -> None:
    a = write_model(tmp_path / "a", {"w": torch.tensor([1.0])})
    b = write_model(tmp_path / "b", {"w": torch.tensor([0.0])})
    r = {
        "merge_method": "linear",
        "parameters": {"weight": 3.0},
        "models": [{"model": str(a)}, {"model": str(b), "parameters": {"weight": 1.0}}],
    }
    assert load_folder(merganser.merge(r, tmp_path / "o"))["w"].item() == 0.75


def test_compute_dtype_rounds_inputs_like_mergekit(tmp_path) -> None:
    x = torch.tensor([1.0 + 2**-12], dtype=torch.float32)  # not representable in bfloat16
    a = write_model(tmp_path / "a", {"w": x})
    r = {
        "merge_method": "linear",
        "models": [{"model": str(a)}],
        "dtype": "bfloat16",
        "out_dtype": "float32",
    }
    got = load_folder(merganser.merge(r, tmp_path / "o"))["w"]
    assert got.dtype == torch.float32 and got.item() == 1.0


BLOCK_CASES = [
    ("ties", {"density": 0.3}),
    ("ties", {"density": [0.5, 0.0]}),
    ("ties", {"density": [0.3, 0.6]}),  # two samples (positions depend on k)
    ("ties", {"density": [1.0, 0.2], "rescale": "l1", "sign_method": "frequency"}),
    ("ties", {"density": 0.4, "rescale": "inverse", "normalize": False}),
    ("dare_ties", {"density": 0.5}),
    ("dare_linear", {"density": [0.3, 1.0], "rescale": "inverse"}),
    ("dare_linear", {"density": 0.7, "rescale": "none"}),
    ("task_arithmetic", {}),
    ("linear", {}),
    ("slerp", {"t": 0.3}),  # one model, far enough from the base to take the spherical path
    ("model_stock", {}),  # two statistic passes of float64 sums, defined per block
    ("sce", {}),  # one energy pass
    ("sce", {"select_topk": 0.3}),  # non-zero count, exact top-k of the variances, energies
]


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["one segment", "segments"])
@pytest.mark.parametrize(("method", "params"), BLOCK_CASES)
def test_block_path_equals_the_whole_tensor_functions(tmp_path, method, params, budget) -> None:
    """The engine merges big tensors block by block (statistic passes, segments re-read); the
    result must be the method's whole-tensor function, including top-k ties at the threshold
    (bf16 inputs repeat values) and the tensor-wide L1 rescale.
    """
    g = torch.Generator().manual_seed(1)
    base = torch.randn(700, 1100, generator=g)  # 770k entries: several blocks, > 4 samples
    spread, n = (1.0, 1) if method == "slerp" else (0.02, 2)
    models = [
        {"w": (base + spread * torch.randn(base.shape, generator=g)).to(torch.bfloat16)}
        for _ in range(n)
    ]
    paths = [write_model(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    b = write_model(tmp_path / "base", {"w": base.to(torch.bfloat16)})
    recipe = {
        "merge_method": method,
        "random_seed": 5,
        "dtype": "float32",
        "out_dtype": "float32",
        "models": [{"model": str(p)} for p in paths],
        "parameters": params,
    }
    if method != "linear":
        recipe["base_model"] = str(b)
    opts = merganser.MergeOptions(memory_budget=budget, threads=2)
    got = load_folder(merganser.merge(recipe, tmp_path / "out", opts))["w"]
    plan = build_plan(parse_recipe(recipe))
    try:
        task = next(t for t in plan.tasks if t.name == "w")
        from merganser.pipeline.engine import blockwise

        assert blockwise(plan, task, opts.engine_options().device)
        tensors = [m["w"].float() for m in models]
        base_f = base.to(torch.bfloat16).float() if method != "linear" else None
        want = plan.method(tensors, base_f, **task.params)
    finally:
        plan.close()
    # Bit-exact, except that L1 rescaling and SLERP's angle sum in another order (float64,
    # block by block).
    l1 = params.get("rescale", "l1" if "dare" in method else "none") == "l1"
    tol = 1e-6 if l1 or method == "slerp" else 0.0
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("budget", [None, 6 << 20], ids=["whole", "pieces and segments"])
@pytest.mark.parametrize("non_linear", [False, True])
def test_dppa_in_pieces_and_blocks_equals_its_whole_tensor_merge(
    tmp_path, budget, non_linear
) -> None:
    """DPPA's statistic passes read pieces (a small budget cuts each tensor in three) and its
    merge runs block by block (exact top-k partitions from StreamingTopK, ties at the threshold
    from bf16 inputs): the result is ``merge_tensors``' whole-tensor DPPA, bit for bit."""
    from merganser.methods.dppa import DppaBlocks
    from merganser.pipeline.engine import block_merge

    g = torch.Generator().manual_seed(2)
    names = [f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("up_proj", "down_proj")]
    shapes = {n: (611, 1031) for n in names} | {"model.embed_tokens.weight": (700, 400)}
    base = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
    models = []
    for m in range(3):
        scale = {n: 0.02 * (1 + (j + m) % 3) for j, n in enumerate(shapes)}
        models.append({n: (base[n].float() + scale[n] * torch.randn(shapes[n], generator=g)
                           .mul(10).round().div(10)).bfloat16() for n in shapes})  # fmt: skip
    paths = [write_model(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    params = {"amplify_non_linear": non_linear, "factor_next": 1.2}
    recipe = {
        "merge_method": "dppa",
        "base_model": str(write_model(tmp_path / "base", base)),
        "dtype": "float32",
        "out_dtype": "float32",
        "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths],
        "parameters": params,
    }
    opts = merganser.MergeOptions(memory_budget=budget, threads=2)
    got = load_folder(merganser.merge(recipe, tmp_path / "out", opts))
    want = merganser.merge_tensors(
        "dppa", [{n: t.float() for n, t in m.items()} for m in models],
        base={n: t.float() for n, t in base.items()}, weight=0.5, **params,
    )  # fmt: skip
    plan = build_plan(parse_recipe(recipe))
    try:
        for task in plan.tasks:
            assert isinstance(block_merge(plan, task), DppaBlocks), task.name
    finally:
        plan.close()
    for n in shapes:
        assert torch.equal(got[n], want[n]), n


@pytest.mark.parametrize(
    ("path", "block"),
    [("direct", 8192), ("page cache", 8192), ("direct refused", 8192), ("page cache", 256)],
)
def test_shards_staged_out_of_order_are_written_and_hashed_exactly(
    tmp_path, monkeypatch, path, block
) -> None:
    """Chunks land out of order on several threads into a staging area of a few small blocks;
    the files must hold the same bytes whichever way they reach the disk (O_DIRECT, the page
    cache where the file system has no O_DIRECT, or the page cache after the device refuses
    O_DIRECT's alignment), and the BLAKE3 hashed from the staged blocks must be the hash of the
    files (what `merganser verify` recomputes). Blocks of 256 bytes are smaller than a header.
    """
    import errno
    import json
    import os

    from blake3 import blake3

    import merganser.storage.writer as writer

    paths = _family(tmp_path, layers=6)
    opts = merganser.MergeOptions(threads=3, memory_budget=4096, out_shard_size=20_000)
    want = load_folder(merganser.merge(_recipe(paths), tmp_path / "ref"))
    monkeypatch.setattr(writer, "STAGE_BLOCK", block)
    monkeypatch.setattr(writer, "STAGE_LIMIT", 3)
    direct_fds: set[int] = set()
    open_direct = writer.open_direct

    def tracked(p, flags):
        fd = None if path == "page cache" else open_direct(p, flags)
        if fd is not None:
            direct_fds.add(fd)
        return fd

    monkeypatch.setattr(writer, "open_direct", tracked)
    real_pwrite = os.pwrite
    direct_writes = []

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            direct_writes.append(len(data))
            if path == "direct refused":
                raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", pwrite)
    out = merganser.merge(_recipe(paths), tmp_path / "o", opts)
    assert (len(direct_writes) > 1) == (path == "direct" and bool(direct_fds))
    got = load_folder(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    shards = json.loads((out / "merganser_manifest.json").read_text())["shards"]
    assert len(shards) > 1
    for name, info in shards.items():
        data = (out / name).read_bytes()
        if block == 256:
            assert int.from_bytes(data[:8], "little") > block  # the header spans blocks
        assert info["bytes"] == len(data) and len(data) % 4096 != 0  # an unaligned tail
        assert info["blake3"] == blake3(data).hexdigest()


def test_a_failing_tensor_does_not_strand_writers_waiting_for_staging(tmp_path, monkeypatch):
    """Writers wait while the staging area is full, until the block the output is stalled on
    arrives; when the merge of that block's tensor fails, they must be released, not hang.
    """
    import threading
    import time

    import merganser.pipeline.engine as engine
    import merganser.storage.writer as writer

    g = torch.Generator().manual_seed(0)
    m = write_model(tmp_path / "m", {f"t{i}": torch.randn(256, 256, generator=g) for i in range(8)})
    recipe = {"merge_method": "linear", "models": [{"model": str(m)}]}
    monkeypatch.setattr(writer, "STAGE_BLOCK", 4096)
    monkeypatch.setattr(writer, "STAGE_LIMIT", 2)
    check = engine._check_finite

    def fail_first(task, out, options):
        if task.name == "t0":
            time.sleep(0.5)  # the other threads run ahead and fill the staging area
            raise merganser.MerganserError("tensor t0: boom")
        check(task, out, options)

    monkeypatch.setattr(engine, "_check_finite", fail_first)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            merganser.merge(recipe, tmp_path / "out", merganser.MergeOptions(threads=3))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "merge hung after a tensor failed"
    assert len(errors) == 1 and "tensor t0: boom" in str(errors[0])
    assert not (tmp_path / "out").exists()


def test_a_block_merge_reads_a_tensor_it_can_hold_once(tmp_path, monkeypatch) -> None:
    """TIES needs three passes over a tensor. Within ``max_hold_bytes`` (though far over
    ``max_item_bytes``) its inputs are read once and held; beyond, they are read once per pass.
    The result is the same either way, and reaches the sink in pieces of at most OUT_PIECE.
    """
    from merganser.pipeline import engine
    from merganser.storage.checkpoint import Checkpoint

    g = torch.Generator().manual_seed(3)
    base = torch.randn(700, 1100, generator=g)
    paths = [
        write_model(tmp_path / f"m{i}", {"w": (base + 0.02 * torch.randn(base.shape, generator=g))})
        for i in range(2)
    ]
    recipe = {
        "merge_method": "ties",
        "dtype": "bfloat16",
        "base_model": str(write_model(tmp_path / "base", {"w": base})),
        "models": [{"model": str(p)} for p in paths],
        "parameters": {"density": 0.3},
    }
    read = {"bytes": 0}
    original = Checkpoint._read_bytes

    def counting(self, path, buf, offset, again):  # type: ignore[no-untyped-def]
        read["bytes"] += buf.numel()
        return original(self, path, buf, offset, again)

    monkeypatch.setattr(Checkpoint, "_read_bytes", counting)
    monkeypatch.setattr(engine, "OUT_PIECE", 2 * engine.BLOCK * 2)  # two blocks of bf16
    pieces: list[int] = []
    outputs = {}
    for hold in (16 << 20, 1 << 20):
        plan = build_plan(parse_recipe(recipe))
        try:
            read["bytes"] = 0
            out = torch.empty(base.numel(), dtype=torch.bfloat16)

            def sink(task, t, start, out=out):  # type: ignore[no-untyped-def]
                out[start : start + t.numel()] = t.reshape(-1)
                pieces.append(t.numel())

            opts = EngineOptions(memory_budget=1 << 30, max_item_bytes=1 << 20, max_hold_bytes=hold)
            engine.run(plan, sink, opts)
            outputs[hold] = (read["bytes"], out)
        finally:
            plan.close()
    once = 3 * base.numel() * 4  # three float32 inputs
    assert outputs[16 << 20][0] == once
    assert outputs[1 << 20][0] == 3 * once  # pass 0, pass 1, the merge pass
    assert torch.equal(outputs[16 << 20][1], outputs[1 << 20][1])
    assert max(pieces) == 2 * engine.BLOCK and sum(pieces) == 2 * base.numel()


def test_progress_counts_each_piece_once(tmp_path) -> None:
    """A blockwise TIES item sends one part per block; the bar counted each part as a piece
    and overran its total ("129/75 pieces").
    """
    from merganser.pipeline.engine import run, work_items
    from merganser.pipeline.progress import Progress

    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 1100, generator=g)
    paths = [
        write_model(tmp_path / f"m{i}", {"w": base + 0.02 * torch.randn(base.shape, generator=g),
                                         "b": torch.randn(8, generator=g)})
        for i in range(2)
    ]  # fmt: skip
    b = write_model(tmp_path / "base", {"w": base, "b": torch.zeros(8)})
    recipe = {"merge_method": "ties", "base_model": str(b), "parameters": {"density": 0.3},
              "models": [{"model": str(p)} for p in paths]}  # fmt: skip
    plan = build_plan(parse_recipe(recipe))
    try:
        opts = merganser.MergeOptions(threads=2, memory_budget=6 << 20).engine_options()
        items = work_items(plan, opts)
        assert any(i.blocks for i in items)
        sent = []
        bar = Progress(plan.out_nbytes, len(items), enabled=False)
        run(plan, lambda task, t, start: sent.append(t.numel()), opts, bar.update, None, items)
        assert len(sent) > len(items)  # several parts for the blockwise tensor
        assert bar.items == len(items)
    finally:
        plan.close()
