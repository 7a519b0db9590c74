"""Recipes published on model cards and in guides (tests/compat/corpus, each with its source)
run unchanged against tiny local models of their families: only the model references are
rewritten to local folders. In float32 their outputs match mergekit 0.1.5's within 1e-6 for
the deterministic methods (mergekit in its own venv, as in test_mergekit_compat.py); for DARE
and DELLA, whose draws differ by design, both tools must run and agree in shape.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, load_folder, write_tokenizer

import merganser

CORPUS = sorted((REPO / "tests" / "compat" / "corpus").glob("*.yaml"))
STOCHASTIC = {
    "dare_ties",
    "dare_linear",
    "della",
    "della_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
}
# Configs mergekit 0.1.5 itself cannot run (none so far); each must fail there.
MERGEKIT_CANNOT: dict[str, str] = {}
_REF = re.compile(r"^(\s*-?\s*(?:model|base_model|tokenizer_source):\s*)(\S.*?)(\s+#.*)?$")
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _header(path: Path, key: str, default: str) -> str:
    m = re.search(rf"^# {key}: (\S+)", path.read_text(), flags=re.M)
    return m.group(1) if m else default


def _refs(data: dict) -> list[str]:
    """Every model reference of a recipe (mergekit's fields)."""
    out: list[str] = []

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                named = k in ("model", "base_model") or (
                    k == "tokenizer_source" and x not in ("base", "union")
                )
                if named and isinstance(x, str):
                    out.append(x)
                else:
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(data)
    return list(dict.fromkeys(out))


def _config(family: str, layers: int):
    import transformers as T

    common = {
        "vocab_size": len(WORDS), "hidden_size": 16, "intermediate_size": 32,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": layers,
        "max_position_embeddings": 64, "tie_word_embeddings": False,
    }  # fmt: skip
    cls, arch = {
        "llama": (T.LlamaConfig, "LlamaForCausalLM"),
        "mistral": (T.MistralConfig, "MistralForCausalLM"),
        "qwen2": (T.Qwen2Config, "Qwen2ForCausalLM"),
        "gemma2": (T.Gemma2Config, "Gemma2ForCausalLM"),
    }[family]
    extra = {"head_dim": 8} if family == "gemma2" else {}
    cfg = cls(**common, **extra)
    cfg.architectures = [arch]
    return cfg, getattr(T, arch)


def _models(root: Path, family: str, layers: int, refs: list[str]) -> dict[str, Path]:
    """A tiny random model per reference: the first is a base, the others small changes of it
    (fine-tunes of one base, as the recipes assume), each with a tokenizer and template.
    """
    cfg, cls = _config(family, layers)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}
    for i, ref in enumerate(refs):
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(state[k] + (0.02 * i) * torch.randn(v.shape, generator=g))
        folder = root / f"m{i}"
        model.save_pretrained(folder)
        write_tokenizer(folder, WORDS, chat_template=TEMPLATE, bos_token="<s>", eos_token="</s>")
        out[ref] = folder
    return out


def _rewrite(text: str, local: dict[str, Path], float32: bool) -> str:
    """The recipe's text with each model reference replaced by its local folder (and, for the
    comparison, dtype and out_dtype set to float32); everything else is left as published.
    """
    lines = []
    for line in text.splitlines():
        m = _REF.match(line)
        if m and m.group(2) in local:
            line = f"{m.group(1)}{local[m.group(2)]}{m.group(3) or ''}"
        if float32:
            line = re.sub(r"^(\s*(?:out_)?dtype:\s*)\S+", r"\g<1>float32", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = {}
    for path in CORPUS:
        name = path.stem
        text = path.read_text()
        data = yaml.safe_load(text)
        layers = int(_header(path, "layers", "4"))
        local = _models(
            root / name / "models", _header(path, "family", "llama"), layers, _refs(data)
        )
        for kind, f32 in (("published", False), ("float32", True)):
            (root / name / f"{kind}.yaml").write_text(_rewrite(text, local, f32))
        cases[name] = (root / name, data)
    from test_mergekit_compat import MK_PYTHON

    if MK_PYTHON is not None:
        args = ["--keep-going"]
        for folder, _ in cases.values():
            args += [str(folder / "float32.yaml"), str(folder / "mk")]
        r = subprocess.run(
            [MK_PYTHON, str(REPO / "tests/compat/mergekit_driver.py"), *args],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return cases


def test_the_corpus_is_real_and_varied() -> None:
    """Each config names its source; together they cover the features the issue lists."""
    assert len(CORPUS) >= 13
    texts = [p.read_text() for p in CORPUS]
    assert all(re.search(r"^# source: https?://", t, flags=re.M) for t in texts)
    joined = "\n".join(texts)
    features = ["slices:", "chat_template:", "tokenizer_source:", "int8_mask", "filter:"]
    features += [f"merge_method: {m}" for m in ("passthrough", "slerp", "arcee_fusion", "della",
                                                  "dare_ties", "ties", "linear")]  # fmt: skip
    for feature in features:
        assert feature in joined, feature


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_recipe_runs_unchanged(corpus, path) -> None:
    folder, data = corpus[path.stem]
    out = merganser.merge(
        folder / "published.yaml", folder / "ours", merganser.MergeOptions(progress=False)
    )
    tensors = load_folder(out)
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    if data.get("chat_template") == "auto":
        assert (out / "chat_template.jinja").read_text() == TEMPLATE


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_recipe_matches_mergekit_in_float32(corpus, path) -> None:
    from test_mergekit_compat import MK_PYTHON

    if MK_PYTHON is None:
        pytest.skip("mergekit 0.1.5 is not installed: run `make mergekit-venv`")
    folder, data = corpus[path.stem]
    error = folder / "mk.error"
    if path.stem in MERGEKIT_CANNOT:
        assert error.is_file(), f"mergekit now runs {path.stem}"
        return
    assert not error.is_file(), error.read_text() if error.is_file() else ""
    ours = load_folder(merganser.merge(folder / "float32.yaml", folder / "ours32",
                                       merganser.MergeOptions(progress=False)))  # fmt: skip
    theirs = load_folder(folder / "mk")
    assert set(ours) == set(theirs)
    if data["merge_method"] in STOCHASTIC:
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        return
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= 1e-6, worst
