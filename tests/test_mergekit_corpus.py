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
# Configs mergekit 0.1.5 itself cannot run; each must fail there (and runs here).
MERGEKIT_CANNOT: dict[str, str] = {
    # One slice whose four sources are four layer ranges of one model (an 8-layer model from a
    # 32-layer one, each layer a weighted mix of four): 0.1.5 refuses the same model twice in
    # a slice; the card was made with an older mergekit. test_one_model_four_ranges checks
    # ours against the formula.
    "14_hx_mistral_linear_slices": "Duplicate merge inputs",
}
# A model reference on a line: mergekit's fields, and a tokenizer block's ``source``.
_REF = re.compile(r"^(\s*-?\s*(?:model|base_model|tokenizer_source|source):\s*)(\S.*?)(\s+#.*)?$")
# Folders of a multi-document recipe's named merges (run with --intermediate-dir ./intermediates,
# as the Velvet-Orchid card did): references to them stay as published.
INTERMEDIATES = "intermediates"
WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _header(path: Path, key: str, default: str) -> str:
    m = re.search(rf"^# {key}: (\S+)", path.read_text(), flags=re.M)
    return m.group(1) if m else default


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _refs(docs: list[dict]) -> list[str]:
    """Every model reference of a recipe's documents (mergekit's fields and a tokenizer block's
    source), a ``BASE+ADAPTER`` reference as its two parts; merge names and intermediate
    folders are not models to build.
    """
    names = {d["name"] for d in docs if "name" in d}
    out: list[str] = []

    def walk(v, parent=""):
        if isinstance(v, dict):
            for k, x in v.items():
                named = k in ("model", "base_model") or (
                    k in ("tokenizer_source", "source")
                    and (k == "tokenizer_source" or parent == "tokenizer")
                    and x not in ("base", "union")
                )
                if named and isinstance(x, str):
                    if x not in names and INTERMEDIATES not in x:
                        out.extend(x.split("+"))
                else:
                    walk(x, k)
        elif isinstance(v, list):
            for x in v:
                walk(x, parent)

    walk(docs)
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


def _models(root: Path, family: str, layers: int, refs: list[str], adapters: set[str]) -> dict:
    """A tiny random model per reference: the first is a base, the others small changes of it
    (fine-tunes of one base, as the recipes assume), each with a tokenizer and template; a
    reference used as an adapter (``BASE+ADAPTER``) is a PEFT LoRA adapter instead.
    """
    import peft

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
        if ref in adapters:
            lc = peft.LoraConfig(
                r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
            )
            torch.manual_seed(i)
            peft.get_peft_model(cls(cfg).eval(), lc).save_pretrained(folder)
        else:
            model.save_pretrained(folder)
            write_tokenizer(
                folder, WORDS, chat_template=TEMPLATE, bos_token="<s>", eos_token="</s>"
            )
        out[ref] = folder
    return out


def _rewrite(text: str, local: dict[str, Path], float32: bool) -> str:
    """The recipe's text with each model reference replaced by its local folder (and, for the
    comparison, dtype and out_dtype set to float32); everything else is left as published.
    """
    lines = []
    for line in text.splitlines():
        m = _REF.match(line)
        parts = m.group(2).split("+") if m else []
        if m and parts and all(p in local for p in parts):
            ref = "+".join(str(local[p]) for p in parts)
            line = f"{m.group(1)}{ref}{m.group(3) or ''}"
        if float32:
            line = re.sub(r"^(\s*(?:out_)?dtype:\s*)\S+", r"\g<1>float32", line)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _options(recipe: Path) -> merganser.MergeOptions:
    # Named merges go where the published recipes refer to them: ./intermediates beside it.
    inter = str(recipe.parent / INTERMEDIATES)
    return merganser.MergeOptions(progress=False, intermediate_dir=inter)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    cases = {}
    for path in CORPUS:
        name = path.stem
        text = path.read_text()
        docs = _docs(path)
        refs = _refs(docs)
        adapters = {r.split("+")[1] for r in re.findall(r"(?<=model: )\S+\+\S+", text)}
        layers = int(_header(path, "layers", "4"))
        family = _header(path, "family", "llama")
        local = _models(root / name / "models", family, layers, refs, adapters)
        # Each run in a folder of its own: ./intermediates is relative to the recipe (and to
        # mergekit's working directory).
        for kind, f32 in (("published", False), ("float32", True), ("mergekit", True)):
            (root / name / kind).mkdir()
            (root / name / kind / "recipe.yaml").write_text(_rewrite(text, local, f32))
        cases[name] = (root / name, docs)
    from test_mergekit_compat import MK_PYTHON

    if MK_PYTHON is not None:
        args = ["--keep-going"]
        for folder, _ in cases.values():
            args += [str(folder / "mergekit" / "recipe.yaml"), str(folder / "mk")]
        r = subprocess.run(
            [MK_PYTHON, str(REPO / "tests/compat/mergekit_driver.py"), *args],
            capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return cases


def test_the_corpus_is_real_and_varied() -> None:
    """Each config names its source; together they cover the features the issue lists."""
    assert len(CORPUS) >= 25
    texts = [p.read_text() for p in CORPUS]
    assert all(re.search(r"^# source: https?://", t, flags=re.M) for t in texts)
    joined = "\n".join(texts)
    features = [
        "slices:",
        "chat_template:",
        "tokenizer_source:",
        "int8_mask",
        "filter:",
        "modules:",
        "\n---\n",
        "tokenizer:\n",
        "normalize: 1.0",
        "+",
        "out_dtype:",
    ]
    methods = ["passthrough", "slerp", "arcee_fusion", "della", "dare_ties", "ties", "linear",
               "sce", "nuslerp", "karcher", "model_stock", "della_linear"]  # fmt: skip
    features += [f"merge_method: {m}" for m in methods]
    for feature in features:
        assert feature in joined, feature


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_recipe_runs_unchanged(corpus, path) -> None:
    folder, docs = corpus[path.stem]
    recipe = folder / "published" / "recipe.yaml"
    out = merganser.merge(recipe, folder / "ours", _options(recipe))
    tensors = load_folder(out)
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors.values())
    if docs[-1].get("chat_template") == "auto":
        assert (out / "chat_template.jinja").read_text() == TEMPLATE


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_published_recipe_matches_mergekit_in_float32(corpus, path) -> None:
    from test_mergekit_compat import MK_PYTHON

    if MK_PYTHON is None:
        pytest.skip("mergekit 0.1.5 is not installed: run `make mergekit-venv`")
    folder, docs = corpus[path.stem]
    error = folder / "mk.error"
    if path.stem in MERGEKIT_CANNOT:
        assert error.is_file(), f"mergekit now runs {path.stem}"
        assert MERGEKIT_CANNOT[path.stem] in error.read_text()
        return
    assert not error.is_file(), error.read_text() if error.is_file() else ""
    recipe = folder / "float32" / "recipe.yaml"
    ours = load_folder(merganser.merge(recipe, folder / "ours32", _options(recipe)))
    theirs = load_folder(folder / "mk")
    assert set(ours) == set(theirs)
    if any(d["merge_method"] in STOCHASTIC for d in docs):
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        return
    worst = max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)
    assert worst <= 1e-6, worst


def test_one_model_four_ranges_is_the_weighted_mix_of_its_layers(corpus) -> None:
    """The HX-Mistral card (which mergekit 0.1.5 refuses): output layer i is the linear mix,
    weights normalised, of input layers i, 8+i, 16+i and 24+i.
    """
    folder, _ = corpus["14_hx_mistral_linear_slices"]
    recipe = folder / "float32" / "recipe.yaml"
    ours = load_folder(merganser.merge(recipe, folder / "mix32", _options(recipe)))
    src = load_folder(folder / "models" / "m0")
    w = [0.33, 0.33, 0.25, 0.09]
    layers = {int(k.split(".")[2]) for k in ours if k.startswith("model.layers.")}
    assert layers == set(range(8))
    for i in range(8):
        for k in [k for k in src if k.startswith("model.layers.0.")]:
            rest = k[len("model.layers.0.") :]
            parts = [src[f"model.layers.{8 * j + i}.{rest}"].float() for j in range(4)]
            want = sum(wj * p for wj, p in zip(w, parts, strict=True)) / sum(w)
            got = ours[f"model.layers.{i}.{rest}"].float()
            assert torch.allclose(got, want, atol=1e-6), (i, rest)
