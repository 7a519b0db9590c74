"""Planning: from a recipe and checkpoint headers to the list of output tensors and their inputs.

Nothing here reads tensor data. Every check that can fail (paths, names, shapes, dtypes,
parameter values) fails here, before the first byte of weights is touched.

Like mergekit, a ``models:`` recipe is one group spanning every layer, and a ``slices:`` recipe
is one group per slice whose layers are renumbered into a new stack; embeddings take the first
group's inputs and the final norm and head the last group's (both at gradient depth t = 0).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merganser.errors import CheckpointError, RecipeError, did_you_mean
from merganser.methods import IGNORED_PARAMS, Method, all_methods, as_bool, get_method
from merganser.model import adapter, anatomy, hf
from merganser.model.hf import TOKENIZER_FILES, TOKENIZER_MARKERS
from merganser.model.naming import is_layer_linear
from merganser.model.tokenizer_merge import TokenRow, VocabPlan, plan_vocab
from merganser.pipeline.recipe import Conditional, ParamValue, Recipe, evaluate
from merganser.storage import hub
from merganser.storage.checkpoint import Checkpoint, ReadMode
from merganser.storage.dtypes import itemsize, parse_dtype

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
    # Per input (sources, then base): where its FP8 block scales are and the block size, for
    # inputs stored block-scaled in FP8 (dequantised as read); None for plain inputs.
    scales: list[tuple[int, str, tuple[int, int]] | None] | None = None
    # Rows in the output vocabulary's order (tokenizer_source): each input's rows are moved
    # and filled as Plan.vocab says before the method sees them.
    vocab: bool = False

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
    # Accepted (as mergekit accepts them) but worth a word: printed, or errors with --strict.
    warnings: list[str] = field(default_factory=list)
    config_drop: set[str] = field(default_factory=set)  # keys the output's config leaves out
    stats_files: dict[int, int] = field(default_factory=dict)  # model checkpoint -> statistics
    vocab: VocabPlan | None = None  # where vocabulary rows come from (tokenizer_source)
    tokenizer_dir: Path | None = None  # the folder whose tokenizer files the output gets

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
    module: tuple[str, dict[str, ParamValue]] | None = None  # a module's own parameters


@dataclass
class _Unit:
    """One part of the output: its groups (one models group, or slices), the reference's
    tensors it covers (None: all of them), and the layer stack its slices cut.
    """

    groups: list[_Group]
    names: set[str] | None = None
    stack: anatomy.Stack | None = None


def locate(recipe: Recipe, ref: str, offline: bool = False) -> Path:
    """The folder or file a recipe's model reference names: a local path (relative to the
    working directory, then to the recipe), else a Hugging Face hub id from the cache or
    the hub (never in offline mode).
    """
    path = recipe.resolve(ref)
    if not path.exists() and hub.is_hub_id(ref):
        return hub.resolve(ref, offline)
    return path


def reference_parts(recipe: Recipe, ref: str) -> list[str]:
    """A model reference as the references it is made of: ``BASE+ADAPTER`` as its two (unless
    a local path is literally named so), anything else as itself.
    """
    pair = None if recipe.resolve(ref).exists() else adapter.split_ref(ref)
    return list(pair) if pair else [ref]


def _open(recipe: Recipe, ref: str, read_mode: ReadMode, offline: bool) -> Checkpoint:
    """The checkpoint a model reference names: a model, ``BASE+ADAPTER``, or an adapter folder
    of the recipe's base_model (read as base + adapter, adapter.py).
    """
    parts = reference_parts(recipe, ref)
    if len(parts) == 2:
        base_ref, path = parts[0], locate(recipe, parts[1], offline)
    else:
        path = locate(recipe, ref, offline)
        if not adapter.is_adapter(path):
            return Checkpoint(path, read_mode)
        if not recipe.base_model or ref == recipe.base_model:
            raise CheckpointError(
                f"{path}: is a PEFT LoRA adapter: name its base (base_model: BASE, or model: "
                "BASE+ADAPTER)"
            )
        base_ref = recipe.base_model
    base = locate(recipe, base_ref, offline)
    ckpt = adapter.AdaptedCheckpoint(base, path, read_mode)
    try:
        adapter.check_base(ckpt.adapter, base_ref, base)
    except CheckpointError:
        ckpt.close()
        raise
    return ckpt


def build_plan(recipe: Recipe, read_mode: ReadMode = "auto", offline: bool = False) -> Plan:
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
            where = "base_model" if ref == recipe.base_model else "models"
            try:
                checkpoints.append(_open(recipe, ref, read_mode, offline))
            except CheckpointError as e:
                if not str(e).startswith(ref) and "no such file" not in str(e):
                    raise  # a problem inside a model, already named by its path
                raise CheckpointError(f"{src}: {where}: {e}") from None
            ckpt = checkpoints[-1]
            files = [p.name for p in ckpt.path.iterdir()] if ckpt.path.is_dir() else []
            problem = anatomy.weight_format(ckpt.tensors, ckpt.config, files)
            if problem is not None:
                raise CheckpointError(f"{ckpt.path}: {problem}")
        index = {ref: i for i, ref in enumerate(refs)}
        units = _units(recipe, method, checkpoints, index)
        first = units[0].groups[0]
        reference = (
            index[recipe.base_model]
            if recipe.base_model
            else (first.base or first.contributors[0]).ckpt
        )
        plan = Plan(recipe, method, checkpoints, refs, reference, compute_dtype=compute_dtype)
        plan.tokenizer_dir = _tokenizer_dir(plan, offline)
        plan.vocab = _plan_vocab(plan, offline)
        if method.statistics:
            _open_statistics(plan, index)
        elif any(e.statistics for e in recipe.models or []):
            raise RecipeError(
                f"{src}: models[].statistics: method {method.name!r} uses no statistics"
            )
        for unit in units:
            _plan_unit(plan, unit, out_dtype)
        plan.warnings += _ignored_params(recipe, method) + _unmatched_filters(plan)
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
        # Count as the user wrote the list: the base, listed or not, plus the others.
        listed = len(members) + (uses_base and all(m.ckpt != base_ckpt for m in members))
        most = method.max_models + uses_base
        with_base = " (the base_model and one other)" if uses_base and most == 2 else ""
        raise RecipeError(
            f"{name}: {label}: method {method.name!r} merges at most {most} "
            f"model{'s' if most > 1 else ''}{with_base}, got {listed}"
        )
    return contributors, base


def _units(
    recipe: Recipe, method: Method, checkpoints: list[Checkpoint], index: dict[str, int]
) -> list[_Unit]:
    """The parts of the output: the whole model (``models:`` or ``slices:``), or one part per
    module of a ``modules:`` recipe (a stack and the tensors around it, or a projector).
    """
    src = recipe.source_name
    if recipe.slices:
        groups = _slice_groups(
            recipe, method, checkpoints, index, recipe.slices, "slices",
            lambda ckpt, ref: _slice_stack(recipe, ckpt, ref),
        )  # fmt: skip
        ref = recipe.base_model or recipe.slices[0].sources[0].model
        return [_Unit(groups, None, _slice_stack(recipe, checkpoints[index[ref]], ref))]
    if not recipe.modules:
        return [_Unit([_models_group(recipe, method, index, recipe.models or [], "models")])]
    mods = recipe.modules
    # The model whose tensors are split among the modules: the base, else the first named.
    ref = recipe.base_model or next((p for p in recipe.model_paths() if p), None)
    if ref is None:
        raise RecipeError(f"{src}: modules: no model is named")
    ref_ckpt = checkpoints[index[ref]]
    try:
        parts = anatomy.assign_modules(ref_ckpt.tensors, ref_ckpt.config, list(mods))
    except ValueError as e:
        raise RecipeError(f"{src}: modules: {ref}: {e}") from None
    units = []
    for key, mod in mods.items():
        stack, names = parts[key]
        label = f"modules.{key}"
        own = (f"{label}.parameters", mod.parameters or {})
        if mod.slices:
            if stack is None:
                raise RecipeError(f"{src}: {label}.slices: module {key!r} has no layer stack")

            def stack_in(
                ckpt: Checkpoint, r: str, prefix: str = stack.prefix, label: str = label
            ) -> anatomy.Stack:
                found = [
                    s for s in anatomy.find_stacks(ckpt.tensors, ckpt.config) if s.prefix == prefix
                ]
                if not found:
                    raise RecipeError(f"{src}: {label}.slices: {r} has no layer stack {prefix}")
                return found[0]

            groups = _slice_groups(
                recipe, method, checkpoints, index, mod.slices, f"{label}.slices", stack_in, own
            )
        else:
            groups = [
                _models_group(recipe, method, index, mod.models or [], f"{label}.models", own)
            ]
        units.append(_Unit(groups, set(names), stack))
    return units


def _models_group(
    recipe: Recipe,
    method: Method,
    index: dict[str, int],
    entries: list[Any],
    label: str,
    module: tuple[str, dict[str, ParamValue]] | None = None,
) -> _Group:
    members = [
        _Contributor(f"{label}[{i}].parameters", index[e.model], e.parameters)
        for i, e in enumerate(entries)
    ]
    contributors, base = _split(recipe, method, label, members, recipe.base_model, index)
    return _Group(label, contributors, base, None, "", None, module=module)


def _slice_groups(
    recipe: Recipe,
    method: Method,
    checkpoints: list[Checkpoint],
    index: dict[str, int],
    slices: list[Any],
    where: str,
    stack_of: Callable[[Checkpoint, str], anatomy.Stack],
    module: tuple[str, dict[str, ParamValue]] | None = None,
) -> list[_Group]:
    name = recipe.source_name
    groups: list[_Group] = []
    offset = 0
    for si, sl in enumerate(slices):
        label = f"{where}[{si}]"
        if not sl.sources:
            raise RecipeError(f"{name}: {label}.sources: at least one source is required")
        members, counts = [], set()
        for j, s in enumerate(sl.sources):
            lo, hi = s.layer_range
            ckpt = checkpoints[index[s.model]]
            total = stack_of(ckpt, s.model).layers
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
            _Group(
                label, contributors, base, sl.parameters, f"{label}.parameters", count, offset,
                module,
            )
        )  # fmt: skip
        offset += count
    return groups


def _slice_stack(recipe: Recipe, ckpt: Checkpoint, ref: str) -> anatomy.Stack:
    """The one layer stack a ``slices:`` recipe cuts; one line where there is none or several
    (an encoder and a decoder, a text model and a vision tower: each needs its own slices).
    """
    stacks = anatomy.find_stacks(ckpt.tensors, ckpt.config)
    if len(stacks) == 1:
        return stacks[0]
    if not stacks:
        raise RecipeError(f"{recipe.source_name}: slices: {ref} has no layer stack to slice")
    found = ", ".join(f"{st.prefix} ({st.layers} layers)" for st in stacks)
    raise RecipeError(
        f"{recipe.source_name}: slices: {ref} has {len(stacks)} layer stacks ({found}); slice "
        "each with mergekit's modules: syntax (docs/anatomy.md)"
    )


def _plan_unit(plan: Plan, unit: _Unit, out_dtype: torch.dtype | None) -> None:
    """The tasks of one part of the output: every tensor it covers, names unchanged, or (for
    slices) its layers renumbered with the tensors around its stack before and after them.
    """
    ckpts = plan.checkpoints
    ref = ckpts[plan.reference]
    ordered = [
        i
        for i in sorted(ref.tensors.values(), key=lambda i: (str(i.file), i.start))
        if unit.names is None or i.name in unit.names
    ]
    groups = unit.groups
    if groups[0].count is None:  # models: every tensor, names unchanged
        # Gradients run over each stack separately (a vision tower and a text model alike).
        stacks = anatomy.find_stacks(ref.tensors, ref.config)
        for info in ordered:
            _add_task(
                plan,
                groups[0],
                info.name,
                lambda c, n=info.name: n,
                anatomy.depth_of(info.name, stacks),
                out_dtype,
            )
        return
    assert unit.stack is not None
    prefix = unit.stack.prefix

    def in_stack(n: str) -> int | None:
        s = anatomy.stack_of(n)
        return s[1] if s is not None and s[0] == prefix else None

    outside = [i.name for i in ordered if in_stack(i.name) is None]
    for n in outside:
        if _PRE_RE.search(n):
            _add_task(plan, groups[0], n, lambda c, n=n: n, 0.0, out_dtype)
    for g in groups:
        first = g.base or g.contributors[0]
        tensors = ckpts[first.ckpt].tensors
        for j in range(g.count or 0):
            t = j / (g.count - 1) if g.count and g.count > 1 else 1.0
            template = [n for n in tensors if in_stack(n) == first.start + j]
            for n in sorted(template, key=lambda n: tensors[n].start):
                _add_task(
                    plan,
                    g,
                    anatomy.with_layer(n, prefix, g.offset + j),
                    lambda c, n=n, j=j: anatomy.with_layer(n, prefix, c.start + j),
                    t,
                    out_dtype,
                )
    for n in outside:
        if not _PRE_RE.search(n):
            _add_task(plan, groups[-1], n, lambda c, n=n: n, 0.0, out_dtype)
    _slice_config(plan, groups, unit.stack)


def _slice_config(plan: Plan, groups: list[_Group], stack: anatomy.Stack) -> None:
    """Every config field that depends on the layer count, for the sliced output: the count
    itself, and each per-layer list (``layer_types`` and the like) rebuilt from the entries of
    the layers each slice took.
    """
    config = plan.reference_checkpoint.config or {}
    total = groups[-1].offset + (groups[-1].count or 0)
    if stack.count_key is None:
        plan.config_updates["num_hidden_layers"] = total
        return
    lists: dict[tuple[str, ...], list[Any]] = {}
    for path in anatomy.per_layer_fields(config, stack):
        out: list[Any] = []
        for g in groups:
            first = g.base or g.contributors[0]
            src = anatomy.get_path(plan.checkpoints[first.ckpt].config or {}, path)
            if not isinstance(src, list) or len(src) < first.start + (g.count or 0):
                raise RecipeError(
                    f"{plan.recipe.source_name}: {plan.refs[first.ckpt]}: config "
                    f"{'.'.join(path)} does not list its layers"
                )
            out.extend(src[first.start : first.start + (g.count or 0)])
        lists[path] = out
    head, *rest = stack.count_key
    if not rest:
        plan.config_updates[head] = total
        plan.config_updates.update({p[0]: v for p, v in lists.items()})
        return
    # A nested config (text_config, vision_config) is updated whole, keeping what another
    # module's slices already changed in it.
    nested = dict(plan.config_updates.get(head) or config.get(head) or {})
    nested[rest[-1]] = total
    nested.update({p[-1]: v for p, v in lists.items()})
    plan.config_updates[head] = nested


def _add_task(
    plan: Plan, g: _Group, out_name: str, input_name: Any, t: float, out_dtype: torch.dtype | None
) -> None:
    """Check the inputs of one output tensor and append its task."""
    recipe, method, ckpts = plan.recipe, plan.method, plan.checkpoints
    if out_name.endswith(anatomy.FP8_SCALE) and anatomy.fp8_block(plan.reference_checkpoint.config):
        return  # an FP8 block scale: consumed by dequantisation, not an output tensor
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
    vocab = plan.vocab is not None and _is_vocab_tensor(plan.vocab, out_name, infos)
    if vocab:
        assert plan.vocab is not None
        shape = (plan.vocab.rows, *lead.shape[1:])
        inputs = {m.ckpt for m, _ in infos}
        for src, _, _ in plan.vocab.overrides.values():
            if src is not None and src not in inputs:
                raise RecipeError(
                    f"{recipe.source_name}: tokenizer.tokens: {plan.refs[src]} gives a token's "
                    f"row but is not an input of tensor {out_name!r} (list it under models)"
                )
        if any(tuple(i.shape[1:]) != tuple(lead.shape[1:]) for _, i in infos):
            raise CheckpointError(
                f"{plan.refs[lead_m.ckpt]}: tensor {lead.name!r}: embedding widths differ "
                f"({sorted({i.shape[1:] for _, i in infos})})"
            )
    for m, info in infos:
        where = f"{plan.refs[m.ckpt]}: tensor {info.name!r}"
        if info.dtype.is_floating_point != lead.dtype.is_floating_point:
            raise CheckpointError(
                f"{where}: dtype {info.dtype} cannot be merged with "
                f"{lead.dtype} in {plan.refs[lead_m.ckpt]}"
            )
        if info.shape != lead.shape and not vocab:
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
    scales = [_fp8_scale(plan, m.ckpt, info) for m, info in infos]
    if any(scales):
        plan.config_drop.add("quantization_config")  # the output is plain floats
        out_dtype = out_dtype or torch.bfloat16
    params = _evaluate_params(recipe, method, g, out_name, t)
    stats = None
    if plan.stats_files:
        stats = [_stat_ref(plan, m.ckpt, input_name(m), shape) for m in g.contributors]
        if method.statistics_params is not None:
            meta = [ckpts[plan.stats_files[m.ckpt]].metadata for m in g.contributors]
            params.update(method.statistics_params(meta, out_name))
    plan.tasks.append(
        TensorTask(
            name=out_name,
            shape=shape,
            out_dtype=out_dtype or ckpts[lead_m.ckpt].stored_dtype(lead.name),
            sources=[(m.ckpt, input_name(m)) for m in g.contributors],
            base=(g.base.ckpt, input_name(g.base)) if g.base else None,
            params=params,
            fill=fill,
            stats=stats,
            scales=scales if any(scales) else None,
            vocab=vocab,
        )
    )
    if vocab and shape and plan.vocab is not None:
        _set_vocab_size(plan, shape[0])
    if fill is not None and "vocab_size" not in plan.config_updates and shape:
        plan.config_updates["vocab_size"] = shape[0]


# The input token embedding of a checkpoint, whose rows are its vocabulary.
_EMBEDDING_RE = re.compile(
    r"(embed_tokens|wte|word_embeddings|tok_embeddings|token_embedding|embed_in|shared)\.weight$"
)


def _embedding_rows(ckpt: Checkpoint) -> int | None:
    """How many token rows a checkpoint's input embedding has (None: it has none)."""
    for name, info in ckpt.tensors.items():
        if _EMBEDDING_RE.search(name) and len(info.shape) == 2:
            return int(info.shape[0])
    return None


def _tokenizer_source(recipe: Recipe) -> str | None:
    """The recipe's tokenizer source: its ``tokenizer:`` block's, or tokenizer_source."""
    return recipe.tokenizer.source if recipe.tokenizer is not None else recipe.tokenizer_source


def _tokenizer_dir(plan: Plan, offline: bool) -> Path:
    """The folder whose tokenizer the output takes (a union starts from the base's); a named
    model must be a folder with tokenizer files.
    """
    rec = plan.recipe
    src = _tokenizer_source(rec)
    if src in (None, "base", "union"):
        return plan.reference_checkpoint.path
    path = locate(rec, src, offline)
    where = f"{rec.source_name}: tokenizer_source: {src!r}"
    if not path.is_dir():
        raise RecipeError(f"{where} is not a model folder")
    if not any((path / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        raise RecipeError(
            f"{where} holds no tokenizer files (expected one of tokenizer.json, "
            "tokenizer_config.json, tokenizer.model, vocab.*)"
        )
    return path


def _plan_vocab(plan: Plan, offline: bool) -> VocabPlan | None:
    """The vocabulary plan when the recipe names a tokenizer_source and the inputs'
    vocabularies differ; None where they agree (or no tokenizer_source is given).
    """
    rec = plan.recipe
    block = rec.tokenizer
    src = _tokenizer_source(rec)
    if src is None:
        return None
    where = f"{rec.source_name}: " + ("tokenizer_source" if block is None else "tokenizer")
    if src == "union" or block is not None:  # a union is built from every input's tokenizer
        for c in plan.checkpoints:
            hf.require_tokenizer(c.path, "tokenizer_source: union")
    rows = [_embedding_rows(c) for c in plan.checkpoints]
    if all(r is None for r in rows) and block is None:
        return None  # no vocabulary rows to move: the tokenizer files are copied
    if any(r is None for r in rows):
        missing = plan.refs[rows.index(None)]
        raise RecipeError(f"{where}: {missing} has no token embedding to align")
    folders = [c.path for c in plan.checkpoints]
    lacking = [r for r, f in zip(plan.refs, folders, strict=True)
               if not any((f / m).is_file() for m in TOKENIZER_MARKERS)]  # fmt: skip
    if lacking and src != "union" and len(set(rows)) == 1 and block is None:
        plan.warnings.append(
            f"{where}: {lacking[0]} has no tokenizer files, so its vocabulary cannot be "
            "checked against the others; its rows are taken as they are"
        )
        return None
    base = plan.refs.index(rec.base_model) if rec.base_model else None
    source: str | Path = src if src in ("union", "base") else plan.tokenizer_dir  # type: ignore[assignment]
    tokens = {}
    for t, entry in ((block.tokens if block else None) or {}).items():
        spec = entry.source
        ref = spec if isinstance(spec, str) else spec.model
        model = None
        if ref is not None:
            if ref not in plan.refs:
                raise RecipeError(f"{where}: tokens.{t}: {ref} is not one of the merged models")
            model = plan.refs.index(ref)
        if isinstance(spec, str):
            tokens[t] = TokenRow(model, force=entry.force)
        else:
            tokens[t] = TokenRow(model, spec.token, spec.token_id, entry.force)
    pad = block.pad_to_multiple_of if block else None
    fill = block.fill if block else "mergekit"
    sizes = [int(r) for r in rows if r]
    return plan_vocab(source, folders, sizes, base, pad, where, tokens, fill)


# Tables whose rows are positions or segment types, not tokens, whatever their row count.
_NOT_VOCAB_RE = re.compile(r"position|wpe|token_type")


def _is_vocab_tensor(v: VocabPlan, name: str, infos: list[Any]) -> bool:
    """Whether a tensor's rows are the vocabulary: a token embedding or head name (T5's
    ``shared`` included), not a position table, whose inputs each have that input's
    embedding row count.
    """
    named = bool(_VOCAB_RE.search(name) or _EMBEDDING_RE.search(name))
    return (
        named
        and not _NOT_VOCAB_RE.search(name)
        and all(len(i.shape) >= 1 and i.shape[0] == v.in_rows[m.ckpt] for m, i in infos)
    )


def _set_vocab_size(plan: Plan, rows: int) -> None:
    """The output config's vocab_size (top level, or text_config's in vision-language
    models) becomes the aligned vocabulary's rows.
    """
    cfg = plan.reference_checkpoint.config or {}
    if "vocab_size" in cfg or "text_config" not in cfg:
        plan.config_updates["vocab_size"] = rows
    else:
        plan.config_updates["text_config"] = {**cfg["text_config"], "vocab_size": rows}


def _fp8_scale(plan: Plan, ci: int, info: Any) -> tuple[int, str, tuple[int, int]] | None:
    """Where an FP8 input's block scales are; one line for FP8 merganser cannot dequantise."""
    if info.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    ckpt = plan.checkpoints[ci]
    block = anatomy.fp8_block(ckpt.config)
    scale = ckpt.tensors.get(info.name + anatomy.FP8_SCALE)
    where = f"{plan.refs[ci]}: tensor {info.name!r}"
    if block is None or scale is None or len(info.shape) != 2:
        raise CheckpointError(
            f"{where}: FP8 without block scales (expected quantization_config quant_method fp8 "
            f"with weight_block_size, and a 2-D weight with {info.name + anatomy.FP8_SCALE!r})"
        )
    want = tuple(-(-n // b) for n, b in zip(info.shape, block, strict=True))
    if tuple(scale.shape) != want:
        raise CheckpointError(
            f"{where}: block scales have shape {list(scale.shape)}, expected {list(want)} for "
            f"blocks of {list(block)}"
        )
    return ci, scale.name, block


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


@functools.lru_cache(maxsize=64)
def _listed(text: str | None) -> frozenset[str] | None:
    """A statistics file's JSON list of names (parsed once per file)."""
    return None if text is None else frozenset(json.loads(text))


def _stat_ref(plan: Plan, model: int, name: str, shape: tuple[int, ...]) -> tuple[int, str] | None:
    """Where model ``model``'s statistic for tensor ``name`` lives, after checking its shape."""
    kind = plan.method.statistics
    si = plan.stats_files[model]
    ckpt = plan.checkpoints[si]
    key = f"{kind}.{name}"
    info = ckpt.tensors.get(key)
    if kind == "gram":
        if info is None and name in (_listed(ckpt.metadata.get("no_input")) or ()):
            raise CheckpointError(
                f"{ckpt.path}: {name!r} is a linear layer the calibration data never reached "
                "(no Gram to merge it by); calibrate on data that runs it"
            )
        listed = _listed(ckpt.metadata.get("not_linear"))
        if info is None and listed is not None:
            if len(shape) == 2 and name not in listed:
                raise CheckpointError(
                    f"{ckpt.path}: {key!r} missing, and the calibration did not see {name!r} "
                    "as a matrix of another kind (calibrated on another model?)"
                )
            return None  # not a linear layer (norms, biases, embeddings): RegMean averages it
        if info is None and is_layer_linear(name, len(shape)):
            # RegMean would silently average this weight: the statistics do not fit the model.
            raise CheckpointError(
                f"{ckpt.path}: {key!r} missing (the input Gram of linear weight {name!r}; "
                "calibrated on another model?)"
            )
        if info is None:
            return None  # not a layer linear (norms, biases, embeddings): RegMean averages it
        in_out = name in (_listed(ckpt.metadata.get("in_out")) or ())  # Conv1D: [in, out]
        side = shape[0] if in_out else shape[-1]  # the weight's input dimension
        want = (side, side) if len(shape) == 2 else None
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


def _param_sets(recipe: Recipe) -> list[tuple[str, dict[str, ParamValue]]]:
    """Every parameters mapping of a recipe with where it sits."""
    out = [("parameters", recipe.parameters or {})]
    out += [
        (f"models[{i}].parameters", e.parameters or {}) for i, e in enumerate(recipe.models or [])
    ]
    out += _slice_param_sets("slices", recipe.slices or [])
    for key, mod in (recipe.modules or {}).items():
        out.append((f"modules.{key}.parameters", mod.parameters or {}))
        out += [
            (f"modules.{key}.models[{i}].parameters", e.parameters or {})
            for i, e in enumerate(mod.models or [])
        ]
        out += _slice_param_sets(f"modules.{key}.slices", mod.slices or [])
    return out


def _slice_param_sets(where: str, slices: list[Any]) -> list[tuple[str, dict[str, ParamValue]]]:
    out = []
    for si, sl in enumerate(slices):
        out.append((f"{where}[{si}].parameters", sl.parameters or {}))
        out += [
            (f"{where}[{si}].sources[{j}].parameters", s.parameters or {})
            for j, s in enumerate(sl.sources)
        ]
    return out


def _all_params() -> set[str]:
    return {p.name for m in all_methods() for p in m.params}


def _foreign(key: str, method: Method) -> bool:
    """A parameter of other methods that this one lacks: mergekit reads only the parameters
    a method asks for, so recipes carry such keys (``normalize`` for arcee_fusion) unnoticed.
    """
    return method.param(key) is None and key in _all_params()


def _ignored_params(recipe: Recipe, method: Method) -> list[str]:
    """Keys accepted because mergekit accepts them, that change nothing here."""
    out = [
        f"{recipe.source_name}: {where}.{key}: has no effect on method {method.name!r} "
        "(accepted because mergekit accepts it)"
        for where, params in _param_sets(recipe)
        for key in params
        if key in method.ignored or _foreign(key, method)
    ]
    # A global parameter set per model: mergekit reads only the top-level value (checked:
    # a per-model lambda leaves its output unchanged), and so does merganser.
    out += [
        f"{recipe.source_name}: {where}.{key}: {key!r} is a global parameter of "
        f"{method.name!r}; set per model it has no effect (the top-level value is used, as in "
        "mergekit)"
        for where, params in _param_sets(recipe)
        if "models[" in where or "sources[" in where
        for key in params
        if (p := method.param(key)) is not None and p.scope == "global"
    ]
    slices = [("slices", recipe.slices or [])] + [
        (f"modules.{k}.slices", m.slices or []) for k, m in (recipe.modules or {}).items()
    ]
    out += [
        f"{recipe.source_name}: {where}[{i}].residual_weight: has no effect (mergekit 0.1.5 "
        "accepts it and ignores it too)"
        for where, sls in slices
        for i, sl in enumerate(sls)
        if sl.residual_weight is not None
    ]
    return out


def _unmatched_filters(plan: Plan) -> list[str]:
    """A ``{filter, value}`` rule whose filter is in no output tensor's name does nothing."""
    names = [t.name for t in plan.tasks]
    out = []
    for where, params in _param_sets(plan.recipe):
        for key, value in params.items():
            if not isinstance(value, Conditional):
                continue
            for i, (filt, _) in enumerate(value.rules):
                if filt not in (None, "*") and not any(filt in n for n in names):
                    out.append(
                        f"{plan.recipe.source_name}: {where}.{key}[{i}].filter: {filt!r} matches "
                        "no tensor"
                    )
    return out


def _check_param_names(recipe: Recipe, method: Method) -> None:
    def check(params: dict[str, ParamValue] | None, where: str, per_model: bool) -> None:
        for key, value in (params or {}).items():
            if key in IGNORED_PARAMS:
                # mergekit's int8_mask is a boolean (it only saves memory there); anything else
                # is a mistake to report, not to ignore.
                if as_bool(value) is None:
                    raise RecipeError(
                        f"{recipe.source_name}: {where}.{key}: expected true or false, "
                        f"got {value!r}"
                    )
                continue
            if key in method.ignored or _foreign(key, method):
                continue  # warned about in _ignored_params
            p = method.param(key)
            if p is None:
                known = ", ".join(q.name for q in method.params) or "none"
                hint = did_you_mean(str(key), [q.name for q in method.params] or _all_params())
                raise RecipeError(
                    f"{recipe.source_name}: {where}.{key}: unknown parameter for method "
                    f"{method.name!r} (expected: {known}){hint}"
                )

    for where, params in _param_sets(recipe):
        check(params, where, "models[" in where or "sources[" in where)


def _evaluate_params(
    recipe: Recipe, method: Method, g: _Group, tensor: str, t: float
) -> dict[str, Any]:
    """A parameter's value for one tensor: per-model, slice, top-level, then the default."""
    layers = [
        (g.params_label, g.params or {}),
        *([g.module] if g.module else []),
        ("parameters", recipe.parameters or {}),
    ]

    def lookup(own: tuple[str, dict[str, ParamValue]] | None, name: str) -> tuple[Any, str]:
        for label, params in ([own] if own else []) + layers:
            if name in params:
                v = evaluate(params[name], tensor, t)
                if v is not None:
                    return v, f"{label}.{name}"
        return None, f"parameters.{name}"

    def value(p: Any, model: int | None) -> tuple[Any, str]:
        own = None if model is None else g.contributors[model]
        v, key = lookup(None if own is None else (own.label, own.params or {}), p.name)
        return v, f"{recipe.source_name}: {key} (tensor {tensor})"

    out = method.bind(
        value, len(g.contributors), f"{recipe.source_name}: parameters (tensor {tensor})"
    )
    if method.stochastic:
        out["seed"] = tensor_seed(recipe.random_seed or 0, tensor)
    return out


def tensor_seed(seed: int, tensor: str) -> int:
    """A per-tensor seed that depends only on the recipe's seed and the tensor's name."""
    digest = hashlib.blake2b(f"{seed}:{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
