"""Runs FusionBench 0.2.33's own merging functions on plain state dicts, in FusionBench's venv.

    python fusionbench_driver.py IN.safetensors OPS.json OUT.safetensors

IN holds ``base.<k>``, ``expert<i>.<k>`` and, for the data-aware methods, ``gram<i>.<module>``
and ``fisher<i>.<k>``; OPS is a list of ``{"name", "method", ...parameters}``; OUT gets
``<name>.<k>`` for every merged tensor. Only FusionBench's functions do the merging here.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file


def main() -> int:
    src, ops_path, dst = sys.argv[1:4]
    t = load_file(src)
    with open(ops_path) as f:
        ops = json.load(f)
    base = {k[5:]: v for k, v in t.items() if k.startswith("base.")}
    n = 1 + max(int(k[6 : k.index(".")]) for k in t if k.startswith("expert"))
    experts = [{k: t[f"expert{i}.{k}"] for k in base} for i in range(n)]
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]
    out: dict[str, torch.Tensor] = {}
    for op in ops:
        merged = run(op, base, experts, tvs, t, n)
        out.update({f"{op['name']}.{k}": v.contiguous() for k, v in merged.items()})
    save_file(out, dst)
    return 0


def run(op, base, experts, tvs, t, n):
    m = op["method"]
    add = lambda tv, s: {k: base[k] + s * tv[k] for k in base}  # noqa: E731
    if m == "tsv_m":
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
            compute_and_sum_svd_mem_reduction,
        )

        return add(compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"), op["alpha"])
    if m == "iso_c":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c

        return add(iso_c(tvs, accelerator="cpu"), op["alpha"])
    if m == "iso_cts":
        from fusion_bench.method.isotropic_merging.iso_utils import iso_cts

        tv = iso_cts(tvs, op["common_space_fraction"], accelerator="cpu")
        return add(tv, op["alpha"])
    if m == "wudi":
        from fusion_bench.method.wudi.wudi import wudi_merging

        tv = wudi_merging(tvs, accelerator="cpu", iter_num=op["steps"])
        return add({k: v.detach() for k, v in tv.items()}, op["lambda"])
    if m == "ties":
        from fusion_bench.method.ties_merging.ties_merging_utils import (
            state_dict_to_vector,
            ties_merging,
            vector_to_state_dict,
        )

        flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
        merged = ties_merging(flat, reset_thresh=op["k"], merge_func="mean")
        return add(vector_to_state_dict(merged, tvs[0]), op["lambda"])
    if m == "magmax":
        from fusion_bench.method.magmax.magmax import _magmax_select

        return add(_magmax_select(tvs), op["lambda"])
    if m == "consensus":
        from fusion_bench.method.tall_mask.utils import generate_task_masks

        keys = list(base)
        flat_tv = torch.vstack([torch.cat([tv[k].flatten() for k in keys]) for tv in tvs])
        flat_ft = torch.vstack([torch.cat([e[k].flatten() for k in keys]) for e in experts])
        flat_ptm = torch.cat([base[k].flatten() for k in keys])
        masks = generate_task_masks(flat_tv, flat_ft, flat_ptm, tall_mask_lambda=op["mask_lambda"])
        consensus = masks.float().sum(0) >= op["k"]
        flat = flat_tv.sum(0) * consensus
        out, i = {}, 0
        for k in keys:
            out[k] = flat[i : i + base[k].numel()].reshape(base[k].shape)
            i += base[k].numel()
        return add(out, op["alpha"])
    if m == "regmean":
        from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

        params = {k: [e[k] for e in experts] for k in base}
        grams = [
            {k[len(f"gram{i}.") :]: v for k, v in t.items() if k.startswith(f"gram{i}.")}
            for i in range(n)
        ]
        return merging_with_regmean_weights(params, grams, op["alpha"], weight_transpose=True)
    if m == "regmean_plusplus":
        from fusion_bench.method.regmean_plusplus.regmean_plusplus import regmean_params_merge

        out = {}
        for k in base:
            module = k[: -len(".weight")] if k.endswith(".weight") else None
            stats = [t.get(f"gram{i}.{module}") for i in range(n)]
            if module is None or stats[0] is None:
                out[k] = torch.stack([e[k] for e in experts]).mean(0)
                continue
            out[k] = regmean_params_merge(
                param_weight_list=[e[k] for e in experts],
                param_regmean_list=stats,
                reduce_non_diagonal_ratio=op["alpha"],
                weight_transpose=True,
                module_name=module,
                device="cpu",
            )
        return out
    if m == "fisher":
        from fusion_bench.method.fisher_merging.fisher_merging import (
            merging_with_fisher_weights,
        )

        params = {k: [e[k] for e in experts] for k in base}
        fishers = [{k: t[f"fisher{i}.{k}"] for k in base} for i in range(n)]
        return merging_with_fisher_weights(
            params, fishers, torch.ones(n), op["normalize"], op["floor"]
        )
    raise SystemExit(f"unknown method {m}")


if __name__ == "__main__":
    sys.exit(main())
