"""Rank against error, size and task score for `merganser extract-lora` on a zoo expert.

python bench/lora_extract.py ZOO_DIR [--expert reverse] [--ranks 1,2,4,8,16,32,64,128]

Builds each adapter from the expert against the zoo's base, applies it (BASE+ADAPTER, an
identity merge), and scores the result on the expert's task (test split), beside the base and
the expert themselves. Prints a Markdown table (docs/adapters.md has one run of it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import merganser
from merganser.pipeline.extract import extract_lora


def score(model: Path, task: str) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "merganser.cli", "eval", str(model), "--tasks", task,
         "--split", "test", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout)[str(model)][task]["accuracy"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--expert", default="reverse")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64,128")
    a = ap.parse_args()
    base, expert = a.zoo / "base", a.zoo / f"expert_{a.expert}"
    size = sum(f.stat().st_size for f in expert.glob("*.safetensors"))
    rows = [
        ("base", "", "", "", score(base, a.expert)),
        ("expert", "", "", size, score(expert, a.expert)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for r in (int(x) for x in a.ranks.split(",")):
            ad = Path(tmp) / f"r{r}"
            ext = extract_lora(expert, base, ad, rank=r)
            errors = [e for _, e in ext.modules.values()]
            merged = merganser.merge(
                {"merge_method": "linear", "models": [{"model": f"{base}+{ad}"}]},
                Path(tmp) / f"m{r}", merganser.MergeOptions(progress=False),
            )  # fmt: skip
            rows.append((f"LoRA r={r}", max(errors), sum(errors) / len(errors), ext.bytes,
                         score(merged, a.expert)))  # fmt: skip
    print("| model | max rel. error | mean rel. error | size | task score |")
    print("|---|---|---|---|---|")

    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    for name, mx, mean, nbytes, s in rows:
        size_s = f"{nbytes / 2**20:.2f} MiB" if nbytes != "" else ""
        print(f"| {name} | {fmt(mx)} | {fmt(mean)} | {size_s} | {s:.3f} |")


if __name__ == "__main__":
    main()
