"""merganser vs mergekit 0.1.5 vs this machine's I/O floor, side by side in one run.

Generates Llama-shaped bf16 checkpoints locally (base + 3 experts, ~125M and ~1B parameters,
cached under bench_out/), runs the same YAML recipes through both tools (each in its own venv,
each with its defaults), repeats each run and reports medians of wall time, CPU time and peak
RSS, and the ratios. The floor is a sequential read of the same input files plus a dd-style
write of the output's size, each measured here in the same run; a second floor writes with
O_DIRECT into reserved blocks, as merganser does.

    python bench/compare.py [--sizes 125m,1b] [--repeats 3] [--methods linear,ties,...]
                            [--cold]    # evict the inputs from the page cache before each run
                            [--devices cpu,cuda]  # merganser on each, side by side
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama import llama_shapes, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "bench_out"
MERGEKIT = REPO / ".venv-mergekit" / "bin" / "mergekit-yaml"
SIZES = {  # hidden, intermediate, layers
    "125m": (768, 2048, 12),
    "1b": (2048, 5632, 16),
}
RECIPES = {
    "linear": {"merge_method": "linear", "all": True},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"density": 0.5}},
    "slerp": {"merge_method": "slerp", "parameters": {"t": 0.5}, "pair": True},
}
WRAPPER = (
    "import resource,subprocess,sys,time;t=time.perf_counter();"
    "r=subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.PIPE);"
    "w=time.perf_counter()-t;u=resource.getrusage(resource.RUSAGE_CHILDREN);"
    "print(w,u.ru_utime+u.ru_stime,u.ru_maxrss*1024);"
    "sys.stderr.write(r.stderr.decode()[-2000:]);sys.exit(r.returncode)"
)


def make_family(size: str) -> Path:
    from transformers import LlamaConfig

    hidden, inter, layers = SIZES[size]
    root = ROOT / f"llama_{size}"
    members = ["base", "e1", "e2", "e3"]
    if all((root / m / "model.safetensors").exists() for m in members):
        return root  # cached: the base alone would take 4 GB of float32 to draw again
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        tie_word_embeddings=False,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    shapes = llama_shapes(hidden, inter, layers, 32000)
    base_gen = torch.Generator().manual_seed(0)
    base = {k: torch.empty(s).uniform_(-0.05, 0.05, generator=base_gen) for k, s in shapes.items()}
    for i, m in enumerate(members):
        d = root / m
        if (d / "model.safetensors").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i + 1)
        tensors = {
            k: (v if i == 0 else v + torch.empty(v.shape).uniform_(-0.005, 0.005, generator=g)).to(
                torch.bfloat16
            )
            for k, v in base.items()
        }
        cfg.to_json_file(str(d / "config.json"))
        save_checkpoint(tensors, d)
        del tensors
    return root


def recipe_for(name: str, root: Path) -> dict:
    spec = dict(RECIPES[name])
    all_models, pair = spec.pop("all", False), spec.pop("pair", False)
    experts = ["e1"] if pair else ["e1", "e2", "e3"]
    models = [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in experts]
    if all_models:
        return {
            **spec,
            "models": [{"model": str(root / "base"), "parameters": {"weight": 1.0}}, *models],
        }
    if pair:
        models = [{"model": str(root / "base")}, {"model": str(root / "e1")}]
        return {**spec, "base_model": str(root / "base"), "models": models, "dtype": "bfloat16"}
    return {**spec, "base_model": str(root / "base"), "models": models, "dtype": "bfloat16"}


def timed(cmd: list[str]) -> tuple[float, float, int]:
    r = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[:3])}...\n{r.stderr[-2000:]}")
    wall, cpu, rss = r.stdout.split()
    return float(wall), float(cpu), int(rss)


def floor(used: list[Path], out_bytes: int, cold: bool) -> tuple[float, float, float | None]:
    """Seconds to read ``used`` (evicted first when ``cold``), to write ``out_bytes`` dd-style,
    and to write them with O_DIRECT (None where there is none).
    """
    if cold:
        evict(used)
    read_s = warm(used)
    path = ROOT / "floor.bin"
    return read_s, write_floor(out_bytes, path), direct_write_floor(out_bytes, path)


def evict(files: list[Path]) -> None:
    """Drop ``files`` from the page cache (posix_fadvise DONTNEED: no root needed)."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> float:
    """Sequential read of ``files`` (16 MiB reads); returns seconds."""
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t


def write_floor(nbytes: int, path: Path) -> float:
    """dd-style: sequential 16 MiB writes through the page cache, then fsync; returns seconds."""
    block = bytes(16 << 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    path.unlink()
    return dt


def direct_write_floor(nbytes: int, path: Path) -> float | None:
    """The write merganser does: blocks reserved up front, 16 MiB O_DIRECT writes (no
    page-cache copy), then fsync; None where the file system has no O_DIRECT.
    """
    if not hasattr(os, "O_DIRECT"):
        return None
    block = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    aligned = nbytes // 4096 * 4096
    t = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
    except OSError:
        path.unlink(missing_ok=True)
        return None
    try:
        os.posix_fallocate(fd, 0, aligned)
        for off in range(0, aligned, len(block)):
            os.pwrite(fd, memoryview(block)[: min(len(block), aligned - off)], off)
        os.fsync(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
        path.unlink()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="125m,1b")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(RECIPES))
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--devices", default="cpu", help="merganser's --device, each run in turn")
    a = ap.parse_args()
    # The CPU run is always there: the other devices' times are read as ratios to it.
    devices = ["cpu", *(d for d in a.devices.split(",") if d != "cpu")]
    # Without the project's venv (a GPU machine with its own torch), run the source tree.
    exe = REPO / ".venv/bin/merganser"
    merganser = [str(exe)] if exe.exists() else [sys.executable, "-m", "merganser.cli"]
    have_mk = MERGEKIT.exists() and not a.no_mergekit
    if not have_mk and not a.no_mergekit:
        print(
            "mergekit 0.1.5 not found: run `make mergekit-venv` (comparing against the floor only)"
        )
    results = []
    for size in a.sizes.split(","):
        root = make_family(size)
        for name in a.methods.split(","):
            recipe = recipe_for(name, root)
            rpath = ROOT / f"{size}_{name}.yaml"
            rpath.write_text(json.dumps(recipe))
            used = [Path(m["model"]) / "model.safetensors" for m in recipe["models"]]
            if "base_model" in recipe:
                used = sorted({*used, Path(recipe["base_model"]) / "model.safetensors"})
            in_bytes = sum(p.stat().st_size for p in used)
            out_bytes = used[0].stat().st_size
            # Each tool's row key and merganser's device (None: mergekit).
            tools: dict[str, str | None] = {tool_name(d): d for d in devices}
            if have_mk:
                tools["mergekit"] = None
            runs: dict[str, list[tuple[float, float, int]]] = {t: [] for t in tools}
            floors = []
            for rep in range(a.repeats):
                # Cold, a read runs faster right after another read of the same files (the
                # host's cache) and slower after writes: every other repeat measures the floor
                # before the tools rather than after them, so neither side always has the
                # better spot.
                floor_first = a.cold and rep % 2 == 1
                if floor_first:
                    floors.append(floor(used, out_bytes, a.cold))
                for tool, device in tools.items():
                    out = ROOT / f"out_{tool}"
                    # Neither tool is timed deleting the previous run's output.
                    subprocess.run(["rm", "-rf", str(out)])
                    if a.cold:
                        evict(used)
                    else:
                        warm(used)
                    if device is not None:
                        cmd = [*merganser, "merge", str(rpath), str(out), "--force"]
                        cmd += ["--no-progress", "--device", device]
                    else:
                        cmd = [
                            str(MERGEKIT),
                            str(rpath),
                            str(out),
                            "--no-copy-tokenizer",
                            "--quiet",
                            "--random-seed",
                            "0",
                        ]
                    runs[tool].append(timed(cmd))
                if not floor_first:
                    floors.append(floor(used, out_bytes, a.cold))
            row = {
                "size": size,
                "method": name,
                "input_GB": in_bytes / 1e9,
                "cache": "cold" if a.cold else "warm",
                "read_s": statistics.median(f[0] for f in floors),
                "floor_s": statistics.median(f[0] + f[1] for f in floors),
            }
            if all(f[2] is not None for f in floors):
                row["direct_floor_s"] = statistics.median(f[0] + f[2] for f in floors)
            for tool, rs in runs.items():
                if rs:
                    row[f"{tool}_wall_s"] = statistics.median(r[0] for r in rs)
                    row[f"{tool}_cpu_s"] = statistics.median(r[1] for r in rs)
                    row[f"{tool}_rss_GB"] = statistics.median(r[2] for r in rs) / 2**30
            results.append(row)
            _print_row(row)
    raw = ROOT / ("compare_cold.json" if a.cold else "compare.json")
    raw.write_text(json.dumps(results, indent=2))
    print(f"\nraw figures: {raw}")
    return 0


def tool_name(device: str) -> str:
    """The row's key for merganser on ``device``: the CPU run keeps the plain name."""
    return "merganser" if device == "cpu" else f"merganser_{device.replace(':', '')}"


def _print_row(r: dict) -> None:
    mg = (
        f"{r['merganser_wall_s']:.1f}s cpu {r['merganser_cpu_s']:.1f}s "
        f"rss {r['merganser_rss_GB']:.2f}G"
    )
    line = f"{r['size']:>5} {r['method']:<16} in {r['input_GB']:.2f}GB | merganser {mg}"
    if "mergekit_wall_s" in r:
        line += (
            f" | mergekit {r['mergekit_wall_s']:.1f}s cpu {r['mergekit_cpu_s']:.1f}s "
            f"rss {r['mergekit_rss_GB']:.2f}G | wall ratio "
            f"{r['merganser_wall_s'] / r['mergekit_wall_s']:.2f}x, rss ratio "
            f"{r['merganser_rss_GB'] / r['mergekit_rss_GB']:.2f}x"
        )
    for k in r:
        if k.startswith("merganser_") and k.endswith("_wall_s") and k != "merganser_wall_s":
            tool = k.removesuffix("_wall_s")
            line += (
                f" | {tool} {r[k]:.1f}s cpu {r[tool + '_cpu_s']:.1f}s rss "
                f"{r[tool + '_rss_GB']:.2f}G, /cpu {r[k] / r['merganser_wall_s']:.2f}x"
            )
    line += (
        f" | floor {r['floor_s']:.1f}s, merganser/floor {r['merganser_wall_s'] / r['floor_s']:.2f}x"
    )
    if "direct_floor_s" in r:
        line += (
            f" | O_DIRECT floor {r['direct_floor_s']:.1f}s, "
            f"merganser/it {r['merganser_wall_s'] / r['direct_floor_s']:.2f}x"
        )
    if r["cache"] == "cold":
        seq = r["input_GB"] / r["read_s"]
        eff = r["input_GB"] / r["merganser_wall_s"]
        line += (
            f" | cold read {seq * 1e3:.0f} MB/s, merganser {eff * 1e3:.0f} MB/s ({eff / seq:.0%})"
        )
        if "direct_floor_s" in r:
            # Reads and writes share this disk's bandwidth (together they move about what a
            # read alone does), so the output costs its O_DIRECT write time whenever it is
            # written: charge it, and rate what is left of the wall time as reading.
            write_s = r["direct_floor_s"] - r["read_s"]
            net = r["input_GB"] / max(r["merganser_wall_s"] - write_s, 1e-9)
            line += f", net of the output's write {net * 1e3:.0f} MB/s ({net / seq:.0%})"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
