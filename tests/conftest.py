from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

# Tests never touch the network: huggingface_hub and transformers read this at import, and
# merganser's hub ids then resolve from the cache alone (subprocesses inherit it).
os.environ["HF_HUB_OFFLINE"] = "1"
# The measured default thread count (pipeline/threads.py) is kept here, not in the user's cache.
os.environ["MERGANSER_CACHE"] = tempfile.mkdtemp(prefix="merganser-test-cache-")

REPO = Path(__file__).resolve().parents[1]


def venv_python(env: str, venv: str, module: str) -> str | None:
    """The interpreter of a comparison tool's own venv (``$ENV`` or ``REPO/venv``) that can
    import ``module``, or None."""
    for cand in (os.environ.get(env), str(REPO / venv / "bin/python")):
        probe = [cand, "-c", f"import {module}"]
        if (
            cand
            and Path(cand).is_file()
            and subprocess.run(probe, capture_output=True).returncode == 0
        ):
            return cand
    return None


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A minimal Hugging Face style folder: model.safetensors (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_models(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], count: int, seed: int, prefix: str = "t"
) -> list[Path]:
    """``count`` model folders (``prefix``0, 1, ...) of random bf16 tensors of ``shapes``, drawn
    in order from one generator seeded with ``seed``.
    """
    g = torch.Generator().manual_seed(seed)
    return [
        write_model(
            tmp_path / f"{prefix}{k}",
            {n: torch.randn(*s, generator=g).to(torch.bfloat16) for n, s in shapes.items()},
        )
        for k in range(count)
    ]


def ties_recipe(
    tmp_path: Path, shapes: dict[str, tuple[int, ...]], seed: int, **params: object
) -> dict:
    """TIES (density 0.5) over a base and two experts of random bf16 tensors of ``shapes``."""
    paths = random_models(tmp_path, shapes, 3, seed)
    return {
        "merge_method": "ties",
        "base_model": str(paths[0]),
        "models": [{"model": str(p)} for p in paths[1:]],
        "parameters": {"density": 0.5, **params},
    }


def write_tokenizer(
    folder: Path, words: list[str], chat_template: str | None = None, **special: str
) -> Path:
    """A real (word-level) fast tokenizer saved with transformers into ``folder``: ids in the
    order of ``words``, split on whitespace; ``special`` names special tokens (``bos_token``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0], **special)
    if chat_template is not None:
        fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return folder


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a merged folder (single or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def evict_or_skip(path: Path) -> None:
    """Drop ``path`` from the page cache, or skip where that cannot be done or seen."""
    from merganser.storage import pagecache

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if pagecache.resident(fd, 0, path.stat().st_size) is not False:
            pytest.skip("cannot tell (or cannot drop) what the page cache holds here")
    finally:
        os.close(fd)


class CliRun:
    """What an in-process CLI call returned and printed (as a CompletedProcess)."""

    def __init__(self, rc: int, out: str, err: str) -> None:
        self.returncode, self.stdout, self.stderr = rc, out, err


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> CliRun:
    """The CLI in this process (no interpreter start-up per call), output captured; calibrate
    keeps this process's torch threads."""
    from merganser.cli import main

    capsys.readouterr()
    if args[0] == "calibrate":
        args = (*args, "--threads", str(torch.get_num_threads()))
    rc = main(list(args))
    got = capsys.readouterr()
    return CliRun(rc, got.out, got.err)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "merganser.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """base + 2 experts, float32, written with transformers (real Llama folders)."""
    from merganser.evaluation.tiny import build_family

    root = tmp_path_factory.mktemp("family")
    return build_family(root, experts=2, seed=1, dtype=torch.float32)


@pytest.fixture(scope="session")
def reduced_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reduced zoo (seed 0) laid out as the demo expects: ROOT/zoo/seed0."""
    from merganser.evaluation.zoo import ZooSpec, build_zoo

    root = tmp_path_factory.mktemp("demo")
    build_zoo(root / "zoo" / "seed0", ZooSpec.reduced(0), verbose=False)
    return root
