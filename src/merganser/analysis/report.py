"""`merganser report`: what a merge's inputs look like and what the merge did, as one
self-contained HTML page (plots embedded, no network at view time) and as JSON.

One streaming pass over the plan's tensors (the planner's own view of the recipe: slices,
adapters, vocabularies and FP8 inputs included), a few million entries at a time, so memory
holds one chunk per input whatever the model's size. Per layer and per tensor group it keeps
float64 sums: each input's task vector norm ‖θᵢ − θ_ref‖ (θ_ref the base, or the inputs' mean
where the method has none), their pairwise dot products (cosines), the TIES sign-conflict count
(entries where the task vectors have both signs), non-finite values, the fraction each input
loses to ``density`` where the method trims or drops, and, given the merged output, how far it
moved from each input.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.model.naming import layer_index
from merganser.pipeline import engine
from merganser.pipeline.plan import Plan, TensorTask, build_plan
from merganser.pipeline.recipe import Recipe, load_recipe
from merganser.storage.checkpoint import Checkpoint
from merganser.storage.provenance import InputDigests
from merganser.storage.writer import MANIFEST_NAME, RECIPE_NAME, guard_output, publish

_CHUNK = 1 << 22  # entries per step: bounded memory for any tensor size
GROUPS = ("attention", "mlp", "norm", "embedding", "other")


def tensor_group(name: str) -> str:
    """The kind of weight a tensor name holds."""
    n = name.lower()
    if "embed" in n or "lm_head" in n or "wte" in n or "wpe" in n or n.startswith("shared."):
        return "embedding"
    if "norm" in n or re.search(r"(^|\.)ln_?\w*\.", n):
        return "norm"
    if "attn" in n or "attention" in n or re.search(r"\.(q|k|v|o)_proj\.", n):
        return "attention"
    if "mlp" in n or "ffn" in n or "feed_forward" in n or "experts" in n or "fc" in n:
        return "mlp"
    return "other"


@dataclass
class Sums:
    """float64 sums over the entries of some tensors (one row or column of the report)."""

    n: int  # inputs
    numel: int = 0
    tv_sq: list[float] = field(default_factory=list)  # ‖τᵢ‖²
    ref_sq: float = 0.0  # ‖θ_ref‖²
    dots: list[list[float]] = field(default_factory=list)  # τᵢ·τⱼ
    conflicts: int = 0
    nonfinite: list[int] = field(default_factory=list)
    dropped: list[float] = field(default_factory=list)  # entries lost to density
    trims: bool = False
    out_sq: list[float] = field(default_factory=list)  # ‖θ_out − θᵢ‖²
    in_sq: list[float] = field(default_factory=list)  # ‖θᵢ‖²
    has_out: bool = False

    def __post_init__(self) -> None:
        k = self.n
        self.tv_sq = self.tv_sq or [0.0] * k
        self.dots = self.dots or [[0.0] * k for _ in range(k)]
        self.nonfinite = self.nonfinite or [0] * k
        self.dropped = self.dropped or [0.0] * k
        self.out_sq = self.out_sq or [0.0] * k
        self.in_sq = self.in_sq or [0.0] * k

    def add(self, o: Sums) -> None:
        self.numel += o.numel
        self.ref_sq += o.ref_sq
        self.conflicts += o.conflicts
        self.trims |= o.trims
        self.has_out |= o.has_out
        for i in range(self.n):
            self.tv_sq[i] += o.tv_sq[i]
            self.nonfinite[i] += o.nonfinite[i]
            self.dropped[i] += o.dropped[i]
            self.out_sq[i] += o.out_sq[i]
            self.in_sq[i] += o.in_sq[i]
            for j in range(self.n):
                self.dots[i][j] += o.dots[i][j]

    def summary(self) -> dict[str, Any]:
        """The reported numbers (rounded to 6 significant digits, as the page shows them)."""
        norm = [math.sqrt(x) for x in self.tv_sq]
        cos = [
            [
                _r(self.dots[i][j] / (norm[i] * norm[j])) if norm[i] and norm[j] else None
                for j in range(self.n)
            ]
            for i in range(self.n)
        ]
        ref = math.sqrt(self.ref_sq)
        return {
            "parameters": self.numel,
            "task_vector_norm": [_r(x) for x in norm],
            "relative_task_vector_norm": [_r(x / ref) if ref else None for x in norm],
            "cosine": cos,
            "sign_conflict": _r(self.conflicts / self.numel) if self.numel else None,
            "trimmed": [_r(d / self.numel) for d in self.dropped] if self.trims else None,
            "output_distance": [
                _r(math.sqrt(d) / math.sqrt(s)) if s else None
                for d, s in zip(self.out_sq, self.in_sq, strict=True)
            ]
            if self.has_out
            else None,
            "nonfinite": list(self.nonfinite),
        }


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    # BLAS over one chunk (float32, blocked summation); chunks add up in Python float64.
    return float(torch.dot(a, b))


def _chunk_sums(
    tensors: list[torch.Tensor],
    ref: torch.Tensor,
    out: torch.Tensor | None,
    density: list[float] | None,
) -> Sums:
    n = len(tensors)
    s = Sums(n, numel=ref.numel())
    s.ref_sq = _dot(ref, ref)
    taus = []
    for i, t in enumerate(tensors):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            s.nonfinite[i] = int((~finite).sum())
            t = torch.where(finite, t, ref)  # their task vector counts as 0
        tau = t - ref
        taus.append(tau)
        s.tv_sq[i] = _dot(tau, tau)
        if out is not None:
            diff = out - t
            s.out_sq[i] = _dot(diff, diff)
            s.in_sq[i] = _dot(t, t)
    for i in range(n):
        for j in range(i, n):
            s.dots[i][j] = s.dots[j][i] = _dot(taus[i], taus[j])
    if n > 1:  # entries where the task vectors have both signs
        hi, lo = taus[0].clone(), taus[0].clone()
        for tau in taus[1:]:
            torch.maximum(hi, tau, out=hi)
            torch.minimum(lo, tau, out=lo)
        s.conflicts = int(((hi > 0) & (lo < 0)).sum())
    if density is not None:
        s.trims = True
        s.dropped = [(1.0 - d) * ref.numel() for d in density]
    s.has_out = out is not None
    return s


def _density(task: TensorTask, n: int) -> list[float] | None:
    """Each input's kept fraction of this tensor, where the method keeps ``density`` of every
    tensor (exactly for TIES and Breadcrumbs, in expectation for DARE and DELLA); None where it
    has no density, or trims against whole-model thresholds (TIES ``scope: global``), whose
    per-tensor fractions are not the density.
    """
    d = task.params.get("density")
    if task.params.get("scope") == "global" or not (isinstance(d, list) and len(d) == n):
        return None
    return [float(x) for x in d]


def _task_sums(plan: Plan, task: TensorTask, out: Checkpoint | None, digests: InputDigests) -> Sums:
    n = len(task.sources)
    # Vocabulary-aligned, filled or FP8 inputs are prepared whole (as the engine does); the
    # sums then run over chunks of them all the same.
    whole = task.vocab or task.fill is not None or task.scales is not None
    step = task.numel if whole else _CHUNK
    total = Sums(n)
    density = _density(task, n)
    for start in range(0, task.numel, step):
        count = min(step, task.numel - start)
        item = engine.WorkItem(task, start, count, 0, whole=whole)
        tensors, base = engine.load_inputs(plan, item, digests)
        flat = [t.reshape(-1) for t in tensors]
        o = None
        if out is not None and task.name in out.tensors:
            o = (out.read(task.name) if whole else out.read(task.name, start, count)).float()
            o = o.reshape(-1)
        for a in range(0, count, _CHUNK):
            part = [t[a : a + _CHUNK] for t in flat]
            # No base: deviations from the inputs' mean.
            ref = (
                base.reshape(-1)[a : a + _CHUNK] if base is not None else torch.stack(part).mean(0)
            )
            total.add(_chunk_sums(part, ref, None if o is None else o[a : a + _CHUNK], density))
    return total


def _check_output(plan: Plan, out: Checkpoint) -> None:
    """One line before any tensor is read if the output is not this recipe's merge."""
    for task in plan.tasks:
        info = out.tensors.get(task.name)
        if info is not None and tuple(info.shape) != tuple(task.shape):
            raise MerganserError(
                f"{out.path}: tensor {task.name!r} is {list(info.shape)}, the recipe makes "
                f"{list(task.shape)}: not this recipe's merge"
            )


def _label(name: str) -> str:
    i = layer_index(name)
    return f"layer {i}" if i is not None else "outside the layers"


def analyse(plan: Plan, output: Path | None = None) -> dict[str, Any]:
    """The report's numbers for a plan (and its merged output, when given)."""
    inputs = _inputs(plan)
    n_inputs = sum(x["role"] == "model" for x in inputs)
    by_layer: dict[str, Sums] = {}
    by_group: dict[str, Sums] = {g: Sums(n_inputs) for g in GROUPS}
    whole = Sums(n_inputs)
    digests = InputDigests()
    warnings: list[str] = list(plan.warnings)
    out = Checkpoint(output) if output is not None else None
    if out is not None:
        _check_output(plan, out)
    models = [x["checkpoint"] for x in inputs if x["role"] == "model"]
    other = 0  # tensors merged from other inputs (slices of other models): not in the sums
    nonfinite: dict[int, tuple[int, str]] = {}
    try:
        for task in plan.tasks:
            if task.copy_only:
                continue
            if [ci for ci, _ in task.sources] != models:
                other += 1
                continue
            s = _task_sums(plan, task, out, digests)
            for i, bad in enumerate(s.nonfinite):
                if bad:  # per input: how many tensors, and the first one's name
                    n, first = nonfinite.get(i, (0, task.name))
                    nonfinite[i] = (n + 1, first)
            by_layer.setdefault(_label(task.name), Sums(n_inputs)).add(s)
            by_group[tensor_group(task.name)].add(s)
            whole.add(s)
    finally:
        if out is not None:
            out.close()
    for i, (n, first) in sorted(nonfinite.items()):
        warnings.append(
            f"{inputs[i]['ref']}: non-finite values in {n} tensor(s), first {first} "
            "(counted as no change from the reference)"
        )
    if out is not None and (absent := [t.name for t in plan.tasks if t.name not in out.tensors]):
        warnings.append(
            f"{output}: {len(absent)} tensor(s) of the recipe are not in the output (first "
            f"{absent[0]}): left out of the distances moved"
        )
    if any(t.params.get("scope") == "global" for t in plan.tasks):
        warnings.append(
            "scope: global trims against whole-model thresholds: the fraction trimmed per "
            "tensor is not the density, and is not shown"
        )
    if other:
        warnings.append(
            f"{other} tensor(s) are merged from other inputs than these (slices): "
            "they are not in these statistics"
        )
    for inp in inputs:
        inp["digest"] = digests.model_digest(inp["checkpoint"])
    model = whole.summary()
    groups = [(g, by_group[g].summary()) for g in GROUPS if by_group[g].numel]
    for i in range(n_inputs):
        # Per group: the norms' unit weights (≈ 1) would hide a large change in the whole.
        big = [(g, r["relative_task_vector_norm"][i]) for g, r in groups if g != "norm"]
        g, rel = max(big, key=lambda x: x[1] or 0.0, default=("", None))
        if rel is not None and rel > 0.5:
            warnings.append(
                f"{inputs[i]['ref']}: its {g} task vector is {rel:.0%} of the reference "
                "weights' norm: a fine-tune of another base, or not a fine-tune?"
            )
    if plan.vocab is not None:
        warnings.append("the inputs' vocabularies differ: rows are aligned by token first")
    layers = sorted(by_layer, key=lambda k: (k == "outside the layers", _layer_key(k)))
    return {
        "format": "merganser-report/1",
        "method": plan.method.name,
        "recipe": plan.recipe.source_text,
        "reference": "base" if any(t.base for t in plan.tasks) else "mean of the inputs",
        "inputs": [{k: v for k, v in x.items() if k != "checkpoint"} for x in inputs],
        "model": model,
        "layers": [{"name": k, **by_layer[k].summary()} for k in layers],
        "groups": [{"name": g, **r} for g, r in groups],
        "output": str(output) if output is not None else None,
        "evaluation": None,
        "warnings": warnings,
    }


def _layer_key(label: str) -> int:
    m = re.search(r"\d+", label)
    return int(m.group()) if m else 0


def _inputs(plan: Plan) -> list[dict[str, Any]]:
    """The models fed to the method, in the order of a task's sources."""
    first = next((t for t in plan.tasks if not t.copy_only), None)
    if first is None:
        raise MerganserError(f"{plan.recipe.source_name}: nothing to report (no merged tensors)")
    out = [{"ref": plan.refs[ci], "role": "model", "checkpoint": ci, "digest": None}
           for ci, _ in first.sources]  # fmt: skip
    if first.base is not None:
        out.append({"ref": plan.refs[first.base[0]], "role": "base",
                    "checkpoint": first.base[0], "digest": None})  # fmt: skip
    return out


def with_evaluation(
    report: dict[str, Any], table: Mapping[str, Mapping[str, float]], columns: Sequence[str]
) -> dict[str, Any]:
    """The report with an evaluation table (model -> task -> accuracy in [0, 1])."""
    rows = {m: {c: _r(float(table[m][c])) for c in columns} for m in table}
    return {**report, "evaluation": {"columns": list(columns), "rows": rows}}


def report(
    recipe: Recipe | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    offline: bool = False,
    before: Callable[[list[Path]], None] | None = None,
) -> dict[str, Any]:
    """The report of a recipe (or of a merged folder: its recipe, and its output).
    ``before(inputs)`` runs once the inputs are known and before any tensor is read (the
    caller's check that what it will write overlaps none of them).
    """
    out = Path(output) if output is not None else None
    if not isinstance(recipe, Recipe):
        path = Path(recipe)
        if path.is_dir():
            out = out or path
            recipe = _recipe_of_output(path)
        else:
            recipe = load_recipe(path)
    plan = build_plan(recipe, offline=offline)
    try:
        if before is not None:
            before([c.path for c in plan.checkpoints] + ([out] if out is not None else []))
        return analyse(plan, out)
    finally:
        plan.close()


def _recipe_of_output(folder: Path) -> Recipe:
    src = folder / RECIPE_NAME
    if not (src.is_file() and (folder / MANIFEST_NAME).is_file()):
        raise MerganserError(
            f"{folder}: not a merganser output (no {RECIPE_NAME}); give the recipe, with "
            "--output for the merged folder"
        )
    return load_recipe(src)


# -- the page --------------------------------------------------------------------------------


def _png(draw: Callable[[Any], None], width: float = 8.0, height: float = 3.6) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(r: dict[str, Any]) -> list[tuple[str, str]]:
    names = [x["ref"] for x in r["inputs"] if x["role"] == "model"]
    short = [_short(n) for n in names]
    layers = r["layers"]
    xs = list(range(len(layers)))
    ticks = [row["name"].replace("layer ", "") for row in layers]
    plots = []

    def norms(ax: Any) -> None:
        for i, s in enumerate(short):
            ax.plot(xs, [row["task_vector_norm"][i] for row in layers], marker="o", label=s)
        ax.set_xticks(xs, ticks, rotation=90, fontsize=7)
        ax.set_ylabel(f"‖θᵢ − {r['reference']}‖")
        ax.legend(fontsize=7)

    plots.append(("Task-vector norm per layer", _png(norms)))
    if len(names) > 1:

        def conflicts(ax: Any) -> None:
            ax.bar(xs, [100 * (row["sign_conflict"] or 0) for row in layers])
            ax.set_xticks(xs, ticks, rotation=90, fontsize=7)
            ax.set_ylabel("sign conflicts (% of entries)")

        plots.append(("Sign conflicts per layer (TIES)", _png(conflicts)))

        def cosine(ax: Any) -> None:
            m = [[c if c is not None else 0.0 for c in row] for row in r["model"]["cosine"]]
            im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_xticks(range(len(short)), short, rotation=45, fontsize=7, ha="right")
            ax.set_yticks(range(len(short)), short, fontsize=7)
            for i in range(len(m)):
                for j in range(len(m)):
                    ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=7)
            ax.figure.colorbar(im, ax=ax)

        plots.append(("Cosine of the task vectors (whole model)", _png(cosine, 6, 5)))
    if r["model"]["output_distance"] is not None:

        def moved(ax: Any) -> None:
            for i, s in enumerate(short):
                ys = [row["output_distance"][i] or 0 for row in layers]
                ax.plot(xs, ys, marker="o", label=s)
            ax.set_xticks(xs, ticks, rotation=90, fontsize=7)
            ax.set_ylabel("‖θ_out − θᵢ‖ / ‖θᵢ‖")
            ax.legend(fontsize=7)

        plots.append(("How far the output moved from each input", _png(moved)))
    ev = r["evaluation"]
    if ev:

        def bars(ax: Any) -> None:
            models, cols = list(ev["rows"]), ev["columns"]
            w = 0.8 / len(models)
            for i, m in enumerate(models):
                pos = [c + (i - (len(models) - 1) / 2) * w for c in range(len(cols))]
                ax.bar(pos, [100 * ev["rows"][m][c] for c in cols], w, label=_short(m))
            ax.set_xticks(range(len(cols)), cols)
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(0, 105)
            ax.legend(fontsize=7)

        plots.append(("Evaluation", _png(bars, 9, 3.8)))
    return plots


def _short(ref: str) -> str:
    p = ref.rstrip("/")
    return p.rsplit("/", 1)[-1] if "/" in p else p


def fmt(x: Any) -> str:
    """A number as the page shows it (the JSON's value, exactly)."""
    if x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    return repr(float(x))


def to_html(r: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    names = [x["ref"] for x in r["inputs"] if x["role"] == "model"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>merganser report: {esc(r['method'])}</title>",
        "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
        "pre{background:#f7f7f7;padding:1em;overflow-x:auto}.warn{color:#a40}"
        "img{max-width:100%}</style></head><body>",
        f"<h1>Merge report: <code>{esc(r['method'])}</code></h1>",
    ]
    if r["warnings"]:
        parts.append("<h2>Warnings</h2><ul class='warn'>")
        parts += [f"<li>{esc(w)}</li>" for w in r["warnings"]]
        parts.append("</ul>")
    parts.append("<h2>Inputs</h2><table id='inputs'><tr><th>#</th><th>model</th>"
                 "<th>tensor content (blake3)</th></tr>")  # fmt: skip
    for i, x in enumerate(r["inputs"]):
        label = str(i) if x["role"] == "model" else "base"
        parts.append(f"<tr><td>{label}</td><td>{esc(x['ref'])}</td>"
                     f"<td><code>{esc(x['digest'] or '')}</code></td></tr>")  # fmt: skip
    parts.append("</table>")
    if r["output"]:
        parts.append(f"<p>Merged output: <code>{esc(r['output'])}</code></p>")
    parts.append(f"<p>Task vectors are differences from the {esc(r['reference'])}.</p>")
    cols = ["parameters", "sign_conflict"]
    parts.append(_table("model", [{"name": "whole model", **r["model"]}], names, cols))
    parts.append(_table("groups", r["groups"], names, cols))
    parts.append(_table("layers", r["layers"], names, cols))
    for title, png in _plots(r):
        parts.append(f"<h2>{esc(title)}</h2><img alt='{esc(title)}' "
                     f"src='data:image/png;base64,{png}'>")  # fmt: skip
    ev = r["evaluation"]
    if ev:
        parts.append("<h2>Evaluation</h2><table id='evaluation'><tr><th>model</th>")
        parts += [f"<th>{esc(c)}</th>" for c in ev["columns"]]
        parts.append("</tr>")
        for m, row in ev["rows"].items():
            cells = "".join(f"<td>{fmt(row[c])}</td>" for c in ev["columns"])
            parts.append(f"<tr><td>{esc(m)}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append(f"<h2>Recipe</h2><pre>{esc(r['recipe'])}</pre>")
    data = json.dumps(r).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='report-data'>{data}</script>")
    # Counts the plots that decoded, for a headless browser to read back (tests).
    parts.append(
        "<script>window.addEventListener('load',function(){var imgs=document.images,ok=0;"
        "for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)ok++;}"
        "document.body.setAttribute('data-plots',ok+'/'+imgs.length);});</script>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _table(tid: str, rows: list[dict[str, Any]], names: list[str], cols: list[str]) -> str:
    esc = html.escape
    head = ["<th>rows</th>", *(f"<th>{c}</th>" for c in cols)]
    per_input = ["task_vector_norm", "relative_task_vector_norm", "trimmed", "output_distance"]
    shown = [k for k in per_input if any(row[k] is not None for row in rows)]
    head += [f"<th>{k} [{i}]</th>" for k in shown for i in range(len(names))]
    if len(names) > 1:
        head += [f"<th>cosine [{i},{j}]</th>" for i in range(len(names))
                 for j in range(i + 1, len(names))]  # fmt: skip
    out = [f"<h2>{esc(tid.capitalize())}</h2><table id='{tid}'><tr>{''.join(head)}</tr>"]
    for row in rows:
        cells = [f"<td>{esc(row['name'])}</td>", *(f"<td>{fmt(row[c])}</td>" for c in cols)]
        for k in shown:
            vals = row[k] or [None] * len(names)
            cells += [f"<td>{fmt(v)}</td>" for v in vals]
        if len(names) > 1:
            cells += [f"<td>{fmt(row['cosine'][i][j])}</td>" for i in range(len(names))
                      for j in range(i + 1, len(names))]  # fmt: skip
        out.append(f"<tr>{''.join(cells)}</tr>")
    out.append("</table>")
    return "".join(out)


def write_html(
    r: dict[str, Any],
    path: str | os.PathLike[str],
    force: bool = False,
    inputs: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write the page atomically: never over or into an input, nor over a file unless
    ``force``.
    """
    target = guard_output(path, inputs, force, kind="file")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(to_html(r))
        publish(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
