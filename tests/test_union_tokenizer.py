"""tokenizer_source: union | base | <model> (issue 29; spec algorithms-2.md §10): the output
vocabulary, each model's embedding and head rows moved to it, and the rows a model lacks
filled as mergekit 0.1.5 fills them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model, write_recipe, write_tokenizer

from merganser.cli import main
from merganser.model.vocab import Vocab, align_rows, permutation, union_tokens

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(13)]  # 16 shared tokens
D = 8


def _model(folder: Path, words: list[str], seed: int, like: dict | None = None) -> Path:
    """A tiny model whose embedding/head rows are keyed by token string: rows of tokens in
    ``like`` (token -> (embed row, head row)) are copied from there plus noise.
    """
    g = torch.Generator().manual_seed(seed)
    emb, head = torch.randn(len(words), D, generator=g), torch.randn(len(words), D, generator=g)
    if like:
        for i, w in enumerate(words):
            if w in like:
                emb[i] = like[w][0] + 0.1 * torch.randn(D, generator=g)
                head[i] = like[w][1] + 0.1 * torch.randn(D, generator=g)
    write_model(
        folder,
        {"model.embed_tokens.weight": emb, "lm_head.weight": head,
         "model.layers.0.mlp.up_proj.weight": torch.randn(16, D, generator=g)},
        {"vocab_size": len(words), "num_hidden_layers": 1},
    )  # fmt: skip
    write_tokenizer(folder, words, bos_token="<s>", eos_token="</s>")
    return folder


def _rows(folder: Path, words: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_folder(folder)
    return {
        w: (t["model.embed_tokens.weight"][i], t["lm_head.weight"][i]) for i, w in enumerate(words)
    }


@pytest.fixture
def trio(tmp_path):
    base = _model(tmp_path / "base", WORDS, 0)
    like = _rows(base, WORDS)
    x_words = [*WORDS, "foo", "<extra>"]
    y_words = [*WORDS, "bar"]
    x = _model(tmp_path / "x", x_words, 1, like)
    y = _model(tmp_path / "y", y_words, 2, like)
    return {"base": (base, WORDS), "x": (x, x_words), "y": (y, y_words)}


def _merge(tmp_path, capsys, trio, source, method="linear", **extra) -> tuple[int, str, Path]:
    models = [{"model": str(trio[k][0])} for k in ("base", "x", "y")]
    recipe = {"merge_method": method, "models": models, "tokenizer_source": source, **extra}
    if method != "linear":
        recipe["base_model"] = str(trio["base"][0])
        recipe["models"] = models[1:]
    out = tmp_path / f"out_{source if '/' not in source else 'model'}_{method}"
    capsys.readouterr()
    rc = main(["merge", str(write_recipe(tmp_path / "r.yaml", recipe)), str(out), "--no-progress"])
    return rc, capsys.readouterr().err, out


def _out_rows(out: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(out).get_vocab(), load_folder(out)


def test_union_merges_shared_rows_as_a_plain_merge_and_fills_the_rest(
    tmp_path, capsys, trio
) -> None:
    rc, err, out = _merge(tmp_path, capsys, trio, "union")
    assert rc == 0, err
    vocab, t = _out_rows(out)
    # The base's tokens keep their ids; x's new tokens, then y's, follow in id order.
    assert [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])] == (
        [*WORDS, "foo", "<extra>", "bar"]
    )
    rows = {k: _rows(p, words) for k, (p, words) in trio.items()}
    emb, head = t["model.embed_tokens.weight"], t["lm_head.weight"]
    assert emb.shape == (19, D) and head.shape == (19, D)
    for w in WORDS:  # shared: the plain average of the three rows
        want = (rows["base"][w][0] + rows["x"][w][0] + rows["y"][w][0]) / 3
        torch.testing.assert_close(emb[vocab[w]], want, rtol=0, atol=1e-6)
    # A token one model has: the others take its row (the donor), so the merge is that row.
    torch.testing.assert_close(emb[vocab["foo"]], rows["x"]["foo"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(head[vocab["bar"]], rows["y"]["bar"][1], rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 19
    assert f"{trio['y'][0]} lacks 2 of the output's 19 tokens" in err
    assert f"{trio['base'][0]} lacks 3" in err


def test_union_tokenizer_encodes_as_the_model_that_owns_a_token(tmp_path, capsys, trio) -> None:
    from transformers import AutoTokenizer

    rc, err, out = _merge(tmp_path, capsys, trio, "union")
    assert rc == 0, err
    merged, x = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(trio["x"][0])
    text = "w3 foo w7 <extra> w0"
    ours = merged.convert_ids_to_tokens(merged(text).input_ids)
    assert ours == x.convert_ids_to_tokens(x(text).input_ids) == text.split()


def test_base_tokenizer_drops_the_tokens_only_others_have(tmp_path, capsys, trio) -> None:
    rc, err, out = _merge(tmp_path, capsys, trio, "base", method="task_arithmetic")
    assert rc == 0, err
    vocab, t = _out_rows(out)
    assert len(vocab) == 16 and t["model.embed_tokens.weight"].shape == (16, D)
    rows = {k: _rows(p, words) for k, (p, words) in trio.items()}
    for w in ("w5", "</s>"):
        b = rows["base"][w][0]
        want = b + (rows["x"][w][0] - b) + (rows["y"][w][0] - b)
        torch.testing.assert_close(
            t["model.embed_tokens.weight"][vocab[w]], want, atol=1e-6, rtol=0
        )


def test_a_models_tokenizer_gets_every_rows_in_its_order(tmp_path, capsys, trio) -> None:
    rc, err, out = _merge(tmp_path, capsys, trio, str(trio["x"][0]))
    assert rc == 0, err
    vocab, t = _out_rows(out)
    assert vocab == {w: i for i, w in enumerate(trio["x"][1])}
    # y lacks foo: base and y take x's row, so the average is x's.
    torch.testing.assert_close(
        t["lm_head.weight"][vocab["foo"]], _rows(*trio["x"])["foo"][1], atol=1e-6, rtol=0
    )


def test_same_size_vocabularies_in_another_order_are_realigned(tmp_path, capsys) -> None:
    """Two models of one vocabulary size whose tokens sit at different ids: with
    tokenizer_source: base the rows were averaged id by id, token against another token.
    """
    base = _model(tmp_path / "base", WORDS, 0)
    shuffled = WORDS[:3] + WORDS[3:][::-1]
    other = _model(tmp_path / "other", shuffled, 1, _rows(base, WORDS))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "tokenizer_source": "base",
         "models": [{"model": str(base)}, {"model": str(other)}]},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"]) == 0
    t = load_folder(tmp_path / "o")["model.embed_tokens.weight"]
    b, o = _rows(base, WORDS), _rows(other, shuffled)
    for i, w in enumerate(WORDS):
        torch.testing.assert_close(t[i], (b[w][0] + o[w][0]) / 2, atol=1e-6, rtol=0)


def test_identical_vocabularies_copy_the_tokenizer_files(tmp_path, capsys, trio) -> None:
    base = trio["base"][0]
    twin = _model(tmp_path / "twin", WORDS, 5)
    recipe = write_recipe(
        tmp_path / "r2.yaml",
        {"merge_method": "linear", "tokenizer_source": "union",
         "models": [{"model": str(base)}, {"model": str(twin)}]},
    )  # fmt: skip
    assert main(["merge", str(recipe), str(tmp_path / "o2"), "--no-progress"]) == 0
    assert (tmp_path / "o2" / "tokenizer.json").read_bytes() == (
        base / "tokenizer.json"
    ).read_bytes()


def test_spec_10_3_worked_example_and_padding() -> None:
    vb, vx, vy = (Vocab(dict(zip(w, range(3), strict=True)), {}, 3) for w in ("abc", "acd", "bde"))
    tokens, new = union_tokens([vb, vx, vy])
    assert tokens == list("abcde") and new == ["d", "e"]
    perms = [permutation(tokens, v) for v in (vb, vx, vy)]
    assert [p.tolist() for p in perms] == [[0, 1, 2, -1, -1], [0, -1, 1, 2, -1], [-1, 0, -1, 1, 2]]
    e = [torch.tensor(m, dtype=torch.float32) for m in (
        [[1, 0], [0, 1], [1, 1]], [[2, 0], [2, 2], [4, 0]], [[0, 3], [0, 4], [5, 5]])]  # fmt: skip
    base, x, y = align_rows(e, perms, 0, 5)
    assert base.tolist() == [[1, 0], [0, 1], [1, 1], [2, 2], [5, 5]]
    assert x.tolist() == [[2, 0], [0, 1], [2, 2], [4, 0], [5, 5]]
    assert y.tolist() == [[1, 0], [0, 3], [1, 1], [0, 4], [5, 5]]
    padded_x = align_rows(e, perms, 0, 8)[1]
    torch.testing.assert_close(padded_x[5:], torch.tensor([[2.6, 1.6]] * 3))


def test_union_without_tokenizers_is_one_line(tmp_path, capsys) -> None:
    g = torch.Generator().manual_seed(0)
    emb = "model.embed_tokens.weight"
    ms = [write_model(tmp_path / f"m{i}", {emb: torch.randn(4, 2, generator=g)}) for i in (0, 1)]
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "tokenizer_source": "union",
         "models": [{"model": str(m)} for m in ms]},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no tokenizer files" in err


def test_union_of_real_llamas_loads_with_transformers(tmp_path, capsys) -> None:
    import transformers as T

    folders = []
    for i, words in enumerate((WORDS, [*WORDS, "foo"], [*WORDS, "bar", "baz"])):
        cfg = T.LlamaConfig(
            vocab_size=len(words), hidden_size=16, intermediate_size=32, num_attention_heads=2,
            num_hidden_layers=1, num_key_value_heads=1, tie_word_embeddings=False,
        )  # fmt: skip
        cfg.architectures = ["LlamaForCausalLM"]
        torch.manual_seed(i)
        folders.append(tmp_path / f"m{i}")
        T.LlamaForCausalLM(cfg).save_pretrained(folders[-1])
        write_tokenizer(folders[-1], words, bos_token="<s>", eos_token="</s>")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "ties", "base_model": str(folders[0]), "tokenizer_source": "union",
         "models": [{"model": str(f)} for f in folders[1:]], "parameters": {"density": 0.5}},
    )  # fmt: skip
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    model, info = T.LlamaForCausalLM.from_pretrained(tmp_path / "o", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = T.AutoTokenizer.from_pretrained(tmp_path / "o")
    ids = tok("w1 foo baz", return_tensors="pt").input_ids
    assert model.config.vocab_size == 19 and int(ids.max()) == 18
    assert torch.isfinite(model(ids).logits).all()


def test_tokenizer_block_tokens_and_padding(tmp_path, capsys, trio) -> None:
    """mergekit's tokenizer: block: a token filled with zeros, one forced from a model's other
    token for every model, a new token added, and the vocabulary padded.
    """
    base, x, y = (str(trio[k][0]) for k in ("base", "x", "y"))
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": base}, {"model": x}, {"model": y}],
         "tokenizer": {"source": "union", "pad_to_multiple_of": 8, "tokens": {
             "bar": {"source": {"kind": "zero"}},
             "w1": {"source": {"kind": "model_token", "model": x, "token": "foo"}, "force": True},
             "<new>": {"source": {"kind": "zero"}},
         }}},
    )  # fmt: skip
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    vocab, t = _out_rows(tmp_path / "o")
    emb = t["model.embed_tokens.weight"]
    assert emb.shape == (24, D) and vocab["<new>"] == 19
    assert torch.equal(emb[19], torch.zeros(D))
    rows = {k: _rows(p, words) for k, (p, words) in trio.items()}
    # bar: only y has it; the others take zeros, so the average is y's row / 3.
    torch.testing.assert_close(emb[vocab["bar"]], rows["y"]["bar"][0] / 3, atol=1e-6, rtol=0)
    # w1 forced for every model from x's "foo" row.
    torch.testing.assert_close(emb[vocab["w1"]], rows["x"]["foo"][0], atol=1e-6, rtol=0)
    # Padding rows: the mean of each model's aligned rows, averaged.
    assert torch.isfinite(emb[20:]).all() and not torch.equal(emb[20], torch.zeros(D))


def test_tokenizer_block_token_without_a_row_is_refused(tmp_path, capsys, trio) -> None:
    base, y = str(trio["base"][0]), str(trio["y"][0])
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": base}, {"model": y}],
         "tokenizer": {"tokens": {"<new>": {"source": y}}}},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o")]) == 1
    assert f"tokenizer: tokens.<new>: {y} has no row for <new>" in capsys.readouterr().err


def test_tokenizer_block_and_tokenizer_source_together_are_refused(tmp_path, capsys, trio) -> None:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(trio["x"][0])}],
         "tokenizer_source": "union", "tokenizer": {"source": "union"}},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o")]) == 1
    assert "give tokenizer_source or a tokenizer: block, not both" in capsys.readouterr().err


def test_fill_from_pieces_uses_each_models_own_rows(tmp_path, capsys) -> None:
    """tokenizer: {fill: pieces} (tokensurgeon's idea): a model lacking "w1 w2" fills it with
    the mean of its own rows for "w1" and "w2", not a row borrowed from another model.
    """
    base = _model(tmp_path / "base", WORDS, 0)
    x_words = [*WORDS, "w1 w2"]
    x = _model(tmp_path / "x", x_words, 1, _rows(base, WORDS))
    from transformers import AddedToken, AutoTokenizer

    # x's tokenizer: "w1 w2" as one added token (a word-level model cannot hold it otherwise).
    vocab = {w: i for i, w in enumerate(WORDS)}
    write_tokenizer(x, WORDS, bos_token="<s>", eos_token="</s>")
    tok = AutoTokenizer.from_pretrained(x)
    tok.add_tokens([AddedToken("w1 w2", normalized=False)])
    tok.save_pretrained(x)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(x)}],
         "tokenizer": {"source": "union", "fill": "pieces"}},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "1 missing tokens filled from their pieces" in err
    out_vocab, t = _out_rows(tmp_path / "o")
    b, xr = _rows(base, WORDS), _rows(x, x_words)
    own = (b["w1"][0] + b["w2"][0]) / 2  # the base's own pieces
    want = (own + xr["w1 w2"][0]) / 2
    torch.testing.assert_close(t["model.embed_tokens.weight"][out_vocab["w1 w2"]], want,
                               atol=1e-6, rtol=0)  # fmt: skip
    assert vocab["w1"] == out_vocab["w1"]


def test_t5_shared_embedding_is_realigned_and_positions_are_not(tmp_path, capsys) -> None:
    """T5's token embedding is `shared.weight`, a name the vocabulary rule did not know: with
    vocabularies in another order its rows were averaged id by id, token against another
    token. A position table with as many rows as the vocabulary must not be moved.
    """
    g = torch.Generator().manual_seed(0)
    shuffled = WORDS[:3] + WORDS[3:][::-1]
    folders = []
    for name, words in (("base", WORDS), ("other", shuffled)):
        rows = len(words)
        t = {"shared.weight": torch.randn(rows, D, generator=g),
             "encoder.position_embeddings.weight": torch.randn(rows, D, generator=g)}  # fmt: skip
        folders.append(write_model(tmp_path / name, t, {"vocab_size": len(words)}))
        write_tokenizer(folders[-1], words, bos_token="<s>", eos_token="</s>")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "tokenizer_source": "base",
         "models": [{"model": str(f)} for f in folders]},
    )  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "o"), "--no-progress"]) == 0
    out = load_folder(tmp_path / "o")
    b, o = (load_folder(f) for f in folders)
    row = {w: i for i, w in enumerate(shuffled)}
    for i, w in enumerate(WORDS):
        want = (b["shared.weight"][i] + o["shared.weight"][row[w]]) / 2
        torch.testing.assert_close(out["shared.weight"][i], want, atol=1e-6, rtol=0)
    pos = "encoder.position_embeddings.weight"
    torch.testing.assert_close(out[pos], (b[pos] + o[pos]) / 2, atol=1e-6, rtol=0)
