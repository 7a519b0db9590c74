"""Evaluation: per-task exact-match accuracy (greedy decoding) and answer loss.

An evaluator is any callable ``(LoadedModel) -> {task: Score}``. Built in: the zoo's tasks
(``zoo_evaluator``) and JSONL files of ``{"prompt": ..., "answer": ...}`` (``jsonl_evaluator``).
"""

from __future__ import annotations

import inspect
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.model import hf
from merganser.storage import safejson
from merganser.storage.inputs import read_text


@dataclass(frozen=True)
class Score:
    accuracy: float
    loss: float
    n: int


@dataclass
class LoadedModel:
    """A causal LM and its tokenizer, ready to answer prompts."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers tokenizer
    name: str = "model"
    routes: dict[str, str] | None = None  # multi-head models: task -> head name

    def for_task(self, task: str) -> LoadedModel:
        """The model that answers ``task``: itself, or a multi-head model's head for it."""
        if self.routes is None:
            return self
        head = self.routes.get(task, task)
        if head not in self.model.heads:
            raise MerganserError(
                f"{self.name}: no head for task {task!r} (heads: {', '.join(self.model.heads)})"
            )
        return LoadedModel(self.model.heads[head], self.tokenizer, f"{self.name}/{head}")

    @property
    def bos(self) -> list[int]:
        b = self.tokenizer.bos_token_id
        return [] if b is None else [b]

    @property
    def eos(self) -> int:
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")


Evaluator = Callable[[LoadedModel], dict[str, Score]]


def pad_batches(
    seqs: Sequence[Sequence[int]], pad: int, size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token sequences in batches of ``size``, right-padded: ``(input_ids, attention_mask)``."""
    out = []
    for i in range(0, len(seqs), size):
        chunk = seqs[i : i + size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out.append((ids, mask))
    return out


def _require_causal_lm(p: Path) -> None:
    """One line unless the folder's class is a causal LM: evaluation and calibration run
    next-token prediction (a BERT, T5 or CLIP folder would be loaded into a head it does not
    have, and fail deep inside).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        archs = safejson.loads((p / "config.json").read_bytes()).get("architectures") or []
    except (ValueError, AttributeError, OSError):
        return  # the loader reports a config it cannot read
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs and not any(a in causal for a in archs):
        raise MerganserError(
            f"{p}: a {archs[0]}; evaluation and calibration run causal language models only "
            "(next-token prediction)"
        )


def is_causal_lm_folder(path: str | os.PathLike[str]) -> bool:
    """Whether a model folder's config names a causal LM class (or a multi-head zip of them)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from merganser.model.multihead import is_multihead

    p = Path(path)
    if is_multihead(p):
        return True
    try:
        archs = safejson.loads((p / "config.json").read_bytes()).get("architectures") or []
    except (ValueError, AttributeError, OSError):
        return True  # the causal loader reports a config it cannot read
    return any(a in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()) for a in archs)


def load_network(path: str | os.PathLike[str]) -> tuple[torch.nn.Module, Any]:
    """Any Hugging Face model folder as the class its config names, in float32, and its
    tokenizer (None without tokenizer files). Remote code is never run: a class transformers
    does not ship is one line."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MerganserError(f"{p}: not a model folder (no config.json)")
    config = hf.load(p, "the config", lambda: transformers.AutoConfig.from_pretrained(p))
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else transformers.AutoModel
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise MerganserError(
            f"{p}: config.json names {archs[0]!r}, which transformers does not ship "
            "(merganser never runs a model's remote code)"
        )
    kwargs: dict[str, Any] = {}
    if "add_pooling_layer" in inspect.signature(cls.__init__).parameters:
        # A base encoder saved without its pooler (a backbone): do not make a random one.
        from merganser.storage.checkpoint import Checkpoint

        with Checkpoint(p) as ckpt:
            kwargs["add_pooling_layer"] = any(".pooler." in f".{k}" for k in ckpt)
    net, info = hf.load(
        p,
        "the model",
        lambda: cls.from_pretrained(p, dtype=torch.float32, output_loading_info=True, **kwargs),
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        what = archs[0] if archs else "the model"
        more = ", ..." if len(missing) > 3 else ""
        raise MerganserError(
            f"{p}: the checkpoint lacks {len(missing)} tensor(s) {what} needs "
            f"({', '.join(missing[:3])}{more}); transformers would fill them with random values"
        )
    net.eval()
    tok = None
    if any((p / f).is_file() for f in hf.TOKENIZER_MARKERS):
        tok = hf.load(p, "the tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(p))
    return net, tok


def load_model(path: str | os.PathLike[str], threads: int | None = None) -> LoadedModel:
    """Load a Hugging Face causal LM folder (and its tokenizer) in float32 for evaluation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()  # its per-load bar drowns merganser's own output
    p = Path(path)
    if not (p / "config.json").is_file():
        raise MerganserError(f"{p}: not a model folder (no config.json)")
    hf.require_tokenizer(p, "evaluation")
    if threads:
        torch.set_num_threads(threads)
    from merganser.model.multihead import is_multihead, load_multihead

    if is_multihead(p):
        multi = hf.load(p, "the model", lambda: load_multihead(p))
        # The tokenizer with the multi-head model's config, not its config.json.
        tok = hf.load(
            p, "the tokenizer", lambda: AutoTokenizer.from_pretrained(p, config=multi.config)
        )
        return LoadedModel(multi, tok, p.name, multi.routes)
    _require_causal_lm(p)
    model = hf.load(
        p, "the model", lambda: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    ).eval()
    return LoadedModel(
        model, hf.load(p, "the tokenizer", lambda: AutoTokenizer.from_pretrained(p)), p.name
    )


@torch.no_grad()
def score_pairs(lm: LoadedModel, pairs: Sequence[tuple[str, str]], batch: int = 256) -> Score:
    """Exact match of greedy answers (stopping at EOS) and mean answer-token loss."""
    by_len: dict[int, list[int]] = defaultdict(list)
    prompts = [[*lm.bos, *lm.encode(p)] for p, _ in pairs]
    answers = [lm.encode(a) for _, a in pairs]
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    correct, total_loss, total_tokens = 0, 0.0, 0
    for _, idx in sorted(by_len.items()):
        for k in range(0, len(idx), batch):
            chunk = idx[k : k + batch]
            ids = torch.tensor([prompts[i] for i in chunk], device=_device(lm))
            max_new = max(len(answers[i]) for i in chunk) + 1
            out = _greedy(lm, ids, max_new)
            for row, i in zip(out, chunk, strict=True):
                correct += row == answers[i]
            # teacher-forced loss on answer + EOS
            seqs = [prompts[i] + answers[i] + [lm.eos] for i in chunk]
            width = max(len(s) for s in seqs)
            pad = lm.tokenizer.pad_token_id or 0
            x = torch.full((len(seqs), width), pad)
            y = torch.full((len(seqs), width), -100)
            m = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, (s, i) in enumerate(zip(seqs, chunk, strict=True)):
                x[r, : len(s)] = torch.tensor(s)
                m[r, : len(s)] = 1
                y[r, len(prompts[i]) : len(s)] = torch.tensor(s[len(prompts[i]) :])
            dev = _device(lm)
            logits = lm.model(input_ids=x.to(dev), attention_mask=m.to(dev)).logits[:, :-1]
            tgt = y[:, 1:].to(dev)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                tgt.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total_loss += float(nll)
            total_tokens += int((tgt != -100).sum())
    return Score(correct / max(1, len(pairs)), total_loss / max(1, total_tokens), len(pairs))


def _device(lm: LoadedModel) -> torch.device:
    """Where the model's weights are (a model with none, such as a test oracle: the CPU)."""
    p = next(iter(lm.model.parameters()), None) if hasattr(lm.model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _greedy(lm: LoadedModel, ids: torch.Tensor, max_new: int) -> list[list[int]]:
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    outs: list[list[int]] = [[] for _ in range(ids.shape[0])]
    for _ in range(max_new):
        nxt = lm.model(input_ids=ids).logits[:, -1].argmax(-1)
        for r in range(ids.shape[0]):
            if not done[r]:
                if int(nxt[r]) == lm.eos:
                    done[r] = True
                else:
                    outs[r].append(int(nxt[r]))
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return outs


def zoo_evaluator(
    tasks: Sequence[str], split: str = "test", n: int = 200, seed: int = 0
) -> Evaluator:
    """The zoo's synthetic tasks on a fixed split (``dev`` for selection, ``test`` to report)."""
    from merganser.evaluation.zoo.tasks import get_task

    if split not in ("train", "dev", "test"):
        raise MerganserError(f"--split: expected dev or test, got {split!r}")
    sets = {t: get_task(t).examples(split, n, seed) for t in tasks}
    return lambda lm: {t: score_pairs(lm.for_task(t), pairs) for t, pairs in sets.items()}


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[str, Any]]:
    """``(where, object)`` for each non-blank line of a JSONL file; ``where`` is ``file:line``."""
    p = Path(path)
    lines = read_text(p, "JSONL file").splitlines()
    out = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((f"{p}:{no}", safejson.loads(line)))
        except ValueError as e:
            raise MerganserError(f"{p}:{no}: {e}") from None
    return out


def jsonl_evaluator(path: str | os.PathLike[str]) -> Evaluator:
    """Users' own data: one ``{"prompt", "answer"[, "task"]}`` object per line."""
    p = Path(path)
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for where, obj in read_jsonl(p):
        if not (
            isinstance(obj, dict)
            and isinstance(obj.get("prompt"), str)
            and isinstance(obj.get("answer"), str)
        ):
            raise MerganserError(f"{where}: expected an object with string 'prompt' and 'answer'")
        groups[str(obj.get("task", p.stem))].append((obj["prompt"], obj["answer"]))
    if not groups:
        raise MerganserError(f"{p}: no examples")
    return lambda lm: {t: score_pairs(lm.for_task(t), pairs) for t, pairs in groups.items()}


def evaluate(
    model: LoadedModel | str | os.PathLike[str], evaluators: Sequence[Evaluator]
) -> dict[str, Score]:
    """Run every evaluator on one model and merge their per-task scores."""
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    scores: dict[str, Score] = {}
    for ev in evaluators:
        scores.update(ev(lm))
    return scores


def scores_to_json(scores: dict[str, Score]) -> dict[str, Any]:
    return {t: asdict(s) for t, s in scores.items()}
