"""The Python API, mirroring the CLI: ``merge`` for files, ``merge_tensors`` in memory."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from merganser.analysis.report import report as make_report
from merganser.analysis.report import write_html
from merganser.errors import CheckpointError, MerganserError, RecipeError, size_text
from merganser.evaluation.calibrate import CalibrationOptions, calibrate, calibrate_module
from merganser.evaluation.regmean_plusplus import regmean_plusplus
from merganser.methods.registry import WholeModelStats
from merganser.model import anatomy, chat_templates, hf
from merganser.model.hf import TOKENIZER_FILES, TOKENIZER_MARKERS
from merganser.pipeline import engine, multi
from merganser.pipeline.card import model_card
from merganser.pipeline.device import check_device
from merganser.pipeline.moe import base_recipe, build_moe
from merganser.pipeline.moe import load_config as load_moe_config
from merganser.pipeline.options import (
    MergeOptions,
    default_memory_budget,
    default_threads,
)
from merganser.pipeline.plan import Plan, build_plan
from merganser.pipeline.progress import Progress
from merganser.pipeline.recipe import Recipe, load_recipe, parse_recipe, read_yaml_documents
from merganser.pipeline.tensors import merge_tensors
from merganser.search.adamerging import AdaMergingConfig, adamerging
from merganser.storage import safejson
from merganser.storage.dtypes import dtype_name
from merganser.storage.provenance import ALGORITHM, InputDigests
from merganser.storage.writer import (
    MANIFEST_NAME,
    RECIPE_NAME,
    SHARD_DIGEST,
    AtomicOutput,
    file_digest,
    guard_output,
    layout,
)
from merganser.zipping.refit import refit_merged
from merganser.zipping.sequential import zip_sequential
from merganser.zipping.vit import align_vit, zip_vit

# merge_tensors (tensors.py), TOKENIZER_FILES (hf.py), MergeOptions (options.py, torch-free
# for the CLI) and the data-aware procedures on any module live below the façade; re-exported.
__all__ = [
    "TOKENIZER_FILES",
    "AdaMergingConfig",
    "CalibrationOptions",
    "MergeOptions",
    "adamerging",
    "align_vit",
    "calibrate",
    "calibrate_module",
    "default_memory_budget",
    "default_threads",
    "merge",
    "merge_tensors",
    "refit_merged",
    "regmean_plusplus",
    "zip_sequential",
    "zip_vit",
]


def _as_recipe(recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str]) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe))
    return load_recipe(recipe)


def merge(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: MergeOptions | None = None,
) -> Path:
    """Merge the models a recipe names into ``out_dir`` (atomically); return the output path.
    A recipe file of several documents (mergekit-multimerge's format) runs each merge in turn.
    """
    options = options or MergeOptions()
    if options.report and options.output == "adapter":
        raise MerganserError(
            "--report: an adapter output holds no merged tensors to compare; report the "
            "recipe instead (merganser report RECIPE)"
        )
    if isinstance(recipe, (str, os.PathLike)):
        _, docs = read_yaml_documents(recipe)
        if multi.is_multi(docs):
            return _merge_documents(Path(recipe), docs, Path(out_dir), options)
    if options.output == "adapter":
        return _merge_as_adapter(recipe, Path(out_dir), options)
    rec = _as_recipe(recipe)
    out = _merge_one(rec, out_dir, options)
    if options.report:
        _write_report(rec, out, options)
    return out


def _write_report(rec: Recipe, out: Path, options: MergeOptions) -> None:
    """``merge --report``: the report page of ``rec`` and its output, beside the output."""
    page = out.with_name(f"{out.name}.report.html")
    inputs: list[Path] = []
    r = make_report(rec, out, options.offline, before=inputs.extend)
    write_html(r, page, force=True, inputs=inputs)  # replaces an old page, never an input
    print(f"merganser: report: {page}", file=sys.stderr)


def moe(
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    force: bool = False,
    allow_all_same: bool = False,
    options: MergeOptions | None = None,
) -> Path:
    """`merganser moe`: a mixture of experts from mergekit-moe's YAML. With ``merge_base``, the
    base and the experts are first merged by the streaming engine into a temporary folder
    beside ``out``, whose non-MLP tensors (and hidden states, for the routers) the MoE takes.
    """
    cfg = load_moe_config(config, allow_all_same)
    if cfg.merge_base is None:
        return build_moe(config, out, force, allow_all_same)
    target = Path(out).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.merge-base-", dir=target.parent))
    try:
        recipe = parse_recipe(base_recipe(cfg, config), name=f"{config}: merge_base")
        opts = replace(options or MergeOptions(), output="model")
        _merge_one(recipe, tmp / "base", opts)
        return build_moe(config, out, force, allow_all_same, merged_base=tmp / "base")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_as_adapter(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str], out: Path, options: MergeOptions
) -> Path:
    """A merge of LoRA adapters of one base, written as a PEFT adapter: the merged model's ΔW
    from the base, factored per module (extract.py) at ``adapter_rank``, by default the inputs'
    ranks summed, where factoring a merge linear in ΔW is exact. Each module's error is
    printed and recorded in the adapter's README.md.
    """
    from merganser.model.adapter import AdaptedCheckpoint
    from merganser.pipeline.extract import extract_lora

    rec = _as_recipe(recipe)
    plan = build_plan(rec, options.read_mode, options.offline)
    try:
        adapted = [c for c in plan.checkpoints if isinstance(c, AdaptedCheckpoint)]
        bases = {c.path.resolve() for c in adapted}
        others = [
            plan.refs[i]
            for i, c in enumerate(plan.checkpoints)
            if not isinstance(c, AdaptedCheckpoint) and c.path.resolve() not in bases
        ]
        if not adapted or len(bases) != 1 or others:
            raise RecipeError(
                f"{rec.source_name}: --output adapter needs every input to be a LoRA adapter "
                f"of one base{f' ({others[0]} is not)' if others else ''}"
            )
        base = next(iter(bases))
        rank = options.adapter_rank or sum(c.adapter.rank for c in adapted)
    finally:
        plan.close()
    guard_output(out, [base, *(c.adapter_path for c in adapted)], options.force)
    with tempfile.TemporaryDirectory(dir=out.absolute().parent, prefix=f".{out.name}.") as tmp:
        merged = _merge_one(rec, Path(tmp) / "model", replace(options, output="model"))
        ext = extract_lora(merged, base, out, rank=rank, force=options.force, card=rec.source_text)
    worst = ext.report()["max_relative_error"]
    print(
        f"merganser: adapter: {len(ext.modules)} modules at rank {rank}, largest relative "
        f"error {worst:.3g}",
        file=sys.stderr,
    )
    return out.absolute()


def _merge_documents(path: Path, docs: list[Any], out: Path, options: MergeOptions) -> Path:
    """Each merge of a multi-document recipe, in an order where the merges a document names
    come first; named merges go to the intermediate directory (one already there from the
    same document is reused, so a run that stopped resumes), the final one to ``out``.
    """
    inter = multi.intermediate_dir(out, options.intermediate_dir)
    for step, rec, folder in multi.recipes(path, docs, inter):
        if folder is not None and _same_recipe(folder, rec):
            print(f"merganser: {step.label}: reusing {folder}", file=sys.stderr)
            continue
        target = folder or out
        print(f"merganser: {step.label}: merging into {target}", file=sys.stderr)
        if folder is None and options.output == "adapter":
            _merge_as_adapter(rec, target, options)
        else:  # intermediates are models, whatever the final output is
            _merge_one(rec, target, replace(options, output="model"))
            if folder is None and options.report:  # the final merge's page
                _write_report(rec, out, options)
    return out


def _same_recipe(folder: Path, rec: Recipe) -> bool:
    """Whether ``folder`` is a finished merge of exactly this recipe (its manifest says so)."""
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        return False
    try:
        return safejson.loads(manifest.read_bytes()).get("recipe_sha256") == rec.sha256
    except (ValueError, AttributeError, OSError):
        return False


def _merge_one(
    recipe: Recipe | Mapping[str, Any] | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: MergeOptions,
) -> Path:
    if options.out_shard_size <= 0:
        raise MerganserError("--out-shard-size must be positive")
    if options.read_ahead < 0:
        raise MerganserError("--read-ahead must be 0 or more")
    if options.read_streams < 1:
        raise MerganserError("--read-streams must be 1 or more")
    if options.gpu_memory is not None and options.gpu_memory <= 0:
        raise MerganserError("--gpu-memory must be positive")
    check_device(options.device)
    rec = _as_recipe(recipe)
    eopts = options.engine_options()
    plan = build_plan(rec, options.read_mode, options.offline)
    try:
        tokenizer = plan.tokenizer_dir
        chat = _chat_template(plan, tokenizer)
        for w in plan.warnings:
            if options.strict:
                raise MerganserError(f"{w} (--strict)")
            print(f"merganser: warning: {w}", file=sys.stderr)
        for note in plan.vocab.report if plan.vocab else []:
            print(f"merganser: tokenizer: {note}", file=sys.stderr)
        items = engine.work_items(plan, eopts)  # raises now if a tensor cannot fit the budget
        stats = _whole_model_stats(plan)
        # The statistics passes read whole tensors (or pieces); they must fit the budget too.
        stat_items = engine.stat_items(plan, eopts, stats) if stats is not None else None
        config = _output_config(plan)
        _check_structure(plan, config, Path(out_dir))
        side = _side_files(plan)
        target = guard_output(out_dir, _inputs(plan, tokenizer), options.force)
        try:
            out = AtomicOutput(target, force=options.force)
        except OSError as e:
            # Name the target, never the hidden temporary folder beside it.
            raise MerganserError(f"{target}: cannot create output ({e.strerror})") from None
        try:
            _check_disk_space(out.tmp, plan.out_nbytes)
            shards, slots = layout(
                ((t.name, t.shape, t.out_dtype) for t in plan.tasks), options.out_shard_size
            )
            out.open_shards(shards, slots)
            if stats is not None:
                engine.gather_stats(plan, stats, eopts, stat_items)
            digests = InputDigests() if options.input_checksums else None
            with Progress(plan.out_nbytes, len(items), options.progress) as bar:
                engine.run(
                    plan,
                    lambda task, t, start: out.write(task.name, t, start),
                    eopts,
                    bar.update,
                    digests,
                    items,
                    on_abort=out.cancel_writes,
                )
            out.close_shards()
            _write_side_files(out, plan, config, tokenizer, side)
            if chat is not None:
                chat_templates.write(out, chat)
            manifest = out.verify_and_index()
            inputs = {
                ref: digests.model_digest(i) if digests else None for i, ref in enumerate(plan.refs)
            }
            out.write_file("README.md", model_card(plan, manifest, inputs))
            files = {
                str(f.relative_to(out.tmp)): {
                    SHARD_DIGEST: file_digest(f),
                    "bytes": f.stat().st_size,
                }
                for f in sorted(out.tmp.rglob("*"))
                if f.is_file() and f.name not in manifest
            }
            out.write_file(
                MANIFEST_NAME,
                json.dumps(_manifest(plan, manifest, files, inputs), indent=2) + "\n",
            )
            out.commit()
        except OSError as e:
            # Disk full, file-size limits, permissions: one line naming the place, no debris.
            out.abort()
            raise MerganserError(f"{target}: cannot write output ({e.strerror or e})") from None
        except BaseException:
            out.abort()
            raise
        return out.target
    finally:
        plan.close()


def _whole_model_stats(plan: Plan) -> WholeModelStats | None:
    first = next((t for t in plan.tasks if not t.copy_only), None)
    if plan.method.stats is None or first is None:
        return None
    return plan.method.stats(first.params)


def _manifest(
    plan: Plan, shards: dict[str, Any], files: dict[str, Any], inputs: dict[str, str | None]
) -> dict[str, Any]:
    """What `merganser verify` checks: every shard and every other file, by digest."""
    from merganser import __version__

    return {
        "tool": "merganser",
        "version": __version__,
        "method": plan.method.name,
        "recipe_sha256": plan.recipe.sha256,
        "inputs": inputs,
        "input_digest": ALGORITHM,
        "shards": shards,
        "files": files,
    }


def _output_config(plan: Plan) -> dict[str, Any] | None:
    """The output's config.json: the reference's, with the plan's updates and the dtype."""
    ref = plan.reference_checkpoint
    if ref.config is None:
        return None
    merged = {**ref.config, **plan.config_updates}
    config = {k: v for k, v in merged.items() if k not in plan.config_drop}
    dtypes = [t.out_dtype for t in plan.tasks if not t.copy_only]
    if dtypes:
        name = dtype_name(max(set(dtypes), key=dtypes.count))
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = name
    return config


def _check_structure(plan: Plan, config: dict[str, Any] | None, target: Path) -> None:
    """Before any work: the output's tensors and its config agree (each stack's layer count,
    per-layer config lists); a frankenmerge that would not load is refused here.
    """
    problem = anatomy.check_structure((t.name for t in plan.tasks), config, f"{target}")
    if problem is not None:
        raise MerganserError(problem)
    ref = plan.reference_checkpoint
    if config is None or ref.config is None:
        return
    shapes = {t.name: tuple(t.shape) for t in plan.tasks}
    if (
        shapes == {n: tuple(i.shape) for n, i in ref.tensors.items()}
        and not plan.config_updates
        and not plan.config_drop
    ):
        return  # the reference's own tensors and config (but the dtype): it loads as they do
    out = hf.key_problems(shapes, config)
    if not out:
        return
    # Only what the merge introduced: a checkpoint that loads with warnings loads so after.
    known = hf.key_problems({n: i.shape for n, i in ref.tensors.items()}, ref.config) or set()
    new = sorted(out - known)
    if new:
        more = f" (and {len(new) - 1} more)" if len(new) > 1 else ""
        arch = config["architectures"][0]
        raise MerganserError(
            f"{target}: transformers' {arch} would not load the output as planned: "
            f"{new[0].replace(':', ' ', 1)}{more}"
        )


# Files of the model beside its weights and tokenizer, carried over from the reference model:
# image/video processors of vision models, and sentence-transformers' pipeline description.
SIDE_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def _side_files(plan: Plan) -> list[tuple[Path, str]]:
    """(source, name in the output) for each side file of the reference model, including the
    module folders sentence-transformers' modules.json lists (``1_Pooling/``); one line for a
    module folder that holds weights (merganser would copy them unmerged).
    """
    folder = plan.reference_checkpoint.path
    if not folder.is_dir():
        return []
    files = [(folder / n, n) for n in SIDE_FILES if (folder / n).is_file()]
    modules = folder / "modules.json"
    if modules.is_file():
        try:
            listed = safejson.loads(modules.read_bytes())
        except ValueError as e:
            raise CheckpointError(f"{modules}: {e}") from None
        for m in listed if isinstance(listed, list) else []:
            sub = m.get("path") if isinstance(m, dict) else None
            if (
                not isinstance(sub, str)
                or not sub
                or ".." in Path(sub).parts
                or sub.startswith("/")
            ):
                continue
            d = folder / sub
            if not d.is_dir():
                continue
            for f in sorted(d.rglob("*")):
                if not f.resolve().is_relative_to(folder.resolve()):
                    raise CheckpointError(f"{f}: leads outside the model folder {folder}")
                if f.is_file() and f.suffix in _WEIGHT_SUFFIXES:
                    raise CheckpointError(
                        f"{f}: sentence-transformers module {sub} holds weights, which merganser "
                        "does not merge yet"
                    )
                if f.is_file():
                    files.append((f, str(f.relative_to(folder))))
    return files


def _write_side_files(
    out: AtomicOutput,
    plan: Plan,
    config: dict[str, Any] | None,
    tokenizer: Path | None,
    side: list[tuple[Path, str]],
) -> None:
    if config is not None:
        out.write_file("config.json", json.dumps(config, indent=2) + "\n")
    if plan.vocab is not None:
        _write_tokenizer(out, plan.vocab.tokenizer, tokenizer)
    elif tokenizer is not None and tokenizer.is_dir():
        for fname in TOKENIZER_FILES:
            if (tokenizer / fname).is_file():
                out.copy_file(tokenizer / fname)
    for src, name in side:
        if not (out.tmp / name).exists():
            (out.tmp / name).parent.mkdir(parents=True, exist_ok=True)
            out.copy_file(src, name)
    out.write_file(RECIPE_NAME, plan.recipe.source_text)


def _write_tokenizer(out: AtomicOutput, tok: Any, source: Path | None) -> None:
    """A tokenizer built for this merge (a union, or one model's with rows realigned), as
    transformers saves it, with the source's generation config beside it.
    """
    with tempfile.TemporaryDirectory(dir=out.tmp.parent) as tmp:
        tok.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                out.copy_file(f)
    if source is not None and (source / "generation_config.json").is_file():
        out.copy_file(source / "generation_config.json")


def _chat_template(plan: Plan, tokenizer: Path | None) -> str | None:
    """The template the recipe's ``chat_template`` asks for, checked before any work; None
    when the field is absent (the tokenizer's own template is kept as copied).
    """
    rec = plan.recipe
    if rec.chat_template is None:
        return None
    where = f"{rec.source_name}: chat_template"
    if tokenizer is None or not any((tokenizer / f).is_file() for f in TOKENIZER_MARKERS):
        source = tokenizer or plan.reference_checkpoint.path
        raise RecipeError(f"{where}: the output has no tokenizer to carry it ({source} has none)")
    folders = [c.path for c in plan.checkpoints if c.path.is_dir()]
    template, how = chat_templates.resolve(rec.chat_template, folders, where)
    if template is None:
        plan.warnings.append(f"{where}: {how}; the output keeps the tokenizer's own")
    return template


def _inputs(plan: Plan, tokenizer: Path | None) -> list[Path]:
    """Every path a merge reads: checkpoints, statistics, the tokenizer source, the recipe."""
    paths = [c.path for c in plan.checkpoints] + ([tokenizer] if tokenizer else [])
    if plan.recipe.source_file is not None:  # read from a file (not an in-memory mapping)
        paths.append(plan.recipe.source_file)
    return paths


def _check_disk_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + (16 << 20):
        raise MerganserError(
            f"{folder.parent}: not enough disk space ({size_text(free)} free, output needs "
            f"{size_text(need)})"
        )
