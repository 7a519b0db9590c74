"""`merganser plan` and `merge --dry-run`: what a merge would read, write and hold, from the
recipe and the checkpoints' headers alone (no tensor is read, nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merganser.errors import MerganserError, size_text
from merganser.pipeline import engine, multi
from merganser.pipeline.options import MergeOptions
from merganser.pipeline.plan import build_plan, locate, reference_parts
from merganser.pipeline.recipe import Recipe, load_recipe, read_yaml_documents
from merganser.storage import hub


def preview(
    rec: Recipe, options: MergeOptions, pending: dict[str, str] | None = None
) -> dict[str, Any]:
    """The plan of ``rec`` as plain JSON values: the inputs (and which are missing), the
    output's tensors and bytes, the bytes read, a peak-memory estimate and the warnings.
    Missing inputs are all listed, not only the first; then nothing more can be planned.
    ``pending``: inputs an earlier merge of the same file makes (path -> its label).
    """
    inputs, missing, waiting = [], [], []
    for ref in rec.model_paths():
        entry: dict[str, Any] = {"ref": ref}
        paths = []
        for part in reference_parts(rec, ref):  # BASE+ADAPTER: both must be there
            try:
                paths.append(locate(rec, part, offline=True))
            except MerganserError:
                paths.append(None)
        path = paths[0] if all(p is not None and p.exists() for p in paths) else None
        if path is not None:
            entry.update(status="found", path="+".join(str(p) for p in paths))
        elif pending and ref in pending:
            entry["status"] = f"made by {pending[ref]}"
            waiting.append(ref)
        else:
            # A hub-shaped reference may be a local path the user has not made yet.
            entry["status"] = (
                "missing (no local path, not in the HF cache)" if hub.is_hub_id(ref) else "missing"
            )
            missing.append(ref)
        inputs.append(entry)
    out: dict[str, Any] = {
        "recipe": rec.source_name,
        "method": rec.merge_method,
        "inputs": inputs,
        "missing": missing,
        "pending": waiting,
    }
    if missing or waiting:
        return out
    plan = build_plan(rec, options.read_mode, offline=True)
    try:
        eopts = options.engine_options()
        items = engine.work_items(plan, eopts)
        for entry, ckpt in zip(inputs, plan.checkpoints, strict=True):
            entry["tensors"] = len(ckpt.tensors)
            entry["bytes"] = sum(t.nbytes for t in ckpt.tensors.values())
        read = sum(
            plan.checkpoints[ci].tensors[name].nbytes
            for task in plan.tasks
            for ci, name in task.inputs
        )
        out.update(
            output_tensors=len(plan.tasks),
            merged_tensors=sum(not t.copy_only for t in plan.tasks),
            write_bytes=plan.out_nbytes,
            read_bytes=read,
            work_items=len(items),
            threads=eopts.threads,
            peak_memory_bytes=peak_estimate(items, eopts),
            warnings=list(plan.warnings),
        )
    finally:
        plan.close()
    return out


def peak_estimate(items: list[engine.WorkItem], options: engine.EngineOptions) -> int:
    """Tensor memory in flight at worst: the largest items each thread (and its read-ahead)
    may hold at once, capped by the memory budget the engine enforces.
    """
    slots = max(1, options.threads) * (1 + options.read_ahead)
    largest = sorted((i.cost for i in items), reverse=True)[:slots]
    return min(sum(largest), options.memory_budget)


def format_preview(p: dict[str, Any]) -> str:
    """The preview as a few aligned lines for a terminal."""
    lines = [f"{p['recipe']}: {p['method']}"]
    width = max(len(e["ref"]) for e in p["inputs"]) if p["inputs"] else 0
    for e in p["inputs"]:
        size = f"{e['tensors']} tensors, {size_text(e['bytes'])}" if "bytes" in e else ""
        lines.append(f"  {e['ref']:<{width}}  {e['status']:<8} {size}".rstrip())
    if p["missing"]:
        lines.append(f"missing: {', '.join(p['missing'])}")
    if p["missing"] or p["pending"]:
        if p["pending"] and not p["missing"]:
            lines.append("planned in full once the merges it uses exist")
        return "\n".join(lines)
    lines += [
        f"output: {p['output_tensors']} tensors ({p['merged_tensors']} merged), "
        f"{size_text(p['write_bytes'])} to write",
        f"reads: {size_text(p['read_bytes'])} in {p['work_items']} pieces on "
        f"{p['threads']} threads",
        f"peak tensor memory: about {size_text(p['peak_memory_bytes'])}",
    ]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def preview_file(
    path: str | Path, options: MergeOptions, out: Path | None = None
) -> list[dict[str, Any]]:
    """A preview per merge of a recipe file (one, or one per document of a multi-document
    recipe, where inputs an earlier document makes are marked as such; ``out``: the output
    folder, beside which the intermediate merges go by default).
    """
    path = Path(path)
    _, docs = read_yaml_documents(path)
    if not multi.is_multi(docs):
        return [preview(load_recipe(path), options)]
    made = multi.recipes(path, docs, multi.intermediate_dir(out, options.intermediate_dir))
    makers = {str(folder): step.label for step, _, folder in made if folder is not None}
    return [preview(rec, options, makers) for _, rec, _ in made]
