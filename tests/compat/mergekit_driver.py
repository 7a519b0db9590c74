"""Runs in mergekit's own venv (no merganser import): merge each CONFIG.yaml into OUT.

python mergekit_driver.py CONFIG OUT [CONFIG OUT ...]
"""

import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import MergeOptions, run_merge


def main(args: list[str]) -> None:
    for cfg_path, out in zip(args[::2], args[1::2], strict=True):
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


if __name__ == "__main__":
    main(sys.argv[1:])
