"""`merganser zoo build`: a tiny pretrained Llama and one fine-tuned expert per task, on CPU."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merganser.evaluation.zoo.tasks import EXPERT_TASKS, PRETRAIN_TASKS
from merganser.evaluation.zoo.tokenizer import BOS, EOS, PAD, CharTokenizer
from merganser.evaluation.zoo.train import train
from merganser.storage.writer import publish

ZOO_VERSION = 3


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo's weights; a changed spec rebuilds it."""

    seed: int = 0
    experts: tuple[str, ...] = ("reverse", "sort", "add", "shift")
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    base_steps: int = 1200
    expert_steps: int = 150
    batch: int = 64
    base_lr: float = 2e-3
    expert_lr: float = 1e-4
    pretrain: tuple[str, ...] = field(default=tuple(PRETRAIN_TASKS))

    @classmethod
    def reduced(cls, seed: int = 0) -> ZooSpec:
        """A small, fast zoo for tests (well under a minute on two cores)."""
        return cls(
            seed=seed,
            experts=("reverse", "add"),
            hidden=64,
            layers=2,
            intermediate=128,
            base_steps=200,
            expert_steps=80,
            batch=32,
        )


def _config(spec: ZooSpec, vocab: int):  # -> LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-5,
    )


def _save(model: torch.nn.Module, folder: Path, tok: CharTokenizer) -> None:
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(tmp)
    publish(tmp, folder)


def build_zoo(
    root: str | Path,
    spec: ZooSpec | None = None,
    threads: int = 1,
    verbose: bool = True,
    device: str = "cpu",
) -> dict[str, Path]:
    """Build (or reuse) the zoo under ``root``; returns ``{"base": path, task: path, ...}``.

    ``device`` only changes speed: weights trained on a GPU differ from the CPU's in rounding.
    """
    from transformers import LlamaForCausalLM

    spec = spec or ZooSpec()
    root = Path(root)
    paths = {"base": root / "base", **{t: root / f"expert_{t}" for t in spec.experts}}
    marker = root / "zoo.json"
    want = {"version": ZOO_VERSION, **asdict(spec)}
    want = json.loads(json.dumps(want))  # tuples as lists, as read back
    if (
        marker.exists()
        and json.loads(marker.read_text()) == want
        and all((p / "model.safetensors").exists() for p in paths.values())
    ):
        return paths

    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker.unlink(missing_ok=True)
        tok = CharTokenizer()
        torch.manual_seed(spec.seed)
        base = LlamaForCausalLM(_config(spec, len(tok)))
        t0 = time.perf_counter()
        say(f"zoo: pretraining the base on {', '.join(spec.pretrain)} ({spec.base_steps} steps)")
        train(
            base,
            [PRETRAIN_TASKS[t] for t in spec.pretrain],
            spec.base_steps,
            spec.base_lr,
            spec.batch,
            spec.seed,
            device=device,
        )
        _save(base, paths["base"], tok)
        for i, task in enumerate(spec.experts):
            say(f"zoo: fine-tuning expert {task!r} ({spec.expert_steps} steps)")
            expert = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
            train(
                expert,
                [EXPERT_TASKS[task]],
                spec.expert_steps,
                spec.expert_lr,
                spec.batch,
                spec.seed * 1000 + i + 1,
                device=device,
            )
            _save(expert, paths[task], tok)
        marker.write_text(json.dumps(want, indent=2))
        say(f"zoo: built in {time.perf_counter() - t0:.0f} s under {root}")
        return paths
    finally:
        torch.set_num_threads(old)
