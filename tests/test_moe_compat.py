"""mergekit-moe configs from mergekit's documentation and from published MoE model cards
(tests/compat/moe_corpus, each with its source) run unchanged on tiny local models (only the
model references are rewritten), load as the MoE class, and agree with mergekit-moe 0.1.5 (its
own venv): every tensor but the routers identical; `random` routers identical for the same
seed; `hidden` routers within bfloat16's reach (mergekit runs the base model in bfloat16 to
compute them, merganser in float32: docs/moe.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from conftest import REPO, write_tokenizer

from merganser.pipeline.moe import build_moe

CORPUS = sorted((REPO / "tests" / "compat" / "moe_corpus").glob("*.yaml"))
_REF = re.compile(r"^(\s*-?\s*(?:source_model|base_model):\s*)(\S.*?)(\s+#.*)?$")


def _family(path: Path) -> str:
    m = re.search(r"^# family: (\S+)", path.read_text(), flags=re.M)
    return m.group(1) if m else "llama"


def _words(cfg: dict) -> list[str]:
    """A word-level vocabulary holding every word of the config's prompts."""
    words: dict[str, None] = {}
    for x in cfg["experts"] + (cfg.get("shared_experts") or []):
        for p in (x.get("positive_prompts") or []) + (x.get("negative_prompts") or []):
            words.update(dict.fromkeys(p.split()))
    return ["<unk>", "<s>", "</s>", *sorted(words)]


def _models(root: Path, family: str, refs: list[str], words: list[str]) -> dict[str, Path]:
    cls_cfg, cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM),
                    "mistral": (T.MistralConfig, T.MistralForCausalLM)}[family]  # fmt: skip
    cfg = cls_cfg(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    cfg.architectures = [cls.__name__]
    torch.manual_seed(0)
    base = cls(cfg).to(torch.bfloat16)
    out = {}
    for i, ref in enumerate(refs):
        torch.manual_seed(i + 1)
        model = cls(cfg).to(torch.bfloat16)  # an expert: the base with its own MLPs
        state = {k: v for k, v in base.state_dict().items() if ".mlp." not in k}
        model.load_state_dict(state, strict=False)
        folder = root / f"m{i}"
        (base if i == 0 else model).save_pretrained(folder)
        write_tokenizer(folder, words, bos_token="<s>", eos_token="</s>")
        out[ref] = folder
    return out


def _rewrite(text: str, local: dict[str, Path]) -> str:
    lines = []
    for line in text.splitlines():
        m = _REF.match(line)
        if m and m.group(2) in local:
            line = f"{m.group(1)}{local[m.group(2)]}{m.group(3) or ''}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_mergekit_compat import MK_PYTHON

    root = tmp_path_factory.mktemp("moe_corpus")
    cases = {}
    for path in CORPUS:
        cfg = yaml.safe_load(path.read_text())
        refs = list(
            dict.fromkeys([cfg["base_model"]] + [x["source_model"] for x in cfg["experts"]])
        )
        folder = root / path.stem
        local = _models(folder / "models", _family(path), refs, _words(cfg))
        recipe = folder / "moe.yaml"
        recipe.write_text(_rewrite(path.read_text(), local))
        cases[path.stem] = (folder, cfg)
        if MK_PYTHON is not None:
            tool = Path(MK_PYTHON).parent / "mergekit-moe"
            r = subprocess.run(
                [str(tool), str(recipe), str(folder / "mk"), "--random-seed", "0",
                 "--device", "cpu", "--no-copy-tokenizer", "--no-write-model-card"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr[-2000:]
    return cases


def test_the_moe_corpus_is_real_and_varied() -> None:
    texts = [p.read_text() for p in CORPUS]
    assert len(texts) >= 4
    assert all(re.search(r"^# source: https?://", t, flags=re.M) for t in texts)
    assert sum("mergekit/blob/main/docs/moe.md" in t for t in texts) >= 1
    assert sum("mergekit/blob/main/docs/moe.md" not in t for t in texts) >= 2
    joined = "\n".join(texts)
    for feature in ("gate_mode: random", "gate_mode: hidden", "negative_prompts", "&"):
        assert feature in joined, feature


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_moe_config_runs_and_matches_mergekit_moe(corpus, path) -> None:
    from test_mergekit_compat import MK_PYTHON

    folder, cfg = corpus[path.stem]
    out = build_moe(folder / "moe.yaml", folder / "ours")
    ours, info = T.MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert ours.config.num_local_experts == len(cfg["experts"])
    if MK_PYTHON is None:
        pytest.skip("mergekit 0.1.5 is not installed: run `make mergekit-venv`")
    theirs = T.MixtralForCausalLM.from_pretrained(folder / "mk")
    a, b = ours.state_dict(), theirs.state_dict()
    assert set(a) == set(b)
    routers = {k for k in a if k.endswith("mlp.gate.weight")}
    assert len(routers) == ours.config.num_hidden_layers
    for k in set(a) - routers:
        assert torch.equal(a[k], b[k]), k
    mode = cfg.get("gate_mode", "hidden")
    for k in routers:
        if mode == "random":  # mergekit draws from torch's global generator, seeded here
            assert torch.equal(a[k], b[k]), k
        else:  # unit rows; bfloat16 hidden states (mergekit) vs float32 (merganser)
            cos = torch.nn.functional.cosine_similarity(a[k].float(), b[k].float(), dim=1)
            assert cos.min() > 0.99, (k, cos)
            # and the rows tell the experts apart: each is nearest its own mergekit row
            sim = a[k].float() @ b[k].float().T
            assert torch.equal(sim.argmax(dim=1), torch.arange(sim.shape[0])), (k, sim)
