"""The `merganser` command line."""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merganser import __version__
from merganser.errors import MerganserError
from merganser.pipeline.allocator import tune_malloc

if TYPE_CHECKING:
    from merganser.storage.pagecache import Prefetch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9, '512MiB' -> 512*2**20, '1000' -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 512MiB, 1000000)")
    unit = (m.group(2) or "").lower().removesuffix("b")
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size unit in {text!r}")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return n


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return n

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")
# How a MergeOptions field's flag is parsed (its metadata's ``kind``).
_KINDS: dict[str, Callable[[str], int]] = {
    "size": parse_size,
    "positive": _positive_int,
    "non_negative": _non_negative_int,
}


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """`merganser merge`'s flags, one per field of MergeOptions (options.py): its name, help,
    default and parser come from the field, so the CLI and the API cannot drift apart.
    """
    from merganser.pipeline.options import option_fields

    for f in option_fields():
        meta, dest = f.metadata, f.name
        name = meta["name"] or "--" + dest.replace("_", "-")
        # Types are strings here (options.py has `from __future__ import annotations`).
        if str(f.type) == "bool | None":  # a tri-state: --x / --no-x, unset keeps the default
            g = parser.add_mutually_exclusive_group()
            g.add_argument(
                name, dest=dest, action="store_true", default=f.default, help=meta["help"]
            )
            g.add_argument("--no-" + name[2:], dest=dest, action="store_false")
        elif str(f.type) == "bool":
            action = "store_false" if f.default else "store_true"
            parser.add_argument(name, dest=dest, action=action, help=meta["help"])
        else:
            kind = _KINDS[meta["kind"]] if meta["kind"] else None
            parser.add_argument(
                name, dest=dest, type=kind, default=f.default, choices=meta.get("choices"),
                help=meta["help"],
            )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merganser", description=__doc__)
    p.add_argument("--version", action="version", version=f"merganser {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge the models a YAML recipe names")
    m.add_argument("recipe", help="YAML recipe (mergekit-compatible)")
    m.add_argument("out", help="output folder (written atomically)")
    add_option_flags(m)
    m.add_argument(
        "--dry-run", action="store_true", help="show the plan (as `merganser plan`); merge nothing"
    )
    m.add_argument("--json", action="store_true", help="print the result (or plan) as JSON")

    pl = sub.add_parser(
        "plan", help="what a merge would read, write and hold, from headers alone, in seconds"
    )
    pl.add_argument("recipe", help="YAML recipe")
    pl.add_argument("--json", action="store_true", help="as JSON")

    i = sub.add_parser("inspect", help="summarise a checkpoint from its headers")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON")

    rp = sub.add_parser(
        "report",
        help="an HTML page (and --json) of a merge's inputs and what the merge did to them",
    )
    rp.add_argument("source", help="a recipe, or a merged folder (its recipe and its output)")
    rp.add_argument("-o", "--out", help="the HTML page to write (default: print nothing)")
    rp.add_argument("--output", help="with a recipe: its merged folder (distances moved)")
    rp.add_argument("--json", action="store_true", help="print the report's numbers as JSON")
    rp.add_argument("--tasks", help="evaluate the output and inputs on these zoo tasks")
    rp.add_argument("--jsonl", action="append", default=[], help="... or on this JSONL data")
    rp.add_argument("--n", type=_positive_int, default=200, help="examples per zoo task")
    rp.add_argument("--split", default="test", choices=["dev", "test"])
    rp.add_argument("--offline", action="store_true", help="never download a hub id")
    rp.add_argument("--force", action="store_true", help="replace an existing page")

    v = sub.add_parser("verify", help="re-check a merged folder against its manifest")
    v.add_argument("path")

    ms = sub.add_parser("methods", help="list the merge methods and their parameters")
    shape = ms.add_mutually_exclusive_group()
    shape.add_argument(
        "--markdown", action="store_true", help="as the table in docs/methods.md (generated)"
    )
    shape.add_argument("--json", action="store_true", help="as JSON, one object per method")

    mo = sub.add_parser(
        "moe", help="a mixture of experts (Mixtral, Qwen MoE, Qwen3 MoE) from dense models"
    )
    mo.add_argument("config", help="mergekit-moe YAML")
    mo.add_argument("out", help="output folder (written atomically)")
    mo.add_argument("--force", action="store_true", help="replace an existing output folder")
    mo.add_argument(
        "--i-understand-this-is-not-useful-without-training",
        dest="allow_all_same",
        action="store_true",
        help="allow every expert to be the same model (mergekit-moe's flag)",
    )

    x = sub.add_parser(
        "extract-lora", help="a PEFT LoRA adapter from a full fine-tune (truncated SVD of ΔW)"
    )
    x.add_argument("finetune", help="the fine-tuned model folder")
    x.add_argument("out", help="output adapter folder (written atomically)")
    x.add_argument("--base", required=True, help="the model it was fine-tuned from")
    size = x.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every module's factors")
    size.add_argument(
        "--energy", type=float, help="per module, the fewest ranks keeping this share of ‖ΔW‖²"
    )
    x.add_argument(
        "--embeddings",
        action="store_true",
        help="factor the embeddings too (default: saved whole, as modules_to_save)",
    )
    x.add_argument("--force", action="store_true", help="replace an existing output folder")
    x.add_argument("--json", action="store_true", help="the per-module report as JSON")

    k = sub.add_parser("kinship", help="pairwise kinship of models' task vectors")
    k.add_argument("models", nargs="+", help="two or more model folders")
    k.add_argument("--base", required=True, help="the common base model")
    k.add_argument(
        "--split",
        action="store_true",
        help="size-weighted average of per-tensor metrics (reference --split-calculation)",
    )
    k.add_argument("--heatmap", default=None, help="write a PNG of the Pearson matrix here")
    k.add_argument("--force", action="store_true", help="replace an existing --heatmap file")
    k.add_argument("--json", action="store_true", help="print JSON")

    for name, helptext in (
        ("zip", "ZipIt!: merge models from different initialisations (full or partial)"),
        ("align", "permute a model into another's basis (Git Re-Basin); same function"),
    ):
        z = sub.add_parser(name, help=helptext)
        if name == "zip":
            z.add_argument("models", nargs="+", help="two or more model folders, then OUT")
        else:
            z.add_argument("ref", help="the model whose basis is kept")
            z.add_argument("other", help="the model to permute")
            z.add_argument("out", help="output folder for the permuted model")
        src = z.add_mutually_exclusive_group()
        src.add_argument("--tasks", help="zoo tasks, comma-separated (their train split)")
        src.add_argument("--data", help="JSONL of {prompt, answer} or {text}, or a .txt")
        z.add_argument("--examples", type=_positive_int, default=256, help="at most this many")
        z.add_argument("--batch", type=_positive_int, default=16)
        z.add_argument(
            "--match",
            choices=("zipit", "permute", "weights", "identity")
            if name == "zip"
            else ("weights", "permute"),
            default="zipit" if name == "zip" else "weights",
            help="zipit (default for zip), permute (activation matching), weights "
            "(Git Re-Basin weight matching, no data) or identity (plain averaging)",
        )
        z.add_argument("--seed", type=int, default=0)
        z.add_argument("--force", action="store_true", help="replace a non-empty output folder")
        z.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
        if name == "zip":
            z.add_argument("--alpha", type=float, default=0.3, help="ZipIt α (default 0.3)")
            z.add_argument("--beta", type=float, default=0.125, help="ZipIt β (default 0.125)")
            z.add_argument(
                "--layers",
                type=int,
                default=None,
                help="blocks zipped into the shared trunk (default: all); fewer is a partial "
                "zip and needs --heads",
            )
            z.add_argument(
                "--heads",
                help="comma-separated head names, one per model (usually their tasks): write "
                "a multi-head model",
            )
            z.add_argument(
                "--refit",
                action="store_true",
                help="refit the zipped linears by least squares on the data, block by block "
                "(PLeaS); needed for models from different initialisations to work",
            )
            z.add_argument(
                "--ridge", type=float, default=1e-4, help="the refit's ridge (default 1e-4)"
            )

    c = sub.add_parser(
        "calibrate", help="input Grams / Fisher of a model on data (RegMean, Fisher)"
    )
    c.add_argument(
        "model", help="model folder of any transformers class (texts need its tokenizer)"
    )
    c.add_argument("out", help="statistics file to write (.safetensors)")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--tasks", help="zoo tasks, comma-separated (their train split)")
    src.add_argument(
        "--data",
        help="JSONL of {prompt, answer} or {text}, a .txt of lines, or a .safetensors of model "
        "inputs (e.g. pixel_values), examples along the first axis",
    )
    c.add_argument("--examples", type=_positive_int, default=256, help="at most this many")
    c.add_argument("--batch", type=_positive_int, default=16)
    c.add_argument("--no-grams", dest="grams", action="store_false", help="skip the Grams")
    c.add_argument("--fisher", action="store_true", help="also the diagonal Fisher")
    c.add_argument("--fisher-labels", choices=("sampled", "empirical"), default="sampled")
    c.add_argument(
        "--include-padding",
        action="store_true",
        help="count padding rows in the Grams, as the RegMean code does",
    )
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda[:N]")
    c.add_argument("--threads", type=_positive_int, default=1, help="torch threads")
    c.add_argument("--force", action="store_true", help="replace an existing statistics file")
    c.add_argument("--no-progress", dest="progress", action="store_false")

    s = sub.add_parser("evolve", help="search merges against a dev set (Evolver, CMA-ES, soups)")
    s.add_argument("search", help="SEARCH.yaml")
    s.add_argument("out", help="output folder: best/, search.json, search.png, evaluations.jsonl")
    s.add_argument("--resume", action="store_true", help="go on from OUT's evaluation journal")
    s.add_argument(
        "--resume-repair",
        action="store_true",
        help="with --resume: drop damaged journal lines (they are evaluated again) instead of "
        "refusing to resume",
    )
    s.add_argument("--force", action="store_true", help="discard a previous search in OUT")
    s.add_argument("--workers", type=_positive_int, help="parallel evaluators (default: cores)")
    s.add_argument(
        "--ray", metavar="ADDRESS", help="evaluate on a Ray cluster ('local' starts one)"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.add_argument("--quiet", action="store_true", help="no per-generation progress")

    z = sub.add_parser("zoo", help="the offline model zoo")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser("build", help="train the tiny base and experts (cached)")
    zb.add_argument("dir")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--reduced", action="store_true", help="a small fast zoo (for tests)")
    zb.add_argument("--threads", type=_positive_int, default=1, help="torch threads")

    e = sub.add_parser("eval", help="per-task exact-match accuracy and loss of models")
    e.add_argument("models", nargs="+", help="model folders")
    e.add_argument(
        "--tasks",
        default=None,
        help="comma-separated zoo tasks, 'experts' or 'all' (default: experts, "
        "unless --jsonl or --evaluator is given)",
    )
    e.add_argument("--jsonl", action="append", default=[], help="JSONL of prompt/answer pairs")
    e.add_argument(
        "--evaluator",
        action="append",
        default=[],
        help="a Python callable 'module:function' taking a LoadedModel",
    )
    e.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="lm-evaluation-harness tasks, comma-separated (pip install 'merganser[lm-eval]')",
    )
    e.add_argument("--lm-eval-include", metavar="DIR", help="a folder of local lm-eval task YAML")
    e.add_argument("--limit", type=_positive_int, help="with --lm-eval: examples per task")
    e.add_argument("--num-fewshot", type=int, help="with --lm-eval: few-shot examples")
    e.add_argument("--device", default="cpu", help="where the models run: cpu or cuda[:N]")
    e.add_argument("--split", default="test", choices=["dev", "test"])
    e.add_argument("--n", type=_positive_int, default=200, help="examples per zoo task")
    e.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("tiny", help="write a small random Llama base and experts (for demos)")
    t.add_argument("out")
    t.add_argument("--experts", type=_positive_int, default=2)
    t.add_argument("--seed", type=int, default=0)
    return p


def _cmd_merge(a: argparse.Namespace) -> int:
    from merganser.api import merge
    from merganser.pipeline.options import MergeOptions, option_fields

    opts = MergeOptions(**{f.name: getattr(a, f.name) for f in option_fields()})
    if a.dry_run:
        return _show_plan(a.recipe, opts, a.json, Path(a.out))
    started = time.monotonic()
    out = merge(a.recipe, a.out, opts)
    if a.json:
        from merganser.storage.writer import MANIFEST_NAME

        result: dict[str, Any] = {"output": str(out), "kind": opts.output}
        if opts.output == "model":
            manifest = json.loads((out / MANIFEST_NAME).read_text())
            shards = manifest["shards"]
            result.update(
                method=manifest["method"],
                recipe_sha256=manifest["recipe_sha256"],
                shards=len(shards),
                bytes=sum(v["bytes"] for v in shards.values()),
            )
        else:  # a PEFT adapter: its files, no merganser manifest
            result["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        result["seconds"] = round(time.monotonic() - started, 3)
        print(json.dumps(result, indent=1))
    else:
        print(f"merged into {out}")
    return 0


def _show_plan(recipe: str, opts: Any, as_json: bool, out: Path | None = None) -> int:
    from merganser.pipeline.preview import format_preview, preview_file

    previews = preview_file(recipe, opts, out)
    if as_json:
        print(json.dumps(previews if len(previews) > 1 else previews[0], indent=1))
    else:
        print("\n\n".join(format_preview(p) for p in previews))
    missing = [m for p in previews for m in p["missing"]]
    if missing:  # the plan above, then one line that says why the merge could not run
        raise MerganserError(f"{recipe}: {len(missing)} input(s) missing: {', '.join(missing)}")
    return 0


def _cmd_moe(a: argparse.Namespace) -> int:
    from merganser.api import MergeOptions, moe

    opts = MergeOptions(progress=False)
    print(f"built {moe(a.config, a.out, a.force, a.allow_all_same, opts)}")
    return 0


def _cmd_extract_lora(a: argparse.Namespace) -> int:
    from merganser.pipeline.extract import extract_lora

    ext = extract_lora(a.finetune, a.base, a.out, a.rank, a.energy, a.embeddings, a.force)
    report = ext.report()
    if a.json:
        print(json.dumps(report, indent=1))
        return 0
    ranks = sorted({r for r, _ in ext.modules.values()})
    print(
        f"{report['output']}: {len(ext.modules)} modules at rank "
        f"{ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}, "
        f"{len(ext.saved)} saved whole, largest relative error "
        f"{report['max_relative_error']:.4g}, {report['bytes'] / 2**20:.2f} MiB"
    )
    return 0


def _cmd_plan(a: argparse.Namespace) -> int:
    from merganser.pipeline.options import MergeOptions

    return _show_plan(a.recipe, MergeOptions(), a.json)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from merganser.analysis.summary import format_summary, summarize

    s = summarize(a.path)
    print(json.dumps(s, indent=2) if a.json else format_summary(s))
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from merganser.analysis.verify import verify_output

    r = verify_output(a.path)
    scope = "every file" if r["files_checked"] else "shards only: an older manifest"
    print(f"{a.path}: OK ({r['shards']} shard(s), {r['tensors']} tensors; {scope})")
    return 0


def _cmd_methods(a: argparse.Namespace) -> int:
    from merganser.methods import all_methods, markdown_table, method_json

    if a.markdown:
        print(markdown_table(), end="")
        return 0
    if a.json:
        print(json.dumps([method_json(m) for m in all_methods()], indent=1))
        return 0
    for m in all_methods():
        tag = " [experimental]" if m.experimental else ""
        print(f"{m.name}{tag}: {m.reference}")
        for p in m.params:
            default = "required" if p.default is None else f"default {p.default!r}"
            print(f"    {p.name} ({p.scope}, {default}) {p.doc}")
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    from merganser.evaluation.zoo import ZooSpec, build_zoo

    spec = ZooSpec.reduced(a.seed) if a.reduced else ZooSpec(seed=a.seed)
    for name, path in build_zoo(a.dir, spec, threads=a.threads).items():
        print(f"{name}: {path}")
    return 0


def _cmd_report(a: argparse.Namespace) -> int:
    from merganser.analysis.report import report, with_evaluation, write_html
    from merganser.storage.writer import guard_output

    if not (a.out or a.json):
        raise MerganserError("report: give -o PAGE.html, --json, or both")
    inputs: list[Path] = []

    def check(paths: list[Path]) -> None:  # before any tensor is read
        inputs.extend([Path(a.source), *paths])
        if a.out:
            guard_output(a.out, inputs, a.force, kind="file")

    r = report(a.source, a.output, a.offline, before=check)
    if a.tasks or a.jsonl:
        from merganser.evaluation.evaluate import evaluate, jsonl_evaluator, zoo_evaluator

        evaluators = [jsonl_evaluator(p) for p in a.jsonl]
        if a.tasks:
            tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
            evaluators.append(zoo_evaluator(tasks, a.split, a.n))
        models = [x["ref"] for x in r["inputs"]] + ([r["output"]] if r["output"] else [])
        scores = {m: evaluate(m, evaluators) for m in models}
        columns = list(next(iter(scores.values())))
        table = {m: {t: s[t].accuracy for t in columns} for m, s in scores.items()}
        r = with_evaluation(r, table, columns)
    if a.out:
        print(f"wrote {write_html(r, a.out, a.force, inputs)}", file=sys.stderr)
    if a.json:
        print(json.dumps(r, indent=2))
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    import importlib

    from merganser.evaluation.evaluate import (
        evaluate,
        jsonl_evaluator,
        load_model,
        scores_to_json,
        zoo_evaluator,
    )
    from merganser.evaluation.report import format_table
    from merganser.evaluation.zoo import ALL_TASKS, EXPERT_TASKS

    evaluators = [jsonl_evaluator(p) for p in a.jsonl]
    for spec in a.evaluator:
        mod, _, fn = spec.partition(":")
        try:
            evaluators.append(getattr(importlib.import_module(mod), fn))
        except (ImportError, AttributeError) as e:
            raise MerganserError(f"--evaluator {spec}: cannot import ({e})") from None
    if a.lm_eval:
        from merganser.evaluation.lm_eval import lm_eval_evaluator

        names = [t.strip() for t in a.lm_eval.split(",") if t.strip()]
        evaluators.append(lm_eval_evaluator(names, a.limit, a.num_fewshot, a.lm_eval_include))
    elif a.limit is not None or a.num_fewshot is not None or a.lm_eval_include:
        raise MerganserError("--limit, --num-fewshot and --lm-eval-include go with --lm-eval")
    if a.tasks or not evaluators:
        names = {"experts": list(EXPERT_TASKS), "all": list(ALL_TASKS), None: list(EXPERT_TASKS)}
        tasks = names.get(a.tasks) or [t.strip() for t in a.tasks.split(",") if t.strip()]
        evaluators.append(zoo_evaluator(tasks, a.split, a.n))
    from merganser.pipeline.device import check_device

    check_device(a.device)
    results = {}
    for m in a.models:
        lm = load_model(m)
        lm.model.to(a.device)
        results[m] = evaluate(lm, evaluators)
    if a.json:
        print(json.dumps({m: scores_to_json(s) for m, s in results.items()}, indent=2))
        return 0
    tasks = list(next(iter(results.values())))
    acc = {
        m: {
            **{t: s[t].accuracy for t in tasks},
            "average": sum(s[t].accuracy for t in tasks) / len(tasks),
        }
        for m, s in results.items()
    }
    loss = {m: {t: s[t].loss for t in tasks} for m, s in results.items()}
    print(f"exact-match accuracy (%), {a.split} split")
    print(format_table(acc, [*tasks, "average"]))
    print(f"\nanswer loss (nats/token), {a.split} split")
    print(format_table(loss, tasks, pct=False))
    return 0


def _cmd_kinship(a: argparse.Namespace) -> int:
    from pathlib import Path

    from merganser.analysis.kinship import METRICS, format_matrix, heatmap, kinship_matrix
    from merganser.storage.writer import guard_output

    if a.heatmap:  # checked before the work, not after it
        guard_output(a.heatmap, [*a.models, a.base], a.force, kind="file")
    matrices = kinship_matrix(a.models, a.base, split=a.split)
    if a.json:
        print(json.dumps({"models": a.models, "base": a.base, **matrices}, indent=2))
    else:
        for metric in METRICS:
            print(f"{metric}:\n{format_matrix(a.models, matrices[metric])}\n")
    if a.heatmap:
        heatmap(a.models, matrices["pearson"], "pearson", Path(a.heatmap))
        print(f"heatmap: {a.heatmap}", file=sys.stderr)
    return 0


def _texts(a: argparse.Namespace) -> list[str] | None:
    """Texts from --tasks (zoo train split, interleaved, at most --examples) or --data."""
    from merganser.evaluation.calibrate import read_texts

    if a.tasks:
        from merganser.evaluation.zoo.tasks import get_task

        texts = [
            p + ans
            for t in a.tasks.split(",")
            for p, ans in get_task(t.strip()).examples("train", a.examples, a.seed)
        ]
        return texts[:: max(1, len(texts) // a.examples)][: a.examples]
    if a.data:
        return read_texts(a.data)[: a.examples]
    return None


def _cmd_zip(a: argparse.Namespace) -> int:
    import torch

    from merganser.zipping.zipper import ZipOptions, zip_models

    if len(a.models) < 3:
        raise MerganserError("zip: give two or more model folders and then the output folder")
    torch.set_num_threads(a.threads)
    heads = tuple(h.strip() for h in a.heads.split(",")) if a.heads else None
    opts = ZipOptions(
        matcher=a.match, alpha=a.alpha, beta=a.beta, layers=a.layers, heads=heads,
        batch=a.batch, seed=a.seed, refit=a.refit, ridge=a.ridge,
    )  # fmt: skip
    r = zip_models(a.models[:-1], _texts(a), a.models[-1], opts, force=a.force)
    kind = f"multi-head model (heads {', '.join(r['heads'])})" if r["heads"] else "model"
    data = f", features from {r['tokens']} tokens" if r["tokens"] else ""
    refit = ", refit by least squares" if r["refit"] else ""
    print(
        f"{r['out']}: {kind}, {r['layers']}/{r['of']} blocks zipped by {r['matcher']}{data}{refit}"
    )
    return 0


def _cmd_align(a: argparse.Namespace) -> int:
    import torch

    from merganser.zipping.zipper import ZipOptions, align_models

    torch.set_num_threads(a.threads)
    r = align_models(
        a.ref, a.other, a.out, _texts(a), a.match, force=a.force,
        options=ZipOptions(batch=a.batch, seed=a.seed),
    )  # fmt: skip
    print(
        f"{r['out']}: {r['other']} permuted into {r['ref']}'s basis by {r['matcher']} matching "
        f"({r['tensors_moved']} block tensors moved)"
    )
    return 0


def _cmd_calibrate(a: argparse.Namespace) -> int:
    import torch

    from merganser.evaluation.calibrate import CalibrationOptions, calibrate
    from merganser.storage.writer import guard_output

    torch.set_num_threads(a.threads)
    if a.data:  # the data file is an input too (calibrate checks the model itself)
        guard_output(a.out, [a.data], force=True, kind="file")
    data = a.data if a.data and a.data.endswith(".safetensors") else _texts(a)
    if data is None:
        raise MerganserError("calibrate: give --tasks or --data")
    opts = CalibrationOptions(
        examples=a.examples,
        batch=a.batch,
        grams=a.grams,
        fisher=a.fisher,
        fisher_labels=a.fisher_labels,
        mask_padding=not a.include_padding,
        seed=a.seed,
        progress=None if a.progress else False,
        device=a.device,
        force=a.force,
    )
    tensors, meta = calibrate(a.model, data, a.out, opts)
    tokens = f" ({meta['tokens']} tokens)" if meta.get("tokens", "0") != "0" else ""
    print(
        f"{a.out}: {meta['kinds']} statistics from {meta['examples']} examples{tokens}, "
        f"{len(tensors)} tensors"
    )
    return 0


def _cmd_evolve(a: argparse.Namespace) -> int:
    from merganser.search.config import load_search
    from merganser.search.run import run_search
    from merganser.storage.writer import guard_output

    cfg = load_search(a.search)
    guard_output(a.out, [a.search], force=True)  # the search file itself is an input too
    r = run_search(
        cfg, a.out, resume=a.resume or a.resume_repair, resume_repair=a.resume_repair,
        force=a.force, workers=a.workers, ray=a.ray,
        verbose=not a.quiet,
    )  # fmt: skip
    if a.json:
        print(json.dumps(r, indent=2))
        return 0
    print(
        f"{r['strategy']}: {r['evaluations']} evaluations, {r['workers']} workers "
        f"({r['backend']}, {r['nodes']} node{'s' if r['nodes'] > 1 else ''})"
    )
    print(f"{'':<8}{'dev':>8}{'test':>8}")
    for label, row in (("start", r["start"]), ("best", r["best"])):
        test = "" if row["test"] is None else f"{row['test']:>8.4f}"
        print(f"{label:<8}{row['dev']:>8.4f}{test}")
    print(f"best model: {a.out}/best; report: {a.out}/search.json, {a.out}/search.png")
    return 0


def _cmd_tiny(a: argparse.Namespace) -> int:
    from merganser.evaluation.tiny import build_family

    for p in build_family(a.out, experts=a.experts, seed=a.seed):
        print(p)
    return 0


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "merge": _cmd_merge,
    "inspect": _cmd_inspect,
    "verify": _cmd_verify,
    "methods": _cmd_methods,
    "plan": _cmd_plan,
    "extract-lora": _cmd_extract_lora,
    "moe": _cmd_moe,
    "report": _cmd_report,
    "tiny": _cmd_tiny,
    "zoo": _cmd_zoo,
    "kinship": _cmd_kinship,
    "evolve": _cmd_evolve,
    "calibrate": _cmd_calibrate,
    "zip": _cmd_zip,
    "align": _cmd_align,
    "eval": _cmd_eval,
}


def run(args: argparse.Namespace, console: bool = False) -> int:
    """Carry out parsed arguments; the exit status. Everything after argument parsing runs
    inside this one error boundary, the prefetch included: whatever the input, the outcome is
    one line and a documented exit status (docs/errors.md), never a traceback. ``console``:
    the process is the command itself (see ``_import_torch_frozen``).
    """
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    tune_malloc()
    early: Prefetch | None = None
    try:
        early = _prefetch(args)
        if console:
            _import_torch_frozen()
        return HANDLERS[args.command](args)
    except MerganserError as e:
        print(f"merganser: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of stdout went away (`merganser kinship ... | head`): stop quietly, as a
        # program killed by SIGPIPE does, and keep the exit's flush from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f"{_short(os.fsdecode(e.filename))}: " if e.filename else ""
        print(f"merganser: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except RecursionError:
        print("merganser: error: input nested too deeply to process", file=sys.stderr)
        return 1
    except ValueError as e:
        if "null byte" not in str(e):  # the os module's word for a NUL in a path
            return _internal(e)
        print("merganser: error: a path contains a NUL character", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("merganser: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:
        return _internal(e)
    finally:
        if early is not None:
            early.stop()


def _internal(e: Exception) -> int:
    """A bug, not the user's input: one line and exit 70 (re-raised with MERGANSER_DEBUG)."""
    if os.environ.get("MERGANSER_DEBUG"):
        raise e
    print(
        f"merganser: internal error: {type(e).__name__}: {_one_line(str(e))} "
        "(set MERGANSER_DEBUG=1 for a traceback)",
        file=sys.stderr,
    )
    return 70


def _short(text: str, limit: int = 240) -> str:
    """``text`` cut in the middle to at most ``limit`` characters (a 500-segment path)."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def _one_line(text: str) -> str:
    """The first line of a message, shortened: errors are one line."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    return _short(first, 1000)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _import_torch_frozen() -> None:
    """Import torch with the cyclic GC paused, then freeze what it built.

    Importing torch builds about a million long-lived objects. The cyclic GC would traverse
    them again and again while they are imported and once more at exit: half a second of a
    command's start-up here. The permanent generation is never traversed. Only for the console
    script: a program that calls ``main`` keeps its own objects collectable.
    """
    gc.disable()
    try:
        import merganser.api  # noqa: F401  (imports torch)
    finally:
        gc.freeze()
        gc.enable()


def entry() -> None:
    """The console script: ``main``, then exit with its status."""
    args = build_parser().parse_args()  # help, version and usage errors exit here, before torch
    sys.exit(run(args, console=True))


def _prefetch(a: argparse.Namespace) -> Prefetch | None:
    """For a merge, start reading its inputs into the page cache while torch is imported (it
    goes on while the merge runs, up to its limit: the engine computes the ranges it brought
    in with no reads of its own, and the disk would idle meanwhile). Best effort: a recipe it
    cannot read is left for the merge to report.
    """
    if a.command != "merge" or a.read_mode == "direct":
        return None
    from merganser.pipeline.recipe import load_recipe
    from merganser.storage import pagecache

    try:
        recipe = load_recipe(a.recipe)
        models = [pagecache.weight_files(recipe.resolve(p)) for p in recipe.model_paths()]
    except (MerganserError, OSError, ValueError):
        return None  # the merge itself reports it
    return pagecache.Prefetch(models, pagecache.prefetch_limit()).start()


if __name__ == "__main__":
    entry()
