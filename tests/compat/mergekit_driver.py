"""Runs in mergekit's own venv (no merganser import): merge each CONFIG.yaml into OUT.

python mergekit_driver.py [--keep-going] CONFIG OUT [CONFIG OUT ...]

A multi-document CONFIG runs through mergekit's own ``mergekit-multi``, from the config's
folder with ``--intermediate-dir ./intermediates`` (as published cards that refer to
``./intermediates/NAME`` ran it).
"""

import os
import subprocess
import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def main(args: list[str]) -> None:
    # --keep-going: a config mergekit cannot run leaves OUT.error (its exception) and the
    # others still run; without it the first failure stops the driver.
    keep_going = args[:1] == ["--keep-going"]
    args = args[1:] if keep_going else args
    for cfg_path, out in zip(args[::2], args[1::2], strict=True):
        try:
            with open(cfg_path) as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
            if len(docs) > 1:
                _multi(cfg_path, out)
                continue
            cfg = MergeConfiguration.model_validate(docs[0])
            opts = MergeOptions(
                copy_tokenizer=False,
                lazy_unpickle=False,
                random_seed=0,
                write_model_card=False,
                quiet=True,
                # BASE+ADAPTER references: mergekit applies the LoRA into this folder first.
                lora_merge_cache=out + ".lora-cache",
            )
            run_merge(cfg, out, options=opts)
        except Exception as e:
            if not keep_going:
                raise
            with open(out + ".error", "w") as f:
                f.write(f"{type(e).__name__}: {str(e).strip().splitlines()[:1]}\n")


def _multi(cfg_path: str, out: str) -> None:
    tool = os.path.join(os.path.dirname(sys.executable), "mergekit-multi")
    args = [tool, os.path.abspath(cfg_path), "--out-path", os.path.abspath(out)]
    args += ["--intermediate-dir", "./intermediates", "--random-seed", "0", "--quiet"]
    args += ["--no-copy-tokenizer", "--no-write-model-card"]
    r = subprocess.run(args, cwd=os.path.dirname(os.path.abspath(cfg_path)),
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["mergekit-multi failed"])[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
