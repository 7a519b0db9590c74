"""Runs in mergekit's own venv (no merganser import): merge each CONFIG.yaml into OUT.

python mergekit_driver.py [--keep-going] CONFIG OUT [CONFIG OUT ...]
"""

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
                cfg = MergeConfiguration.model_validate(yaml.safe_load(f))
            opts = MergeOptions(
                copy_tokenizer=False,
                lazy_unpickle=False,
                random_seed=0,
                write_model_card=False,
                quiet=True,
            )
            run_merge(cfg, out, options=opts)
        except Exception as e:
            if not keep_going:
                raise
            with open(out + ".error", "w") as f:
                f.write(f"{type(e).__name__}: {str(e).strip().splitlines()[:1]}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
