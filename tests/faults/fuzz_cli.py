"""A generic fuzzer over every subcommand's inputs: recipes, safetensors headers, index and
config files, JSONL data, SEARCH.yaml files, statistics files, and special files (FIFOs,
folders, devices, dangling links, very long paths) in place of any of them.

Each case builds its inputs in a folder of its own, runs the real command line in-process
(``cli.main``: the same error boundary and prefetch as the console script) under a time
limit, and judges the outcome. The bar, for every case:
- exit 0, or exit 1 with exactly one line ``merganser: error: ...``; never a traceback, never
  exit 70 (an internal error on user input);
- no hang (a case over ``LIMIT_S`` seconds);
- a merge that exits 0 writes only finite values;
- nothing is written outside the output path, and no input changes.

``python tests/faults/fuzz_cli.py N [SEED]`` runs N cases and prints the tally;
``tests/faults/test_fuzz_cli.py`` runs a bounded slice in ``make test``, ``make fuzz`` more.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

LIMIT_S = 60
SUBCOMMANDS = (
    "merge",
    "inspect",
    "verify",
    "kinship",
    "calibrate",
    "eval",
    "evolve",
    "zip",
    "align",
    "plan",
    "extract-lora",
    "moe",
    "report",
)


@dataclass
class Tally:
    cases: int = 0
    ok: int = 0
    refused: int = 0
    tracebacks: int = 0
    internal: int = 0
    hangs: int = 0
    nonfinite: int = 0
    outside_writes: int = 0
    inputs_changed: int = 0
    by_command: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return (
            self.tracebacks
            + self.internal
            + self.hangs
            + self.nonfinite
            + self.outside_writes
            + self.inputs_changed
        )

    def line(self) -> str:
        return (
            f"{self.cases} cases ({self.ok} ran, {self.refused} refused in one line): "
            f"{self.tracebacks} tracebacks, {self.hangs} hangs, {self.internal} internal errors, "
            f"{self.nonfinite} silent non-finite outputs, {self.outside_writes} writes outside "
            f"the output, {self.inputs_changed} inputs changed"
        )


# -- hostile values -------------------------------------------------------------------------


def nested(depth: int, kind: str = "list") -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v] if kind == "list" else {"a": v}
    return v


def hostile_value(r: random.Random) -> Any:
    """A value meant to break whoever reads it."""
    return r.choice(
        [
            lambda: nested(r.choice([40, 300, 3000])),
            lambda: nested(r.choice([40, 300]), "dict"),
            lambda: 10**25,  # (longer integers are injected as text: dump_text)
            lambda: 2**64,
            lambda: -(2**63),
            lambda: 1e39,
            lambda: -1e308,
            lambda: float("nan"),
            lambda: float("inf"),
            lambda: "x" * r.choice([300, 100_000]),
            lambda: "/".join(["a"] * r.choice([500, 5000])),
            lambda: None,
            lambda: True,
            lambda: [],
            lambda: {},
            lambda: [None, "a", 1.5],
            lambda: {"filter": "mlp", "value": [[1]]},
            lambda: r.uniform(-3, 3),
            lambda: r.randint(-3, 3),
            lambda: "\x00\udcff",
        ]
    )()


def mutate_tree(doc: Any, r: random.Random) -> Any:
    """``doc`` with one node (or a new key) replaced by a hostile value."""
    doc = json.loads(json.dumps(doc))
    paths: list[tuple[Any, Any]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for k in list(v):
                paths.append((v, k))
                walk(v[k])
        elif isinstance(v, list):
            for i in range(len(v)):
                paths.append((v, i))
                walk(v[i])

    walk(doc)
    if not paths or r.random() < 0.15:
        if isinstance(doc, dict):
            keys = ["bogus", "merge_method", "parameters", "weight_map", "slices", "modules"]
            doc[r.choice(keys)] = hostile_value(r)
        return doc
    parent, key = r.choice(paths)
    parent[key] = hostile_value(r)
    return doc


def dump_text(doc: Any, r: random.Random, yaml_ok: bool = True) -> str:
    """The document as YAML or JSON text, sometimes damaged at the text level."""
    try:
        text = yaml.safe_dump(doc) if yaml_ok and r.random() < 0.5 else json.dumps(doc)
    except (RecursionError, ValueError):
        text = json.dumps({"deep": "x"})
    roll = r.random()
    if roll < 0.1:
        cut = r.randrange(len(text) + 1)
        text = text[:cut]
    elif roll < 0.18 and text.startswith("{"):
        text = text[:-1] + ', "merge_method": "linear", "merge_method": "ties"}'
    elif roll < 0.24:
        text = text.replace("1", "1" * 5000, 1)
    return text


def write_text(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass"))


# -- special files in place of an input -----------------------------------------------------


def special(path: Path, r: random.Random) -> Path:
    """Put a FIFO, folder, device, dangling link, empty file or garbage at ``path``."""
    kind = r.choice(["fifo", "folder", "device", "dangling", "empty", "garbage", "long"])
    if kind == "long":
        return path.parent / "/".join(["a"] * 600)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    if kind == "fifo" and hasattr(os, "mkfifo"):
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(bytes(r.randrange(256) for _ in range(r.randrange(1, 64))))
    return path


# -- seed inputs ----------------------------------------------------------------------------


def model(folder: Path, seed: int, config: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file(
        {
            "model.layers.0.mlp.weight": torch.randn(8, 4, generator=g),
            "model.layers.1.mlp.weight": torch.randn(8, 4, generator=g),
            "model.embed_tokens.weight": torch.randn(6, 4, generator=g),
        },
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(config or {"num_hidden_layers": 2}))
    return folder


def hostile_header(r: random.Random) -> bytes:
    """A safetensors file whose header or data is damaged."""
    entry = {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}
    header: Any = {"model.layers.0.mlp.weight": entry, "__metadata__": {"format": "pt"}}
    header = mutate_tree(header, r)
    try:
        raw = json.dumps(header).encode()
    except (RecursionError, ValueError):
        raw = b"{" * 100_000
    roll = r.random()
    if roll < 0.15:
        raw = raw[:-1] + b', "model.layers.0.mlp.weight": {}}'  # a duplicate key
    elif roll < 0.25:
        raw = b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    declared = len(raw) if r.random() < 0.8 else r.choice([0, 7, 2**62, len(raw) + 1000])
    data = b"\0" * r.choice([0, 64, 128, 128, 200])
    return struct.pack("<Q", declared) + raw + data


# -- cases ----------------------------------------------------------------------------------


@dataclass
class Case:
    argv: list[str]
    out: Path | None  # the output path the command may write
    inputs: Path  # the folder of this case's inputs (must not change)


def _recipe_doc(models: list[Path], r: random.Random) -> dict:
    method = r.choice(["linear", "ties", "task_arithmetic", "slerp", "model_stock", "dare_ties"])
    doc: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": str(m)} for m in models[1:]],
    }
    if method != "linear":
        doc["base_model"] = str(models[0])
    if method == "slerp":
        doc["parameters"] = {"t": 0.5}
        doc["models"] = doc["models"][:1]
    if method in ("ties", "dare_ties"):
        doc["parameters"] = {"density": 0.5}
    if r.random() < 0.2:  # the same merge through mergekit's modules: syntax
        doc["modules"] = {"text_decoder": {"models": doc.pop("models")}}
    return doc


def make_case(root: Path, r: random.Random, command: str) -> Case:
    inp = root / "in"
    inp.mkdir(parents=True)
    ms = [model(inp / f"m{i}", i) for i in range(3)]
    out = root / "out"
    target = r.random()

    def damage_a_model() -> None:
        m = r.choice(ms)
        what = r.random()
        if what < 0.4:
            (m / "model.safetensors").write_bytes(hostile_header(r))
        elif what < 0.55:
            (m / "model.safetensors").unlink()
            shard = "model-00001-of-00001.safetensors"
            save_file({"w": torch.ones(2)}, str(m / shard))
            idx = mutate_tree({"weight_map": {"w": shard}, "metadata": {"total_size": 8}}, r)
            write_text(m / "model.safetensors.index.json", dump_text(idx, r, yaml_ok=False))
        elif what < 0.7:
            write_text(
                m / "config.json", dump_text(mutate_tree({"num_hidden_layers": 2}, r), r, False)
            )
        else:
            special(m / r.choice(["model.safetensors", "config.json"]), r)

    if command == "merge":
        doc = _recipe_doc(ms, r)
        recipe = inp / "recipe.yaml"
        if target < 0.5:
            write_text(recipe, dump_text(mutate_tree(doc, r), r))
        else:
            write_text(recipe, yaml.safe_dump(doc))
            damage_a_model()
        if r.random() < 0.05:
            recipe = special(recipe, r)
        return Case(["merge", str(recipe), str(out), "--no-progress"], out, inp)
    if command == "plan":
        recipe = inp / "recipe.yaml"
        write_text(recipe, dump_text(mutate_tree(_recipe_doc(ms, r), r), r))
        if r.random() < 0.3:
            damage_a_model()
        return Case(["plan", str(recipe), "--json"], None, inp)
    if command == "moe":
        doc = {
            "base_model": str(ms[0]),
            "gate_mode": r.choice(["random", "cheap_embed", "hidden"]),
            "experts": [
                {"source_model": str(m), "positive_prompts": [f"p{i}"]}
                for i, m in enumerate(ms[1:])
            ],
        }
        config = inp / "moe.yaml"
        write_text(config, dump_text(mutate_tree(doc, r), r))
        if r.random() < 0.3:
            damage_a_model()
        return Case(["moe", str(config), str(out)], out, inp)
    if command == "report":
        recipe = inp / "recipe.yaml"
        if target < 0.5:
            write_text(recipe, dump_text(mutate_tree(_recipe_doc(ms, r), r), r))
        else:
            write_text(recipe, yaml.safe_dump(_recipe_doc(ms, r)))
            damage_a_model()
        page = out if r.random() < 0.8 else ms[1] / "model.safetensors"  # never an input
        return Case(["report", str(recipe), "-o", str(page), "--json"], out, inp)
    if command == "extract-lora":
        damage_a_model()
        where = out if r.random() < 0.8 else ms[0]
        size = r.choice([["--rank", "1"], ["--energy", "0.9"], ["--rank", "0"]])
        return Case(["extract-lora", str(ms[1]), str(where), "--base", str(ms[0]), *size], out, inp)
    if command in ("inspect", "verify"):
        m = ms[0]
        if command == "verify" or target < 0.7:
            damage_a_model() if r.random() < 0.3 else (m / "model.safetensors").write_bytes(
                hostile_header(r)
            )
        if command == "verify":
            manifest = {"shards": {"model.safetensors": {"blake3": "0" * 64, "bytes": 10}}}
            write_text(m / "merganser_manifest.json", dump_text(mutate_tree(manifest, r), r, False))
        path = special(m / "model.safetensors", r) if r.random() < 0.1 else m
        return Case([command, str(path)], None, inp)
    if command == "kinship":
        damage_a_model()
        heat = out if r.random() < 0.5 else ms[1] / "k.png"
        argv = ["kinship", str(ms[1]), str(ms[2]), "--base", str(ms[0])]
        return Case([*argv, "--heatmap", str(heat)], out, inp)
    if command in ("calibrate", "eval"):
        data = inp / "data.jsonl"
        lines = [{"prompt": "ab", "answer": "ba"}, {"text": "hello"}]
        rows = [dump_text(mutate_tree(x, r), r, yaml_ok=False) for x in lines]
        write_text(data, "\n".join(rows) + "\n")
        if r.random() < 0.2:
            data = special(data, r)
        if r.random() < 0.3:
            damage_a_model()
        if command == "eval":
            return Case(["eval", str(ms[0]), "--jsonl", str(data)], None, inp)
        stats_out = out if r.random() < 0.7 else ms[0] / "stats.safetensors"
        return Case(["calibrate", str(ms[0]), str(stats_out), "--data", str(data)], out, inp)
    if command == "evolve":
        doc = {
            "strategy": "evolver",
            "models": [str(m) for m in ms[1:]],
            "base_model": str(ms[0]),
            "evaluator": {"tasks": ["reverse"], "n": 2},
            "evolver": {"generations": 1},
        }
        search = inp / "search.yaml"
        write_text(search, dump_text(mutate_tree(doc, r), r))
        where = out if r.random() < 0.8 else ms[0]
        return Case(["evolve", str(search), str(where), "--workers", "1", "--quiet"], out, inp)
    # zip / align
    if r.random() < 0.5:
        damage_a_model()
    if command == "zip":
        return Case(["zip", str(ms[0]), str(ms[1]), str(out), "--match", "weights"], out, inp)
    return Case(["align", str(ms[0]), str(ms[1]), str(out)], out, inp)


# -- judging ---------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> content digest (or kind) of everything under ``folder``, without following
    links or opening special files.
    """
    out: dict[str, str] = {}
    for p in sorted(folder.rglob("*")):
        try:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "dir" if p.is_dir() else "special"
        except OSError:
            out[str(p)] = "unreadable"
    return out


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout


def run_case(
    case: Case, root: Path, case_root: Path, tally: Tally, main: Callable[[list[str]], int]
) -> None:
    """Run one case and add its outcome to ``tally``; ``root`` is the working directory."""
    before, top = snapshot(case_root), set(os.listdir(root))
    if os.environ.get("FUZZ_TRACE"):
        sys.__stderr__.write(f"case: {' '.join(a[:100] for a in case.argv)}\n")
    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(LIMIT_S)
    rc: int | None = None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(case.argv)
    except _Timeout:
        rc = None
    except SystemExit as e:  # argparse usage errors
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException as e:
        rc = -1
        err.write(f"Traceback (escaped main): {type(e).__name__}: {e}\n")
        if os.environ.get("FUZZ_TRACE"):
            import traceback

            sys.__stderr__.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    text = err.getvalue()
    name = case.argv[0]
    tally.cases += 1
    tally.by_command[name] += 1

    def fail(kind: str) -> None:
        setattr(tally, kind, getattr(tally, kind) + 1)
        tally.failures.append(
            f"{kind}: {' '.join(a[:80] for a in case.argv)} -> rc={rc}: {text[:400]}"
        )

    if rc is None:
        fail("hangs")
        return
    if "Traceback" in text or rc not in (0, 1, 2):
        fail("internal" if rc == 70 else "tracebacks")
    elif rc == 1:
        lines = [ln for ln in text.splitlines() if ln.startswith("merganser: error: ")]
        if len(lines) != 1:
            fail("tracebacks")
        else:
            tally.refused += 1
    else:
        tally.ok += 1
        if name == "merge" and case.out is not None and case.out.is_dir():
            from safetensors.torch import load_file

            for f in case.out.glob("*.safetensors"):
                if any(
                    t.is_floating_point() and not bool(torch.isfinite(t).all())
                    for t in load_file(str(f)).values()
                ):
                    fail("nonfinite")
                    break
    after = snapshot(case_root)
    allowed = str(case.out) if case.out is not None else None
    if set(os.listdir(root)) - top:
        fail("outside_writes")
    for p in set(after) - set(before):
        if allowed is None or not (p == allowed or p.startswith(allowed + os.sep)):
            fail("outside_writes")
            break
    for p, digest in before.items():
        if p.startswith(str(case.inputs)) and after.get(p) != digest:
            fail("inputs_changed")
            break


def fuzz(cases: int, seed: int, root: Path) -> Tally:
    """Run ``cases`` cases drawn from ``seed``, spread over every subcommand."""
    from merganser.cli import main

    r = random.Random(seed)
    tally = Tally()
    cwd = os.getcwd()
    os.chdir(root)  # a command that writes into the working directory is caught too
    try:
        for i in range(cases):
            command = SUBCOMMANDS[i % len(SUBCOMMANDS)]
            case_root = root / f"case{i}"
            case = make_case(case_root, r, command)
            run_case(case, root, case_root, tally, main)
            shutil.rmtree(case_root, ignore_errors=True)
    finally:
        os.chdir(cwd)
    return tally


if __name__ == "__main__":
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    with tempfile.TemporaryDirectory() as d:
        t = fuzz(n, seed, Path(d))
    print(t.line())
    print("by command:", dict(t.by_command))
    for f in t.failures[:30]:
        print(" ", f)
    sys.exit(1 if t.bad else 0)
