"""Planning: from a recipe and checkpoint headers to the list of output tensors and their inputs.

Nothing here reads tensor data. Every check that can fail (paths, names, shapes, dtypes,
parameter values) fails here, before the first byte of weights is touched.

Like mergekit, a ``models:`` recipe is one group spanning every layer, and a ``slices:`` recipe
is one group per slice whose layers are renumbered into a new stack; embeddings take the first
group's inputs and the final norm and head the last group's (both at gradient depth t = 0).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from merganser.checkpoint import Checkpoint, ReadMode
from merganser.dtypes import itemsize, parse_dtype
from merganser.errors import CheckpointError, RecipeError
from merganser.methods import IGNORED_PARAMS, Method, get_method
from merganser.naming import depth, layer_index
from merganser.recipe import ParamValue, Recipe, evaluate

_VOCAB_RE = re.compile(r"embed|lm_head|wte|word_embeddings|output\.weight$")
_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings")


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
    fill: tuple[int, str] | None = None  # vocab policy: inputs are cut or padded to ``shape``
    stats: list[tuple[int, str] | None] | None = None  # per source: its calibration statistic

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_nbytes(self) -> int:
        return self.numel * itemsize(self.out_dtype)

    @property
    def inputs(self) -> list[tuple[int, str]]:
        """The tensors the method reads: the sources, then the base if any."""
        return [*self.sources, *([self.base] if self.base else [])]


@dataclass
class Plan:
    recipe: Recipe
    method: Method
    checkpoints: list[Checkpoint]
    refs: list[str]  # the recipe's reference for each checkpoint
    reference: int  # index of the checkpoint whose names, config and tokenizer are the template
    tasks: list[TensorTask] = field(default_factory=list)
    compute_dtype: torch.dtype | None = None  # inputs are rounded to this first (mergekit `dtype`)
    config_updates: dict[str, Any] = field(default_factory=dict)
    stats_files: dict[int, int] = field(default_factory=dict)  # model checkpoint -> statistics

    @property
    def reference_checkpoint(self) -> Checkpoint:
        return self.checkpoints[self.reference]

    @property
    def out_nbytes(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    def close(self) -> None:
        for c in self.checkpoints:
            c.close()


@dataclass
class _Contributor:
    label: str  # where its parameters live in the recipe, for messages
    ckpt: int
    params: dict[str, ParamValue] | None
    start: int = 0  # first input layer


@dataclass
class _Group:
    label: str
    contributors: list[_Contributor]
    base: _Contributor | None
    params: dict[str, ParamValue] | None
    params_label: str
    count: int | None  # layers in the group; None: every layer, names unchanged
    offset: int = 0  # first output layer


def build_plan(recipe: Recipe, read_mode: ReadMode = "auto") -> Plan:
    """Open every checkpoint's headers and plan each output tensor; raise on any mismatch."""
    src = recipe.source_name
    method = get_method(recipe.merge_method, f"{src}: merge_method")
    compute_dtype = parse_dtype(recipe.dtype, f"{src}: dtype") if recipe.dtype else None
    out_dtype = (
        parse_dtype(recipe.out_dtype, f"{src}: out_dtype") if recipe.out_dtype else compute_dtype
    )
    _check_param_names(recipe, method)
    refs = recipe.model_paths()
    checkpoints: list[Checkpoint] = []
    try:
        for ref in refs:
            try:
                checkpoints.append(Checkpoint(recipe.resolve(ref), read_mode))
            except CheckpointError as e:
                if "no such file" not in str(e):
                    raise
                where = "base_model" if ref == recipe.base_model else "models"
                raise CheckpointError(
                    f"{src}: {where}: {e} (merganser never downloads; give a local path)"
                ) from None
        index = {ref: i for i, ref in enumerate(refs)}
        groups = (
            _slice_groups(recipe, method, checkpoints, index)
            if recipe.slices
            else [_models_group(recipe, method, index)]
        )
        reference = (
            index[recipe.base_model]
            if recipe.base_model
            else (groups[0].base or groups[0].contributors[0]).ckpt
        )
        plan = Plan(recipe, method, checkpoints, refs, reference, compute_dtype=compute_dtype)
        if method.statistics:
            _open_statistics(plan, index)
        elif any(e.statistics for e in recipe.models or []):
            raise RecipeError(
                f"{src}: models[].statistics: method {method.name!r} uses no statistics"
            )
        _plan_tensors(plan, groups, out_dtype)
        return plan
    except BaseException:
        for c in checkpoints:
            c.close()
        raise


def _split(
    recipe: Recipe,
    method: Method,
    label: str,
    members: list[_Contributor],
    base_ref: str | None,
    index: dict[str, int],
) -> tuple[list[_Contributor], _Contributor | None]:
    """Separate the base from the contributors and check the method's model count."""
    name = recipe.source_name
    base_ckpt = index[base_ref] if base_ref else None
    if method.needs_base and base_ckpt is None:
        raise RecipeError(f"{name}: base_model: method {method.name!r} needs a base_model")
    uses_base = base_ckpt is not None and method.takes_base
    base = None
    if uses_base:
        base = next((m for m in members if m.ckpt == base_ckpt), None) or _Contributor(
            "base_model",
            base_ckpt,  # type: ignore[arg-type]
            None,
        )
    # Task-vector methods never treat the base as a contributor (its task vector is zero).
    contributors = [m for m in members if not (uses_base and m.ckpt == base_ckpt)]
    if len(contributors) < method.min_models:
        raise RecipeError(
            f"{name}: {label}: method {method.name!r} needs at least {method.min_models} "
            f"model(s) besides the base, got {len(contributors)}"
        )
    if method.max_models is not None and len(contributors) > method.max_models:
        raise RecipeError(
            f"{name}: {label}: method {method.name!r} takes at most {method.max_models} "
            f"model(s), got {len(contributors)}"
        )
    return contributors, base


def _models_group(recipe: Recipe, method: Method, index: dict[str, int]) -> _Group:
    members = [
        _Contributor(f"models[{i}].parameters", index[e.model], e.parameters)
        for i, e in enumerate(recipe.models or [])
    ]
    contributors, base = _split(recipe, method, "models", members, recipe.base_model, index)
    return _Group("models", contributors, base, None, "", None)


def _slice_groups(
    recipe: Recipe, method: Method, checkpoints: list[Checkpoint], index: dict[str, int]
) -> list[_Group]:
    name = recipe.source_name
    groups: list[_Group] = []
    offset = 0
    for si, sl in enumerate(recipe.slices or []):
        label = f"slices[{si}]"
        if not sl.sources:
            raise RecipeError(f"{name}: {label}.sources: at least one source is required")
        members, counts = [], set()
        for j, s in enumerate(sl.sources):
            lo, hi = s.layer_range
            ckpt = checkpoints[index[s.model]]
            total = _num_layers(ckpt)
            if not 0 <= lo < hi <= total:
                raise RecipeError(
                    f"{name}: {label}.sources[{j}].layer_range: [{lo}, {hi}] is not within "
                    f"the {total} layers of {s.model}"
                )
            counts.add(hi - lo)
            members.append(
                _Contributor(f"{label}.sources[{j}].parameters", index[s.model], s.parameters, lo)
            )
        if len(counts) != 1:
            raise RecipeError(f"{name}: {label}: all sources must span the same number of layers")
        base_ref = sl.base_model or recipe.base_model
        if base_ref and base_ref not in index:
            raise RecipeError(f"{name}: {label}.base_model: {base_ref!r} is not a known model")
        contributors, base = _split(recipe, method, f"{label}.sources", members, base_ref, index)
        count = counts.pop()
        groups.append(
            _Group(label, contributors, base, sl.parameters, f"{label}.parameters", count, offset)
        )
        offset += count
    return groups


def _num_layers(ckpt: Checkpoint) -> int:
    return ckpt.num_layers() or 1 + max((layer_index(n) or 0 for n in ckpt.tensors), default=-1)


def _with_layer(name: str, layer: int) -> str:
    idx = layer_index(name)
    assert idx is not None
    return re.sub(
        rf"(^|\.)((?:layers|h|blocks|block|layer)\.){idx}\.", rf"\g<1>\g<2>{layer}.", name, count=1
    )


def _plan_tensors(plan: Plan, groups: list[_Group], out_dtype: torch.dtype | None) -> None:
    ckpts = plan.checkpoints
    ref = ckpts[plan.reference]
    ordered = sorted(ref.tensors.values(), key=lambda i: (str(i.file), i.start))
    if groups[0].count is None:  # models: every tensor, names unchanged
        num_layers = _num_layers(ref)
        for info in ordered:
            _add_task(
                plan,
                groups[0],
                info.name,
                lambda c, n=info.name: n,
                depth(info.name, num_layers),
                out_dtype,
            )
        return
    outside = [i.name for i in ordered if layer_index(i.name) is None]
    for n in outside:
        if _PRE_RE.search(n):
            _add_task(plan, groups[0], n, lambda c, n=n: n, 0.0, out_dtype)
    for g in groups:
        first = g.base or g.contributors[0]
        for j in range(g.count or 0):
            t = j / (g.count - 1) if g.count and g.count > 1 else 1.0
            template = [n for n in ckpts[first.ckpt].tensors if layer_index(n) == first.start + j]
            for n in sorted(template, key=lambda n: ckpts[first.ckpt].tensors[n].start):
                _add_task(
                    plan,
                    g,
                    _with_layer(n, g.offset + j),
                    lambda c, n=n, j=j: _with_layer(n, c.start + j),
                    t,
                    out_dtype,
                )
    for n in outside:
        if not _PRE_RE.search(n):
            _add_task(plan, groups[-1], n, lambda c, n=n: n, 0.0, out_dtype)
    plan.config_updates["num_hidden_layers"] = groups[-1].offset + (groups[-1].count or 0)


def _add_task(
    plan: Plan, g: _Group, out_name: str, input_name: Any, t: float, out_dtype: torch.dtype | None
) -> None:
    """Check the inputs of one output tensor and append its task."""
    recipe, method, ckpts = plan.recipe, plan.method, plan.checkpoints
    members = [*g.contributors, *([g.base] if g.base else [])]
    infos = []
    for m in members:
        in_name = input_name(m)
        info = ckpts[m.ckpt].tensors.get(in_name)
        if info is None:
            raise CheckpointError(
                f"{plan.refs[m.ckpt]}: tensor {in_name!r}: missing "
                f"(needed for output tensor {out_name!r})"
            )
        infos.append((m, info))
    lead_m, lead = infos[-1] if g.base else infos[0]
    shape, fill = lead.shape, None
    for m, info in infos:
        where = f"{plan.refs[m.ckpt]}: tensor {info.name!r}"
        if info.dtype.is_floating_point != lead.dtype.is_floating_point:
            raise CheckpointError(
                f"{where}: dtype {info.dtype} cannot be merged with "
                f"{lead.dtype} in {plan.refs[lead_m.ckpt]}"
            )
        if info.shape != lead.shape:
            shape, fill = _vocab_fit(
                recipe, where, out_name, [i for _, i in infos], lead, (lead_m.ckpt, lead.name)
            )
            if shape is None:
                raise CheckpointError(
                    f"{where}: shape {list(info.shape)} does not match "
                    f"{list(lead.shape)} in {plan.refs[lead_m.ckpt]}"
                )
    if not lead.dtype.is_floating_point:
        plan.tasks.append(
            TensorTask(
                out_name,
                lead.shape,
                lead.dtype,
                [(lead_m.ckpt, lead.name)],
                None,
                {},
                copy_only=True,
            )
        )
        return
    params = _evaluate_params(recipe, method, g, out_name, t)
    stats = None
    if plan.stats_files:
        stats = [_stat_ref(plan, m.ckpt, input_name(m), shape) for m in g.contributors]
        if method.statistics == "fisher":
            params["fisher_norms"] = [
                float(ckpts[plan.stats_files[m.ckpt]].metadata.get("fisher_norm", "nan"))
                for m in g.contributors
            ]
    plan.tasks.append(
        TensorTask(
            name=out_name,
            shape=shape,
            out_dtype=out_dtype or lead.dtype,
            sources=[(m.ckpt, input_name(m)) for m in g.contributors],
            base=(g.base.ckpt, input_name(g.base)) if g.base else None,
            params=params,
            fill=fill,
            stats=stats,
        )
    )
    if fill is not None and "vocab_size" not in plan.config_updates and shape:
        plan.config_updates["vocab_size"] = shape[0]


def _open_statistics(plan: Plan, index: dict[str, int]) -> None:
    """Open each model's calibration file and check it holds the kind the method needs."""
    recipe, kind = plan.recipe, plan.method.statistics
    src = recipe.source_name
    if recipe.slices:
        raise RecipeError(f"{src}: method {plan.method.name!r} takes models:, not slices:")
    for i, e in enumerate(recipe.models or []):
        if e.model == recipe.base_model and plan.method.takes_base:
            continue
        if not e.statistics:
            raise RecipeError(
                f"{src}: models[{i}].statistics: method {plan.method.name!r} needs each model's "
                f"{kind} statistics (make them with `merganser calibrate`)"
            )
        path = recipe.resolve(e.statistics)
        ckpt = Checkpoint(path)
        plan.checkpoints.append(ckpt)
        plan.refs.append(e.statistics)
        kinds = ckpt.metadata.get("kinds", "").split(",")
        if (
            not ckpt.metadata.get("format", "").startswith("merganser-statistics")
            or kind not in kinds
        ):
            raise CheckpointError(
                f"{path}: holds no {kind} statistics (expected `merganser calibrate "
                f"--{'grams' if kind == 'gram' else 'fisher'}` output)"
            )
        plan.stats_files[index[e.model]] = len(plan.checkpoints) - 1


def _stat_ref(plan: Plan, model: int, name: str, shape: tuple[int, ...]) -> tuple[int, str] | None:
    """Where model ``model``'s statistic for tensor ``name`` lives, after checking its shape."""
    kind = plan.method.statistics
    si = plan.stats_files[model]
    ckpt = plan.checkpoints[si]
    key = f"{kind}.{name}"
    info = ckpt.tensors.get(key)
    if kind == "gram":
        if info is None:
            return None  # not a linear layer's weight: RegMean averages it
        want = (shape[1], shape[1]) if len(shape) == 2 else None
    else:
        if info is None:
            raise CheckpointError(f"{ckpt.path}: {key!r} missing (the Fisher of {name!r})")
        want = tuple(shape)
    if want is None or tuple(info.shape) != want:
        raise CheckpointError(
            f"{ckpt.path}: {key!r} has shape {list(info.shape)}, expected "
            f"{list(want) if want else 'a 2-D weight'} for {plan.refs[model]}"
        )
    return si, key


def _vocab_fit(
    recipe: Recipe, where: str, name: str, infos: list[Any], lead: Any, lead_ref: tuple[int, str]
) -> tuple[tuple[int, ...] | None, tuple[int, str] | None]:
    """The output shape under the recipe's vocab_policy, or (None, None) for a plain mismatch."""
    ndims = {len(i.shape) for i in infos}
    if not _VOCAB_RE.search(name) or len(ndims) != 1:
        return None, None
    if recipe.vocab_policy == "error":
        shapes = sorted({tuple(i.shape) for i in infos})
        raise CheckpointError(
            f"{where}: vocabulary sizes differ ({', '.join(str(list(s)) for s in shapes)}); set "
            "vocab_policy: common_submatrix or base in the recipe"
        )
    if recipe.vocab_policy == "common_submatrix":
        return tuple(min(i.shape[d] for i in infos) for d in range(len(lead.shape))), lead_ref
    return tuple(lead.shape), lead_ref


def _check_param_names(recipe: Recipe, method: Method) -> None:
    def check(params: dict[str, ParamValue] | None, where: str, per_model: bool) -> None:
        for key, value in (params or {}).items():
            if key in IGNORED_PARAMS:
                # mergekit's int8_mask is a boolean (it only saves memory there); anything else
                # is a mistake to report, not to ignore.
                if not isinstance(value, bool):
                    raise RecipeError(
                        f"{recipe.source_name}: {where}.{key}: expected true or false, "
                        f"got {value!r}"
                    )
                continue
            if key in method.ignored:
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
    for si, sl in enumerate(recipe.slices or []):
        check(sl.parameters, f"slices[{si}].parameters", False)
        for j, s in enumerate(sl.sources):
            check(s.parameters, f"slices[{si}].sources[{j}].parameters", True)


def _evaluate_params(
    recipe: Recipe, method: Method, g: _Group, tensor: str, t: float
) -> dict[str, Any]:
    """A parameter's value for one tensor: per-model, slice, top-level, then the default."""
    layers = [(g.params_label, g.params or {}), ("parameters", recipe.parameters or {})]

    def lookup(own: tuple[str, dict[str, ParamValue]] | None, name: str) -> tuple[Any, str]:
        for label, params in ([own] if own else []) + layers:
            if name in params:
                v = evaluate(params[name], tensor, t)
                if v is not None:
                    return v, f"{label}.{name}"
        return None, f"parameters.{name}"

    out: dict[str, Any] = {}
    for p in method.params:
        if p.scope == "model":
            values = []
            for c in g.contributors:
                v, key = lookup((c.label, c.params or {}), p.name)
                where = f"{recipe.source_name}: {key} (tensor {tensor})"
                values.append(p.check(p.default if v is None else v, where))
            out[p.arg] = values
        else:
            v, key = lookup(None, p.name)
            where = f"{recipe.source_name}: {key} (tensor {tensor})"
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
