"""Planning: from a recipe and checkpoint headers to the list of output tensors and their inputs.

Nothing here reads tensor data. Every check that can fail (paths, names, shapes, dtypes,
parameter values) fails here, before the first byte of weights is touched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from merganser.checkpoint import Checkpoint
from merganser.dtypes import itemsize, parse_dtype
from merganser.errors import CheckpointError, RecipeError
from merganser.methods import IGNORED_PARAMS, Method, get_method
from merganser.naming import depth, layer_index
from merganser.recipe import ParamValue, Recipe, evaluate


@dataclass
class TensorTask:
    """One output tensor: where its inputs come from and the method parameters it uses."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: list[tuple[int, str]]  # (checkpoint index, tensor name) fed to the method, in order
    base: tuple[int, str] | None
    params: dict[str, Any]
    copy_only: bool = False  # non-float buffers are copied from the reference model

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    checkpoints: list[Checkpoint]
    refs: list[str]  # the recipe's reference for each checkpoint
    reference: int  # index of the checkpoint whose names, config and tokenizer are the template
    tasks: list[TensorTask] = field(default_factory=list)
    compute_dtype: torch.dtype | None = None  # inputs are rounded to this first (mergekit `dtype`)

    @property
    def reference_checkpoint(self) -> Checkpoint:
        return self.checkpoints[self.reference]

    @property
    def out_nbytes(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()


def build_plan(recipe: Recipe) -> Plan:
    """Open every checkpoint's headers and plan each output tensor; raise on any mismatch."""
    src = recipe.source_name
    method = get_method(recipe.merge_method, f"{src}: merge_method")
    if recipe.slices:
        raise RecipeError(f"{src}: slices: layer slicing is not supported yet")
    compute_dtype = parse_dtype(recipe.dtype, f"{src}: dtype") if recipe.dtype else None
    out_dtype = (
        parse_dtype(recipe.out_dtype, f"{src}: out_dtype") if recipe.out_dtype else compute_dtype
    )

    refs = recipe.model_paths()
    checkpoints: list[Checkpoint] = []
    try:
        for ref in refs:
            try:
                checkpoints.append(Checkpoint(recipe.resolve(ref)))
            except CheckpointError as e:
                where = "base_model" if ref == recipe.base_model else "models"
                raise CheckpointError(
                    f"{recipe.source_name}: {where}: {e} (merganser never downloads; "
                    "give a local path)"
                    if "no such file" in str(e)
                    else str(e)
                ) from None
        plan = _plan_models(recipe, method, checkpoints, refs, out_dtype)
        plan.compute_dtype = compute_dtype
        return plan
    except BaseException:
        for c in checkpoints:
            c.close()
        raise


def _plan_models(
    recipe: Recipe,
    method: Method,
    checkpoints: list[Checkpoint],
    refs: list[str],
    out_dtype: torch.dtype | None,
) -> Plan:
    name = recipe.source_name
    entries = recipe.models or []
    index = {ref: i for i, ref in enumerate(refs)}
    base_idx = index[recipe.base_model] if recipe.base_model else None
    if method.needs_base and base_idx is None:
        raise RecipeError(f"{name}: base_model: method {method.name!r} needs a base_model")
    uses_base = base_idx is not None and method.takes_base
    # Task-vector methods never treat the base as a contributor (its task vector is zero).
    contributors = [
        (i, e) for i, e in enumerate(entries) if not (uses_base and e.model == recipe.base_model)
    ]
    if len(contributors) < method.min_models:
        raise RecipeError(
            f"{name}: models: method {method.name!r} needs at least {method.min_models} "
            f"model(s) besides the base, got {len(contributors)}"
        )
    if method.max_models is not None and len(contributors) > method.max_models:
        raise RecipeError(
            f"{name}: models: method {method.name!r} takes at most {method.max_models} "
            f"model(s), got {len(contributors)}"
        )
    _check_param_names(recipe, method)

    reference = base_idx if base_idx is not None else index[contributors[0][1].model]
    ref_ckpt = checkpoints[reference]
    num_layers = ref_ckpt.num_layers() or 1 + max(
        (layer_index(n) or 0 for n in ref_ckpt.tensors), default=0
    )
    plan = Plan(recipe, method, checkpoints, refs, reference)
    users = [index[e.model] for _, e in contributors]
    needed = [*users, base_idx] if uses_base else users
    # Read in the reference's on-disk order so each input file is walked front to back.
    ordered = sorted(ref_ckpt.tensors.values(), key=lambda i: (str(i.file), i.start))
    for info in ordered:
        for ci in needed:
            other = checkpoints[ci].tensors.get(info.name)
            where = f"{refs[ci]}: tensor {info.name!r}"
            if other is None:
                raise CheckpointError(f"{where}: missing (present in {refs[reference]})")
            if other.shape != info.shape:
                raise CheckpointError(
                    f"{where}: shape {list(other.shape)} does not match {list(info.shape)} "
                    f"in {refs[reference]}"
                )
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{where}: dtype {other.dtype} cannot be merged with {info.dtype} "
                    f"in {refs[reference]}"
                )
        if not info.dtype.is_floating_point:
            plan.tasks.append(
                TensorTask(
                    info.name,
                    info.shape,
                    info.dtype,
                    [(reference, info.name)],
                    None,
                    {},
                    copy_only=True,
                )
            )
            continue
        t = depth(info.name, num_layers)
        params = _evaluate_params(recipe, method, contributors, info.name, t)
        plan.tasks.append(
            TensorTask(
                name=info.name,
                shape=info.shape,
                out_dtype=out_dtype or info.dtype,
                sources=[(ci, info.name) for ci in users],
                base=(base_idx, info.name) if uses_base else None,
                params=params,
            )
        )
    return plan


def _check_param_names(recipe: Recipe, method: Method) -> None:
    def check(params: dict[str, ParamValue] | None, where: str, per_model: bool) -> None:
        for key in params or {}:
            if key in IGNORED_PARAMS:
                continue
            p = method.param(key)
            if p is None:
                known = ", ".join(q.name for q in method.params) or "none"
                raise RecipeError(
                    f"{recipe.source_name}: {where}.{key}: unknown parameter for method "
                    f"{method.name!r} (expected: {known})"
                )
            if per_model and p.scope == "global":
                raise RecipeError(
                    f"{recipe.source_name}: {where}.{key}: {key!r} is a global parameter of "
                    f"{method.name!r}; set it under the top-level parameters"
                )

    check(recipe.parameters, "parameters", False)
    for i, e in enumerate(recipe.models or []):
        check(e.parameters, f"models[{i}].parameters", True)


def _evaluate_params(
    recipe: Recipe, method: Method, entries: list[tuple[int, Any]], tensor: str, t: float
) -> dict[str, Any]:
    top = recipe.parameters or {}
    out: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "model":
            values = []
            for i, e in entries:
                own = (e.parameters or {}).get(p.name)
                v = evaluate(own, tensor, t) if own is not None else None
                key = f"models[{i}].parameters.{p.name}"
                if v is None and p.name in top:
                    v = evaluate(top[p.name], tensor, t)
                    key = f"parameters.{p.name}"
                where = f"{recipe.source_name}: {key} (tensor {tensor})"
                values.append(p.check(p.default if v is None else v, where))
            out[p.arg] = values
        else:
            v = evaluate(top[p.name], tensor, t) if p.name in top else None
            where = f"{recipe.source_name}: parameters.{p.name} (tensor {tensor})"
            out[p.arg] = p.check(p.default if v is None else v, where)
    if method.stochastic:
        out["seed"] = tensor_seed(recipe.random_seed or 0, tensor)
    if method.validate is not None:
        problem = method.validate(out)
        if problem:
            raise RecipeError(f"{recipe.source_name}: parameters (tensor {tensor}): {problem}")
    return out


def tensor_seed(seed: int, tensor: str) -> int:
    """A per-tensor seed that depends only on the recipe's seed and the tensor's name."""
    digest = hashlib.blake2b(f"{seed}:{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
