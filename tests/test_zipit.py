"""Permutation alignment (Git Re-Basin) and ZipIt!: spec §8 examples, exact symmetries of
Llama blocks, partial zipping into a loadable multi-head model, CLI and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_folder, run_cli
from safetensors.torch import load_file

from merganser.errors import MerganserError
from merganser.zipping.matching import (
    Axis,
    apply_perms,
    permute_match,
    weight_matching,
    zipit_match,
)

C1 = torch.tensor([[1, 0.2, 0.9, 0.1], [0.2, 1, 0.3, 0.8], [0.9, 0.3, 1, 0.1], [0.1, 0.8, 0.1, 1]])
C2 = torch.tensor(
    [[1, 0.95, 0.2, 0.1], [0.95, 1, 0.1, 0.2], [0.2, 0.1, 1, 0.3], [0.1, 0.2, 0.3, 1]]
)
CROSS = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=torch.float64)
WITHIN = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)


# --- spec §8.2: ZipIt's match ---------------------------------------------------------------


def test_zipit_spec_example_cross_model_pairs() -> None:
    merge, unmerge = zipit_match(C1, alpha=0.3, beta=0.125)
    assert torch.equal(unmerge, CROSS)
    assert torch.allclose(merge, torch.tensor([[0.5, 0, 0.5, 0], [0, 0.5, 0, 0.5]]).double())


@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_zipit_spec_example_within_model_zips_for_both_betas(beta: float) -> None:
    # β = 0 still allows one same-model merge per model: the official budget check comes
    # after the merge (spec §8.2 pitfall), reproduced by default.
    _, unmerge = zipit_match(C2, alpha=0.3, beta=beta)
    assert torch.equal(unmerge, WITHIN)


def test_zipit_strict_budget_blocks_within_model_merges_up_front() -> None:
    _, unmerge = zipit_match(C2, alpha=0.3, beta=0.0, parity=False)
    assert torch.equal(unmerge, CROSS)


def test_zipit_alpha_zero_forbids_regrouping_with_origin_models() -> None:
    # A0 and B0 merge first; A1 then correlates best with their group (0.8 after the min)
    # unless α ≤ 0 bars the group from every feature of both its origin models.
    c = torch.tensor(
        [[1, 0.8, 0.9, 0.2], [0.8, 1, 0.85, 0.1], [0.9, 0.85, 1, 0.3], [0.2, 0.1, 0.3, 1]]
    )
    _, free = zipit_match(c, n_models=2, alpha=1.0, beta=1.0)
    _, barred = zipit_match(c, n_models=2, alpha=0.0, beta=1.0)
    assert free.sum(0).max() == 3  # the first pair grew into a triple
    assert barred.sum(0).max() == 2


def test_permute_match_recovers_a_shuffle() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    perm = torch.randperm(6, generator=gen)
    feats = torch.cat([x, x[:, perm] + 0.05 * torch.randn(500, 6, generator=gen)], 1)
    merge, unmerge = permute_match(torch.corrcoef(feats.T), 2)
    b_of_a = unmerge[6:].argmax(0)  # which B feature stands for merged (= A) feature i
    assert torch.equal(perm[b_of_a], torch.arange(6))
    assert torch.allclose(merge.sum(1), torch.ones(6, dtype=torch.float64))


# --- spec §8.1: Git Re-Basin weight matching -------------------------------------------------


def test_weight_matching_spec_example() -> None:
    gen = torch.Generator().manual_seed(0)
    w0a, b0a, w1a = (torch.randn(*s, generator=gen) for s in ((3, 4), (3,), (2, 3)))
    p = torch.tensor([2, 0, 1])  # b-row0 ← a-row2, b-row1 ← a-row0, b-row2 ← a-row1
    b = {"W0": w0a[p] + 0.01 * torch.randn(3, 4, generator=gen), "b0": b0a[p], "W1": w1a[:, p]}
    spec = {"P0": [Axis("W0", 0), Axis("b0", 0), Axis("W1", 1)]}
    perms = weight_matching(spec, {"W0": w0a, "b0": b0a, "W1": w1a}, b)
    assert perms["P0"].tolist() == [1, 2, 0]
    back = apply_perms(spec, perms, b)
    assert torch.equal(back["W1"], w1a) and torch.equal(back["b0"], b0a)
    assert torch.allclose(back["W0"], w0a, atol=0.05)


# --- Llama models ------------------------------------------------------------------------------


def _llama(folder: Path, seed: int, kv_heads: int = 4, **kw: object) -> Path:
    from transformers import LlamaForCausalLM

    from merganser.evaluation.tiny import tiny_llama_config
    from merganser.evaluation.zoo.tokenizer import CharTokenizer

    tok = CharTokenizer()
    shape = {"hidden_size": 32, "layers": 2, "intermediate": 48, "heads": 4, **kw}
    cfg = tiny_llama_config(vocab_size=len(tok), kv_heads=kv_heads, **shape)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(folder)
    return folder


def _permute_by_hand(src: Path, dst: Path, seed: int, kv_heads: int = 4) -> None:
    """A copy of ``src`` with residual, MLP and KV-head permutations: the same function."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    s = load_file(str(src / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    d, hd, group = 32, 8, 4 // kv_heads
    res = torch.randperm(d, generator=gen)
    out = dict(s)
    out["model.embed_tokens.weight"] = s["model.embed_tokens.weight"][:, res]
    out["model.norm.weight"] = s["model.norm.weight"][res]
    out["lm_head.weight"] = s["lm_head.weight"][:, res]
    for layer in range(2):
        p = f"model.layers.{layer}."
        mlp = torch.randperm(48, generator=gen)
        heads = torch.randperm(kv_heads, generator=gen)

        def rows(unit: int, heads: torch.Tensor = heads) -> torch.Tensor:
            return (heads[:, None] * unit + torch.arange(unit)).reshape(-1)

        for n in ("input_layernorm", "post_attention_layernorm"):
            out[p + n + ".weight"] = s[p + n + ".weight"][res]
        out[p + "self_attn.q_proj.weight"] = s[p + "self_attn.q_proj.weight"][rows(group * hd)][
            :, res
        ]
        for n in ("k", "v"):
            out[p + f"self_attn.{n}_proj.weight"] = s[p + f"self_attn.{n}_proj.weight"][rows(hd)][
                :, res
            ]
        out[p + "self_attn.o_proj.weight"] = s[p + "self_attn.o_proj.weight"][res][
            :, rows(group * hd)
        ]
        for n in ("gate", "up"):
            out[p + f"mlp.{n}_proj.weight"] = s[p + f"mlp.{n}_proj.weight"][mlp][:, res]
        out[p + "mlp.down_proj.weight"] = s[p + "mlp.down_proj.weight"][res][:, mlp]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _logits(path: Path, task: str | None = None) -> torch.Tensor:
    from merganser.evaluation.evaluate import load_model

    lm = load_model(path)
    lm = lm.for_task(task) if task else lm
    ids = torch.tensor([[*lm.bos, *lm.encode("R:abc=cba")], [*lm.bos, *lm.encode("A:13+4=17")]])
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


TEXTS = ["R:abc=cba", "A:1+2=3", "S:dcab=abcd", "R:hgfe=efgh", "N:abc=bcd", "A:9+9=18"] * 4


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Model A, a hand-permuted copy of A, and B from another initialisation."""
    root = tmp_path_factory.mktemp("zip")
    a = _llama(root / "a", 0)
    _permute_by_hand(a, root / "a_perm", 1)
    return a, root / "a_perm", _llama(root / "b", 1)


def test_hand_permuted_copy_computes_the_same_function(pair: tuple[Path, Path, Path]) -> None:
    a, a_perm, _ = pair
    assert torch.allclose(_logits(a), _logits(a_perm), atol=1e-5)
    assert not torch.equal(load_folder(a)["lm_head.weight"], load_folder(a_perm)["lm_head.weight"])


@pytest.mark.parametrize("match", ["weights", "permute"])
def test_align_recovers_a_permuted_copy_exactly(
    pair: tuple[Path, Path, Path], tmp_path: Path, match: str
) -> None:
    from merganser.zipping.zipper import align_models

    a, a_perm, _ = pair
    align_models(a, a_perm, tmp_path / "out", TEXTS, match)
    got, want = load_folder(tmp_path / "out"), load_folder(a)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("match", ["weights", "permute"])
def test_align_of_another_init_keeps_its_function(
    pair: tuple[Path, Path, Path], tmp_path: Path, match: str
) -> None:
    from merganser.zipping.zipper import align_models

    a, _, b = pair
    r = align_models(a, b, tmp_path / "out", TEXTS, match)
    assert r["tensors_moved"] > 0
    assert torch.allclose(_logits(tmp_path / "out"), _logits(b), atol=1e-4)


def test_weight_matching_with_grouped_query_attention(tmp_path: Path) -> None:
    from merganser.zipping.zipper import align_models

    a = _llama(tmp_path / "a", 0, kv_heads=2)
    _permute_by_hand(a, tmp_path / "a_perm", 3, kv_heads=2)
    assert torch.allclose(_logits(a), _logits(tmp_path / "a_perm"), atol=1e-5)
    align_models(a, tmp_path / "a_perm", tmp_path / "out", None, "weights")
    got, want = load_folder(tmp_path / "out"), load_folder(a)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("match", ["zipit", "permute", "weights"])
def test_zip_of_a_model_and_its_permuted_copy_is_the_model(
    pair: tuple[Path, Path, Path], tmp_path: Path, match: str
) -> None:
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, a_perm, _ = pair
    zip_models([a, a_perm], TEXTS, tmp_path / "out", ZipOptions(matcher=match))
    got, want = load_folder(tmp_path / "out"), load_folder(a)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


@pytest.mark.parametrize("match", ["zipit", "permute"])
def test_zip_of_three_models_with_two_copies(
    pair: tuple[Path, Path, Path], tmp_path: Path, match: str
) -> None:
    """n = 3 (r = 2/3): a model, its permuted copy and itself again zip back to the model."""
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, a_perm, _ = pair
    # α = 1 keeps a pair's correlation with the third copy at 1; the default 0.3 would let
    # chance correlations inside one model win once two copies are grouped.
    zip_models([a, a_perm, a], TEXTS, tmp_path / "out", ZipOptions(matcher=match, alpha=1.0))
    # zipped groups may come out in another order than A's features: compare the function
    assert torch.allclose(_logits(tmp_path / "out"), _logits(a), atol=1e-5)


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_partial_zip_heads_reproduce_each_model(
    pair: tuple[Path, Path, Path], tmp_path: Path, layers: int
) -> None:
    """Zipping A with its permuted copy loses nothing, so every head is exactly model A;
    the multi-head folder loads, routes tasks to heads, and stores only one trunk."""
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, a_perm, _ = pair
    out = tmp_path / "mh"
    zip_models(
        [a, a_perm], TEXTS, out, ZipOptions(matcher="zipit", layers=layers, heads=("x", "y"))
    )
    want = _logits(a)
    for head in ("x", "y"):
        assert torch.allclose(_logits(out, head), want, atol=1e-5)
    stored = load_file(str(out / "model.safetensors"))
    trunk = [k for k in stored if not k.startswith("heads.")]
    assert len([k for k in trunk if k.startswith("model.layers.")]) == 9 * layers
    assert {k.split(".")[1] for k in stored if k.startswith("heads.")} == {"x", "y"}


def test_partial_zip_of_different_models_is_evaluable_per_task(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    a, _, b = pair
    out = tmp_path / "mh"
    r = run_cli("zip", str(a), str(b), str(out), "--data", str(_texts_file(tmp_path)),
                "--layers", "1", "--heads", "reverse,add")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1/2 blocks zipped by zipit" in r.stdout
    r = run_cli("eval", str(out), "--tasks", "reverse,add", "--n", "4", "--json")
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(out), "--tasks", "sort", "--n", "2")
    assert r.returncode == 1
    assert "no head for task 'sort' (heads: reverse, add)" in r.stderr
    # k = 0: the heads differ from their models only through the zipped embeddings
    from merganser.zipping.zipper import ZipOptions, zip_models

    zip_models([a, b], TEXTS, tmp_path / "k0", ZipOptions(layers=0, heads=("a", "b")))
    tensors = load_file(str(tmp_path / "k0" / "model.safetensors"))
    for k, t in load_folder(b).items():
        if k != "model.embed_tokens.weight":
            assert torch.equal(tensors[f"heads.b.{k}"], t)


def _texts_file(tmp: Path) -> Path:
    p = tmp / "texts.txt"
    p.write_text("\n".join(TEXTS) + "\n")
    return p


def test_zip_cli_full_merge_is_a_plain_llama(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, _, b = pair
    out = tmp_path / "z"
    r = run_cli("zip", str(a), str(b), str(out), "--data", str(_texts_file(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "2/2 blocks zipped" in r.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # loads as an ordinary Llama
    assert (out / "tokenizer.json").is_file()


def test_features_mask_padding(pair: tuple[Path, Path, Path]) -> None:
    """Batched features (padding masked) equal those of one sequence at a time."""
    from merganser.evaluation.evaluate import load_model
    from merganser.zipping.features import collect_features

    a, _, b = pair
    models = [load_model(a), load_model(b)]
    batched = collect_features(models, TEXTS[:6], batch=6)
    single = collect_features(models, TEXTS[:6], batch=1)
    assert batched.tokens == single.tokens
    for x, y in zip(batched.residual + batched.mlp + batched.attn,
                    single.residual + single.mlp + single.attn, strict=True):  # fmt: skip
        assert torch.allclose(x.covariance(), y.covariance(), atol=1e-5)
    for x, y in zip(batched.heads, single.heads, strict=True):
        assert torch.allclose(x[0], y[0], atol=1e-6)
    # the stacked covariance's diagonal blocks are each model's own feature covariance
    d = 32
    cov = batched.residual[1].covariance()
    assert torch.allclose(cov, cov.T)
    assert cov.shape == (2 * d, 2 * d)


def test_zip_errors_are_one_line_and_write_nothing(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, _, b = pair
    wide = _llama(tmp_path / "wide", 2, intermediate=64)
    tied = _llama(tmp_path / "tied", 2, tie_word_embeddings=True)
    out = tmp_path / "out"
    cases = [
        ([a, wide], {}, "wide: intermediate is 64, expected 48"),
        ([a, b], {"layers": 3, "heads": ("x", "y")}, "--layers: expected 0..2, got 3"),
        ([a, b], {"layers": 1}, "partial zip"),
        ([a, b], {"heads": ("x",)}, "--heads: 1 names for 2 models"),
        ([tied, tied], {}, "untied embeddings"),
        ([tied, tied], {"matcher": "weights", "heads": ("x", "y")}, "untied embeddings"),
        ([a, b], {"heads": ("x", "x.y")}, "--heads: names are letters"),
    ]
    for models, kw, msg in cases:
        with pytest.raises(MerganserError, match=msg.replace("(", r"\(").replace(".", r"\.")):
            zip_models(models, TEXTS, out, ZipOptions(**kw))  # type: ignore[arg-type]
        assert not out.exists()
    with pytest.raises(MerganserError, match="overlaps input"):
        zip_models([a, b], TEXTS, a, ZipOptions())
    with pytest.raises(MerganserError, match="needs data"):
        zip_models([a, b], None, out, ZipOptions())
    r = run_cli("zip", str(a), str(b), str(out), "--layers", "1")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


# --- least-squares refit (PLeaS) ----------------------------------------------------------------


def test_lstsq_weights_solves_the_ridge_problem() -> None:
    from merganser.zipping.refit import lstsq_weights

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    t = z @ w.T
    assert torch.allclose(lstsq_weights(z.T @ z, t.T @ z, 0.0), w, atol=1e-10)
    # ridge λ = r · mean diag(ZᵀZ): the least-squares solution of [Z; √λ I] W ᵀ = [T; 0]
    t = t + 0.1 * torch.randn(200, 5, generator=gen, dtype=torch.float64)
    lam = 0.5 * float(torch.diagonal(z.T @ z).mean())
    big = torch.cat([z, lam**0.5 * torch.eye(7, dtype=torch.float64)])
    want = torch.linalg.lstsq(big, torch.cat([t, torch.zeros(7, 5, dtype=torch.float64)])).solution
    assert torch.allclose(lstsq_weights(z.T @ z, t.T @ z, 0.5), want.T, atol=1e-10)
    # with a prior W₀ the ridge pulls towards it: ‖W − W₀‖ penalised, i.e. rows [√λ I | √λ W₀ᵀ]
    w0 = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    want = torch.linalg.lstsq(big, torch.cat([t, lam**0.5 * w0.T])).solution
    assert torch.allclose(lstsq_weights(z.T @ z, t.T @ z, 0.5, w0), want.T, atol=1e-10)


@pytest.mark.parametrize("layers", [None, 1])
def test_refit_zip_of_a_model_and_its_permuted_copy_is_the_model(
    pair: tuple[Path, Path, Path], tmp_path: Path, layers: int | None
) -> None:
    """Every target is the model's own feature, and the ridge pulls towards the zip (already the
    model), so the refit gives the model back, even where the data leaves the fit open."""
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, a_perm, _ = pair
    heads = None if layers is None else ("x", "y")
    opts = ZipOptions(layers=layers, heads=heads, refit=True)
    zip_models([a, a_perm], TEXTS, tmp_path / "out", opts)
    for head in heads or (None,):
        assert torch.allclose(_logits(tmp_path / "out", head), _logits(a), atol=1e-4)


def _mse(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).square().mean())


def test_refit_brings_zips_of_different_models_closer_to_them(
    pair: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, _, b = pair
    err = {}
    for refit in (False, True):
        one, multi = tmp_path / f"one{refit}", tmp_path / f"multi{refit}"
        zip_models([a, b], TEXTS, one, ZipOptions(refit=refit))
        zip_models([a, b], TEXTS, multi, ZipOptions(layers=1, heads=("a", "b"), refit=refit))
        mean = (_logits(a) + _logits(b)) / 2  # the one model's last target: the mean logits
        err[refit] = (
            _mse(_logits(one), mean),
            _mse(_logits(multi, "a"), _logits(a)),
            _mse(_logits(multi, "b"), _logits(b)),
        )
    assert all(r < p / 2 for r, p in zip(err[True], err[False], strict=True)), err
    stored = load_file(str(tmp_path / "multiTrue" / "model.safetensors"))
    assert stored["heads.a.unmerge"].shape == (32, 32)
    r = run_cli("zip", str(a), str(b), str(tmp_path / "cli"), "--data",
                str(_texts_file(tmp_path)), "--refit", "--match", "identity")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2/2 blocks zipped by identity" in r.stdout and "refit by least squares" in r.stdout


def test_refit_errors(pair: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from merganser.zipping.zipper import ZipOptions, zip_models

    a, _, b = pair
    out = tmp_path / "out"
    with pytest.raises(MerganserError, match="--refit: needs data"):
        zip_models([a, b], None, out, ZipOptions(matcher="weights", refit=True))
    with pytest.raises(MerganserError, match="--ridge: expected ≥ 0"):
        zip_models([a, b], TEXTS, out, ZipOptions(refit=True, ridge=-1.0))
    assert not out.exists()


def test_refit_handles_biases(tmp_path: Path) -> None:
    """Linears with biases are solved with a constant input column: a model zipped with itself
    and refit (matching by identity) comes back unchanged, biases included."""
    from transformers import LlamaForCausalLM

    from merganser.evaluation.tiny import tiny_llama_config
    from merganser.evaluation.zoo.tokenizer import CharTokenizer
    from merganser.zipping.zipper import ZipOptions, zip_models

    tok = CharTokenizer()
    cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=32, intermediate=48, kv_heads=4)
    cfg.attention_bias = cfg.mlp_bias = True
    torch.manual_seed(3)
    net = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    net.save_pretrained(tmp_path / "a")
    tok.save(tmp_path / "a")
    a = tmp_path / "a"
    zip_models([a, a], TEXTS, tmp_path / "out", ZipOptions(matcher="identity", refit=True))
    got, want = load_folder(tmp_path / "out"), load_folder(a)
    assert any(k.endswith("q_proj.bias") for k in want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-4), k
