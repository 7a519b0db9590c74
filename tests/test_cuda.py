"""--device cuda runs the arithmetic on a GPU and gives the CPU's results (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import load_folder, random_models, ties_recipe, write_model

import merganser

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "della",
    "breadcrumbs",
    "slerp",
    "model_stock",
    "sce",
    "dppa",
    "karcher",
]


@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(tmp_path, method) -> None:
    g = torch.Generator().manual_seed(0)

    def t():
        return {
            "model.layers.0.mlp.weight": torch.randn(64, 32, generator=g),
            "model.layers.1.mlp.weight": torch.randn(64, 32, generator=g),
            "model.norm.weight": torch.randn(32, generator=g),
        }

    paths = [write_model(tmp_path / f"m{i}", t(), {"num_hidden_layers": 2}) for i in range(3)]
    needs_base = method not in ("linear", "karcher")
    recipe = {
        "merge_method": method,
        "random_seed": 1,
        "models": [{"model": str(p)} for p in (paths[1:] if needs_base else paths)][
            : 1 if method == "slerp" else None
        ],
    }
    if needs_base:
        recipe["base_model"] = str(paths[0])
    if method in ("ties", "dare_ties", "breadcrumbs"):
        recipe["parameters"] = {"density": 0.5}
    if method == "della":
        recipe["parameters"] = {"density": 0.5, "epsilon": 0.1}
    cpu = load_folder(merganser.merge(recipe, tmp_path / "cpu"))
    gpu = load_folder(
        merganser.merge(recipe, tmp_path / "gpu", merganser.MergeOptions(device="cuda"))
    )
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5)


def test_cuda_calibration_matches_cpu(reduced_zoo) -> None:
    from merganser.evaluation.calibrate import CalibrationOptions, calibrate

    model = reduced_zoo / "zoo" / "seed0" / "expert_add"
    texts = ["REV:abc=cba", "ADD:1+2=3", "REV:abcdh=hdcba", "ADD:9+9=18"]
    opts = CalibrationOptions(batch=2, fisher=True)
    cpu, meta_cpu = calibrate(model, texts, options=opts)
    gpu, meta_gpu = calibrate(model, texts, options=CalibrationOptions(batch=2, fisher=True,
                                                                       device="cuda"))  # fmt: skip
    assert meta_gpu["tokens"] == meta_cpu["tokens"] and cpu.keys() == gpu.keys()
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        # TF32 and other reduction orders: agreement to a relative tolerance, not bits.
        torch.testing.assert_close(gpu[k], cpu[k], rtol=2e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("scope", ["per_tensor", "global"])
def test_a_tensor_too_large_for_gpu_memory_is_merged_on_the_cpu(tmp_path, scope) -> None:
    """With --gpu-memory too small for one tensor, that tensor is merged on the CPU (block by
    block where the method can) and the rest on the GPU; the result is the CPU's, and the GPU
    never held more than the budget.
    """
    shapes = {"big.weight": (4096, 512), "a.weight": (256, 512), "b.weight": (64, 512)}
    recipe = ties_recipe(tmp_path, shapes, seed=2, scope=scope)
    # 3 inputs of 2M entries need about 120 MB in float32 with TIES' workspace; the others fit.
    budget = 32 << 20
    cpu = load_folder(merganser.merge(recipe, tmp_path / "cpu"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opts = merganser.MergeOptions(device="cuda", gpu_memory=budget)
    gpu = load_folder(merganser.merge(recipe, tmp_path / "gpu", opts))
    assert torch.cuda.max_memory_allocated() - base <= budget
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-4, atol=1e-5, msg=k)


def test_gpu_memory_in_flight_stays_within_the_budget(tmp_path) -> None:
    """Sixteen threads merging many tensors on the GPU hold at most --gpu-memory at once."""
    paths = random_models(tmp_path, {f"w{i}": (512, 512) for i in range(32)}, 4, 3, "m")
    budget = 64 << 20
    for method in ("ties", "slerp", "linear"):
        recipe = {
            "merge_method": method,
            "base_model": str(paths[0]),
            "models": [{"model": str(p)} for p in paths[1 : 2 if method == "slerp" else None]],
            "parameters": {"t": 0.3} if method == "slerp" else {"density": 0.5},
        }
        if method == "linear":
            recipe = {"merge_method": "linear", "models": [{"model": str(p)} for p in paths]}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        opts = merganser.MergeOptions(device="cuda", gpu_memory=budget, threads=16)
        merganser.merge(recipe, tmp_path / method, opts)
        peak = torch.cuda.max_memory_allocated() - base
        assert 0 < peak <= budget, (method, peak)
