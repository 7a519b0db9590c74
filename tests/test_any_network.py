"""Data-aware merging on any network: calibration statistics (RegMean Grams, diagonal Fisher)
and the merges that use them on BERT, T5, ViT, GPT-2 (Conv1D) and a plain nn.Module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from conftest import cli, load_folder, run_cli, write_tokenizer
from safetensors.torch import save_file

from merganser.api import merge_tensors
from merganser.evaluation.calibrate import CalibrationOptions, calibrate, calibrate_module
from merganser.evaluation.forward import linear_layers

WORDS = ["[PAD]", "[UNK]", "a", "b", "c", "d", "e", "f"]
TEXTS = ["a b c", "d e", "a a a a b f", "c", "f e d c b"]


def _save(model: torch.nn.Module, folder: Path, arch: str, words: bool = True) -> Path:
    model.config.architectures = [arch]
    model.save_pretrained(folder)
    if words:
        write_tokenizer(folder, WORDS, pad_token="[PAD]")
    return folder


def _experts(make, folder: Path, arch: str, n: int = 2, words: bool = True) -> list[Path]:
    """``n`` models of one architecture: a random one, then copies with small random deltas."""
    torch.manual_seed(0)
    model = make().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    v.copy_(state[k] + 0.05 * torch.randn(v.shape, generator=g))
        out.append(_save(model, folder / f"m{i}", arch, words))
    return out


def stats_recipe(path: Path, method: str, models, stats, **parameters) -> Path:
    """A data-aware recipe: each model with its statistics file."""
    recipe = {
        "merge_method": method,
        "parameters": parameters,
        "models": [
            {"model": str(m), "statistics": str(s)} for m, s in zip(models, stats, strict=True)
        ],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def bert() -> T.BertForSequenceClassification:
    cfg = T.BertConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=32, pad_token_id=0, num_labels=3,
    )  # fmt: skip
    return T.BertForSequenceClassification(cfg)


def t5() -> T.T5ForConditionalGeneration:
    cfg = T.T5Config(
        vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T.T5ForConditionalGeneration(cfg)


def vit() -> T.ViTForImageClassification:
    cfg = T.ViTConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        image_size=16, patch_size=4, num_labels=4,
    )  # fmt: skip
    return T.ViTForImageClassification(cfg)


def gpt2() -> T.GPT2LMHeadModel:
    cfg = T.GPT2Config(
        vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=32,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return T.GPT2LMHeadModel(cfg)


def _reference_grams(net: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Each linear layer's mean input outer product over unpadded rows, by plain hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    current: dict = {}

    def hook(name: str):
        def fn(mod, args):
            x = args[0].detach().double()
            m = current.get("mask")
            keep = None
            for key in ("attention_mask", "decoder_attention_mask"):
                mk = current.get(key)
                if mk is not None and tuple(mk.shape) == tuple(x.shape[:2]) and x.dim() == 3:
                    keep = mk.bool()
                    break
            del m
            seen.setdefault(name, []).append(x[keep] if keep is not None else x.flatten(0, -2))

        return fn

    hs = [m.register_forward_pre_hook(hook(n)) for n, (m, _) in linear_layers(net).items()]
    with torch.no_grad():
        for b in batches:
            current.clear()
            current.update(b)
            net(**b)
    for h in hs:
        h.remove()
    return {n: torch.cat(xs).T @ torch.cat(xs) / torch.cat(xs).shape[0] for n, xs in seen.items()}


def test_bert_texts_calibrate_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reported bug: `calibrate` on a BERT folder with a .txt file died with an internal
    error (it assumed a causal LM with BOS/EOS). Now the Grams are the masked mean outer
    products, the Fisher covers every parameter, and RegMean/Fisher recipes merge and load."""
    m0, m1 = _experts(bert, tmp_path, "BertForSequenceClassification")
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    stats = []
    for m in (m0, m1):
        out = tmp_path / f"{m.name}.stats.safetensors"
        r = cli(
            capsys, "calibrate", str(m), str(out), "--data", str(data), "--fisher", "--batch", "2"
        )
        assert r.returncode == 0, r.stderr
        assert "5 examples" in r.stdout
        stats.append(out)
    net = T.BertForSequenceClassification.from_pretrained(m0).eval()
    tok = T.AutoTokenizer.from_pretrained(m0)
    batches = [dict(tok(TEXTS[i : i + 2], padding=True, return_tensors="pt")) for i in (0, 2, 4)]
    for b in batches:
        b.pop("token_type_ids", None)
    ref = _reference_grams(net, batches)
    got = load_folder_file(stats[0])
    assert {k for k in got if k.startswith("gram.")} == {f"gram.{k}" for k in ref}
    for k, g in ref.items():
        assert torch.allclose(got[f"gram.{k}"].double(), g, atol=1e-6), k
    fisher = {k[7:]: v for k, v in got.items() if k.startswith("fisher.")}
    assert set(fisher) == {n for n, _ in net.named_parameters()}
    assert all((v >= 0).all() and v.isfinite().all() for v in fisher.values())
    assert float(fisher["classifier.weight"].sum()) > 0  # the head's gradient reached
    for method in ("regmean", "fisher"):
        params = {"alpha": 0.9, "ridge": 0.0} if method == "regmean" else {}
        rpath = stats_recipe(tmp_path / f"{method}.yaml", method, (m0, m1), stats, **params)
        r = cli(capsys, "merge", str(rpath), str(tmp_path / method))
        assert r.returncode == 0, r.stderr
        _, info = T.BertForSequenceClassification.from_pretrained(
            tmp_path / method, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"]
    # RegMean's query weight is the closed form on these Grams (α = 0.9 keeps them invertible:
    # 5 short texts give fewer rows than the 32 inputs).
    name = "bert.encoder.layer.1.attention.self.query.weight"
    a, b = (load_folder(m)[name].double() for m in (m0, m1))
    ga, gb = (load_folder_file(s)[f"gram.{name}"].double() for s in stats)
    ga, gb = (0.9 * g + 0.1 * torch.diag(torch.diagonal(g)) for g in (ga, gb))
    want = torch.linalg.solve(ga + gb, ga @ a.T + gb @ b.T).T
    out = load_folder(tmp_path / "regmean")[name]
    assert torch.allclose(out.double(), want, atol=1e-4)


def load_folder_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_t5_grams_cover_encoder_decoder_and_cross_attention(tmp_path: Path) -> None:
    (m0,) = _experts(t5, tmp_path, "T5ForConditionalGeneration", n=1)
    tensors, meta = calibrate(m0, TEXTS, None, CalibrationOptions(fisher=True, batch=2))
    net = T.T5ForConditionalGeneration.from_pretrained(m0).eval()
    names = set(linear_layers(net))
    assert {k[5:] for k in tensors if k.startswith("gram.")} == names
    # Cross-attention keys read the encoder's output: its rows are the unpadded input tokens.
    k = "decoder.block.0.layer.1.EncDecAttention.k.weight"
    assert f"gram.{k}" in tensors and tensors[f"gram.{k}"].shape == (32, 32)
    assert meta["examples"] == "5"
    assert float(tensors["fisher.decoder.block.1.layer.2.DenseReluDense.wo.weight"].sum()) > 0
    # Empirical labels: the reconstruction target the decoder reads shifted.
    _, emp = calibrate(
        m0, TEXTS, None, CalibrationOptions(grams=False, fisher=True, fisher_labels="empirical")
    )
    assert emp["fisher_labels"] == "empirical"


def test_vit_on_input_tensors_and_fisher_merge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m0, m1 = _experts(vit, tmp_path, "ViTForImageClassification", words=False)
    data = tmp_path / "images.safetensors"
    pixels = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    save_file({"pixel_values": pixels}, str(data))
    stats = []
    for m in (m0, m1):
        out = tmp_path / f"{m.name}.safetensors"
        r = cli(
            capsys, "calibrate", str(m), str(out), "--data", str(data), "--fisher", "--batch", "4"
        )
        assert r.returncode == 0, r.stderr
        assert "6 examples" in r.stdout and "tokens" not in r.stdout
        stats.append(out)
    net = T.ViTForImageClassification.from_pretrained(m0).eval()
    ref = _reference_grams(net, [{"pixel_values": pixels[:4]}, {"pixel_values": pixels[4:]}])
    got = load_folder_file(stats[0])
    # transformers 5 renames ViT's weights in memory; statistics carry the checkpoint's names.
    stored = set(load_folder(m0))
    assert {k[5:] for k in got if k.startswith("gram.")} <= stored
    assert {k[7:] for k in got if k.startswith("fisher.")} == stored
    pairs = {
        "vit.layers.0.attention.q_proj.weight": (
            "vit.encoder.layer.0.attention.attention.query.weight"
        ),
        "vit.layers.1.mlp.fc2.weight": "vit.encoder.layer.1.output.dense.weight",
        "classifier.weight": "classifier.weight",
    }
    for mem, disk in pairs.items():
        assert torch.allclose(got[f"gram.{disk}"].double(), ref[mem], atol=1e-5), disk
    stats_recipe(tmp_path / "r.yaml", "fisher", (m0, m1), stats)
    r = cli(capsys, "merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    merged = T.ViTForImageClassification.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert merged(pixel_values=pixels).logits.isfinite().all()
    # Bad input tensors are one line naming the file.
    bad = tmp_path / "bad.safetensors"
    save_file({"pixel_values": pixels, "other": torch.zeros(2)}, str(bad))
    r = cli(capsys, "calibrate", str(m0), str(tmp_path / "x.safetensors"), "--data", str(bad))
    assert r.returncode != 0 and str(bad) in r.stderr and "first axis" in r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_gpt2_conv1d_grams_and_regmean_layout(tmp_path: Path) -> None:
    """GPT-2's Conv1D stores weights [in, out]: its Grams are recorded and RegMean solves
    W* = (ΣG)⁻¹ ΣGᵢWᵢ in that layout, including the square c_proj (ambiguous by shape)."""
    m0, m1 = _experts(gpt2, tmp_path, "GPT2LMHeadModel")
    for m in (m0, m1):
        write_tokenizer(m, WORDS, pad_token="[PAD]", bos_token="[UNK]", eos_token="[UNK]")
    stats, metas = [], []
    for m in (m0, m1):
        out = tmp_path / f"{m.name}.safetensors"
        _, meta = calibrate(m, TEXTS[: 3 + len(stats)], out, CalibrationOptions(batch=2))
        stats.append(out)
        metas.append(meta)
    in_out = json.loads(metas[0]["in_out"])
    assert "transformer.h.0.attn.c_proj.weight" in in_out
    assert "transformer.h.1.mlp.c_fc.weight" in in_out and "lm_head.weight" not in in_out
    stats_recipe(tmp_path / "r.yaml", "regmean", (m0, m1), stats, ridge=0.0)
    r = run_cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    out = load_folder(tmp_path / "out")
    s0, s1 = load_folder_file(stats[0]), load_folder_file(stats[1])
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight"):
        w0, w1 = load_folder(m0)[name].double(), load_folder(m1)[name].double()
        g0, g1 = s0[f"gram.{name}"].double(), s1[f"gram.{name}"].double()
        want = torch.linalg.solve(g0 + g1, g0 @ w0 + g1 @ w1)  # [in, out] layout
        assert torch.allclose(out[name].double(), want, atol=1e-4), name
    # In memory: the calibration metadata says which weights are Conv1D.
    sd = [load_folder(m) for m in (m0, m1)]
    mem = merge_tensors("regmean", sd, statistics=[s0, s1], statistics_metadata=metas, ridge=0.0)
    name = "transformer.h.0.attn.c_proj.weight"
    assert torch.allclose(mem[name], out[name], atol=1e-6)
    T.GPT2LMHeadModel.from_pretrained(tmp_path / "out")


def test_plain_module_through_the_api() -> None:
    """Any nn.Module: Grams are XᵀX/N of each Linear's input, Fisher the mean per-example
    squared gradient of log p(y) with y sampled from the output logits."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    batches = [x[:6], x[6:]]
    tensors, meta = calibrate_module(mlp, batches, options=CalibrationOptions(fisher=True))
    assert torch.allclose(tensors["gram.0.weight"].double(), x.double().T @ x.double() / 10)
    h = torch.relu(mlp[0](x)).detach().double()
    assert torch.allclose(tensors["gram.2.weight"].double(), h.T @ h / 10, atol=1e-6)
    gen = torch.Generator().manual_seed(0)
    want = {n: torch.zeros_like(p) for n, p in mlp.named_parameters()}
    for i in range(10):
        logp = torch.log_softmax(mlp(x[i : i + 1]), -1)
        y = torch.multinomial(logp.exp().detach(), 1, generator=gen).squeeze(1)
        mlp.zero_grad()
        logp.gather(1, y[:, None]).sum().backward()
        for n, p in mlp.named_parameters():
            want[n] += p.grad.square() / 10
    for n, w in want.items():
        assert torch.allclose(tensors[f"fisher.{n}"], w, atol=1e-6), n
    assert meta["examples"] == "10" and "in_out" not in meta
    # One model in, that model out, through regmean and fisher.
    sd = dict(mlp.state_dict())
    for method in ("regmean", "fisher"):
        out = merge_tensors(method, [sd, sd], statistics=[tensors, tensors])
        for k, v in sd.items():
            assert torch.allclose(out[k], v, atol=1e-5), (method, k)


def test_custom_log_likelihood_and_output_without_logits() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, a, b):
            return {"hidden": self.lin(a) + self.lin(b)}

    net = Twice()
    a, b = torch.ones(3, 2), torch.zeros(3, 2)
    with pytest.raises(Exception, match="no logits"):
        calibrate_module(net, [(a, b)], options=CalibrationOptions(grams=False, fisher=True))
    tensors, _ = calibrate_module(
        net, [(a, b)], options=CalibrationOptions(fisher=True),
        log_likelihood=lambda m, batch: m(*batch)["hidden"].sum(),
    )  # fmt: skip
    # d/dW Σ (W a + W b) = 2 rows of (a + b) per example → squared: 1 per entry.
    assert torch.allclose(tensors["fisher.lin.weight"], torch.ones(2, 2))
    assert torch.allclose(tensors["gram.lin.weight"], torch.full((2, 2), 0.5))  # 3 ones, 3 zeros


def test_docs_example_runs() -> None:
    """The plain-module example in docs/data-aware.md runs as written."""
    text = (Path(__file__).parent.parent / "docs" / "data-aware.md").read_text()
    block = re.search(r"```python\n(# any torch\.nn\.Module.*?)```", text, re.S)
    assert block, "docs/data-aware.md lost its nn.Module example"
    exec(compile(block.group(1), "docs/data-aware.md", "exec"), {})


def test_adamerging_on_a_classifier_with_a_head_per_task() -> None:
    """AdaMerging's paper setting: a shared backbone, each task through its own frozen head;
    λ minimises the entropy of the class predictions on unlabelled inputs."""
    from merganser.api import AdaMergingConfig, adamerging
    from merganser.search.adamerging import entropy

    torch.manual_seed(0)

    class Classifier(torch.nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
            self.head = torch.nn.Linear(12, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

    nets = [Classifier(3), Classifier(5)]
    base = {k: v for k, v in nets[0].state_dict().items() if k.startswith("backbone")}
    experts = [{k: v + 0.5 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    data = [[torch.randn(16, 6)], [torch.randn(16, 6)]]

    def mean_entropy(sd: dict) -> float:
        return sum(
            float(entropy(torch.func.functional_call(n, sd, (x[0],))).mean())
            for n, x in zip(nets, data, strict=True)
        )

    cfg = AdaMergingConfig(granularity="layer", steps=60, lr=0.05, report_every=20)
    r = adamerging(nets, base, experts, data, config=cfg)
    lams = r.details["lambdas"]
    assert set(lams) == set(base) and all(0 <= x <= 1 for v in lams.values() for x in v)
    start = {k: base[k] + 0.3 * (experts[0][k] - base[k] + experts[1][k] - base[k]) for k in base}
    assert mean_entropy(r.best) < mean_entropy(start) - 1e-3
    assert [h["generation"] for h in r.history] == [20, 40, 60]
    # Experts equal to the base: whatever λ, the base comes back.
    same = adamerging(nets, base, [base, base], data, config=cfg)
    for k, v in base.items():
        assert torch.allclose(same.best[k], v)
    with pytest.raises(ValueError, match="2 models for 1 tasks"):
        adamerging(nets, base, experts, data[:1], config=cfg)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_adamerging_and_regmean_on_hf_encoders(family: str, tmp_path: Path) -> None:
    """AdaMerging through the API and a RegMean recipe, on a BERT classifier and a T5."""
    from merganser.api import AdaMergingConfig, adamerging

    make, arch = (bert, "BertForSequenceClassification") if family == "bert" else (
        t5, "T5ForConditionalGeneration")  # fmt: skip
    paths = _experts(make, tmp_path, arch, n=3)
    nets = [getattr(T, arch).from_pretrained(p).eval() for p in paths]
    base, experts = dict(nets[0].state_dict()), [dict(n.state_dict()) for n in nets[1:]]
    tok = T.AutoTokenizer.from_pretrained(paths[0])
    batch = dict(tok(TEXTS, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    if family == "t5":
        batch["decoder_input_ids"] = nets[0].prepare_decoder_input_ids_from_labels(
            labels=batch["input_ids"]
        )
    cfg = AdaMergingConfig(granularity="task", steps=5, lr=1e-2, report_every=5)
    r = adamerging(nets[0], base, experts, [[batch], [batch]], config=cfg)
    assert r.details["lambdas"][0] != [0.3, 0.3] and set(r.best) == set(base)
    stats = []
    for p in paths[1:]:
        out = tmp_path / f"{p.name}.safetensors"
        calibrate(p, TEXTS, out, CalibrationOptions(batch=2))
        stats.append(out)
    stats_recipe(tmp_path / "r.yaml", "regmean", paths[1:], stats, alpha=0.9)
    r = run_cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    _, info = getattr(T, arch).from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_clip_needs_both_inputs_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CLIP reads texts and images at once: texts alone are one line naming what was given;
    a .safetensors of both calibrates both towers."""
    from families import build_family

    (base,) = build_family("clip", tmp_path, experts=0)
    write_tokenizer(base, WORDS, pad_token="[PAD]")
    (tmp_path / "d.txt").write_text("a b\nb a\n")
    r = cli(capsys, "calibrate", str(base), str(tmp_path / "s.safetensors"),
            "--data", str(tmp_path / "d.txt"))  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "(CLIPModel) did not run on the inputs given (input_ids, attention_mask)" in r.stderr
    assert not (tmp_path / "s.safetensors").exists()
    g = torch.Generator().manual_seed(0)
    both = {"input_ids": torch.randint(0, 100, (4, 6), generator=g),
            "pixel_values": torch.randn(4, 3, 32, 32, generator=g)}  # fmt: skip
    save_file(both, str(tmp_path / "both.safetensors"))
    r = cli(capsys, "calibrate", str(base), str(tmp_path / "s.safetensors"),
            "--data", str(tmp_path / "both.safetensors"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    keys = set(load_folder_file(tmp_path / "s.safetensors"))
    assert any(k.startswith("gram.text_model.") for k in keys)
    assert any(k.startswith("gram.vision_model.") for k in keys)


def test_a_linear_layer_the_data_never_reached_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Linear the calibration data never ran has no Gram. It was listed with the embeddings
    as "not a linear layer", and RegMean silently averaged it; now the merge names it."""
    from conftest import write_model

    class Spare(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(3, 3)
            self.spare = torch.nn.Linear(3, 3)  # never called in forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    models, stats, metas = [], [], []
    for i in range(2):
        torch.manual_seed(i)
        m = Spare()
        models.append(write_model(tmp_path / f"m{i}", dict(m.state_dict())))
        out = tmp_path / f"s{i}.safetensors"
        tensors, meta = calibrate_module(m, [x], out)
        stats.append(out)
        metas.append((dict(m.state_dict()), tensors, meta))
    assert json.loads(metas[0][2]["no_input"]) == ["spare.weight"]
    assert "spare.weight" not in json.loads(metas[0][2]["not_linear"])
    stats_recipe(tmp_path / "r.yaml", "regmean", models, stats)
    r = cli(capsys, "merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "'spare.weight' is a linear layer the calibration data never reached" in r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"spare\.weight: a linear layer the calibration data"):
        merge_tensors(
            "regmean", [m[0] for m in metas], statistics=[m[1] for m in metas],
            statistics_metadata=[m[2] for m in metas],
        )  # fmt: skip


def _perturbed(
    net: torch.nn.Module, seed: int, scale: float = 0.05, linears_only: bool = False
) -> torch.nn.Module:
    """A fine-tune stand-in: the same network with every weight (or every linear's) nudged."""
    import copy

    out = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    lin = {id(m.weight) for m, _ in linear_layers(out).values()}
    lin |= {id(m.bias) for m, _ in linear_layers(out).values() if m.bias is not None}
    names = [id(p) for _, p in out.named_parameters(remove_duplicate=False)]
    lin = {i for i in lin if names.count(i) == 1}  # a tied lm_head is the embedding: not moved
    with torch.no_grad():
        for p in out.parameters():
            if not linears_only or id(p) in lin:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out.eval()


def _family_batch(family: str, net: torch.nn.Module, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(6, 3, 16, 16, generator=g)}
    ids = torch.randint(2, len(WORDS), (6, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0  # padding, left out of the fit
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch["decoder_input_ids"] = net.prepare_decoder_input_ids_from_labels(labels=ids)
    return batch


@pytest.mark.parametrize("family", ["bert", "t5", "vit", "gpt2"])
def test_refit_of_a_merge_on_any_hf_model(family: str) -> None:
    """PLeaS's refit on a same-architecture merge: one model in gives that model back, and on
    an average of two fine-tunes every refit layer's least-squares objective does not rise."""
    from merganser.api import refit_merged

    torch.manual_seed(0)
    base = {"bert": bert, "t5": t5, "vit": vit, "gpt2": gpt2}[family]().eval()
    batches = [_family_batch(family, base, seed) for seed in range(8)]  # more rows than inputs
    batch = batches[0]
    # the models' linears moved away: the refit finds them again, in forward order
    same = _perturbed(base, 1, linears_only=True)
    report = refit_merged([base], same, batches, ridge=1e-9)
    # the same function on held-out inputs (not the same weights: a LayerNorm's output has
    # zero mean, so one direction of every reader's input is never seen and keeps its prior)
    held = _family_batch(family, base, 99)
    with torch.no_grad():
        assert torch.allclose(T_out(same, held), T_out(base, held), atol=1e-4), family
    if family == "t5":  # lm_head shares the embedding matrix: left as merged, and said so
        assert report["kept"] == {"lm_head": "weight tied to shared.weight"}
    elif family == "gpt2":
        assert report["kept"] == {"lm_head": "weight tied to transformer.wte.weight"}
    else:
        assert report["kept"] == {}
    if family == "gpt2":  # Conv1D, its weight stored [in, out]
        assert "transformer.h.0.attn.c_attn" in report["refit"]

    a, b = _perturbed(base, 2, 0.2), _perturbed(base, 3, 0.2)
    avg = copy_average(a, b)
    fitted = copy_average(a, b)
    refit_merged([a, b], fitted, [batch], ridge=1e-4)
    with torch.no_grad():
        want = (T_out(a, batch) + T_out(b, batch)) / 2
        before = (T_out(avg, batch) - want).square().mean()
        after = (T_out(fitted, batch) - want).square().mean()
    assert after < before, (family, float(before), float(after))


def copy_average(a: torch.nn.Module, b: torch.nn.Module) -> torch.nn.Module:
    import copy

    out = copy.deepcopy(a)
    sb = b.state_dict()
    out.load_state_dict({k: (v + sb[k]) / 2 for k, v in a.state_dict().items()})
    return out.eval()


def T_out(net: torch.nn.Module, batch: dict) -> torch.Tensor:
    return net(**batch).logits


def test_refit_refuses_what_it_cannot_fit() -> None:
    from merganser.api import refit_merged
    from merganser.errors import MerganserError

    net = bert().eval()
    with pytest.raises(MerganserError, match="at least one batch"):
        refit_merged([net], net, [])
    other = T.BertForSequenceClassification(
        T.BertConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                     num_attention_heads=4, num_hidden_layers=2, num_labels=3)
    )  # fmt: skip
    with pytest.raises(MerganserError, match=r"source 0 has no linear layer '.*' of its shape"):
        refit_merged([other], net, [_family_batch("bert", net)])


def test_refit_of_a_plain_module() -> None:
    """refit_merged on an nn.Sequential fed tensors: a copy with its linears moved is refit to
    the model's function, and the report names every linear in forward order."""
    from merganser.api import refit_merged

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 4)
    ).eval()
    moved = _perturbed(net, 1, linears_only=True)
    xs = list(torch.randn(96, 6).split(32))
    report = refit_merged([net], moved, xs, ridge=1e-10)
    assert report == {"refit": ["0", "2"], "kept": {}}
    held = torch.randn(20, 6)
    with torch.no_grad():
        assert torch.allclose(moved(held), net(held), atol=1e-5)
