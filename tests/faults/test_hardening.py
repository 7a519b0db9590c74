"""What an adversarial tester found (issue 27), one test each: every input ends in one line and
a documented exit status, never a traceback, a hang, a silent Inf or a write into an input.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys

import pytest
import torch
import yaml
from conftest import load_folder, run_cli, tree_digest, write_model, write_recipe

from merganser.cli import main
from merganser.errors import MerganserError, size_text


def _models(tmp_path, n=3, shape=(16, 8)):
    g = torch.Generator().manual_seed(0)
    return [
        write_model(
            tmp_path / f"m{i}",
            {"model.layers.0.mlp.weight": torch.randn(*shape, generator=g)},
            {"num_hidden_layers": 1},
        )
        for i in range(n)
    ]


def _linear(tmp_path, models, **extra):
    recipe = {"merge_method": "linear", "models": [{"model": str(m)} for m in models], **extra}
    return write_recipe(tmp_path / "r.yaml", recipe)


def _weighted(tmp_path, weight: float, **extra):
    """A linear recipe over two models, each with ``weight``."""
    ms = _models(tmp_path, 2)
    models = [{"model": str(m), "parameters": {"weight": weight}} for m in ms]
    return write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": models, **extra})


def _one_line_error(capsys, *argv, rc=1) -> str:
    assert main(list(argv)) == rc
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("merganser: error: "), err
    return err


# -- 1. tracebacks before the error handler -------------------------------------------------


def test_deeply_nested_recipe_is_one_line_through_the_console_script(tmp_path) -> None:
    """3000 nested lists went through the prefetch (before the error handler): RecursionError."""
    m = _models(tmp_path, 1)[0]
    p = tmp_path / "deep.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {m}\n    parameters:\n      weight: ")
    with p.open("a") as f:
        f.write("[" * 3000 + "]" * 3000 + "\n")
    r = run_cli("merge", str(p), str(tmp_path / "out"), "--no-progress", timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("merganser: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "nests deeper than 32 levels" in r.stderr
    assert not (tmp_path / "out").exists()


def test_huge_integer_in_recipe(tmp_path, capsys) -> None:
    m = _models(tmp_path, 1)[0]
    p = tmp_path / "big.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {m}\nrandom_seed: {'7' * 5000}\n")
    assert "4300 digits" in _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))


def test_path_of_500_segments(tmp_path, capsys) -> None:
    m = _models(tmp_path, 1)[0]
    long = "/".join(["a"] * 500)
    p = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": long}, {"model": str(m)}]},
    )
    _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))


def test_index_whose_weight_map_is_a_list(tmp_path, capsys) -> None:
    """pagecache.weight_files died with AttributeError during merge (inspect was fine)."""
    ms = _models(tmp_path, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text('{"weight_map": ["a", "b"]}')
    p = _linear(tmp_path, [ms[0], bad])
    assert "weight_map" in _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))


# -- 2. hangs and unbounded cost --------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("read", ["auto", "direct"])
def test_fifo_in_place_of_weights_neither_hangs_nor_says_no_such_file(tmp_path, read) -> None:
    ms = _models(tmp_path, 1)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")
    p = _linear(tmp_path, [ms[0], fifo])
    r = run_cli("merge", str(p), str(tmp_path / "o"), "--read", read, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "is a FIFO" in r.stderr and "no such file" not in r.stderr


@pytest.mark.parametrize("kind", ["folder", "device"])
def test_folder_or_device_in_place_of_weights(tmp_path, capsys, kind) -> None:
    ms = _models(tmp_path, 1)
    odd = tmp_path / "odd"
    odd.mkdir()
    if kind == "folder":
        (odd / "model.safetensors").mkdir()
    else:
        (odd / "model.safetensors").symlink_to("/dev/zero")
    err = _one_line_error(
        capsys, "merge", str(_linear(tmp_path, [ms[0], odd])), str(tmp_path / "o")
    )
    assert f"is a {kind}" in err and "no such file" not in err


def test_too_many_models_are_refused_before_any_work(tmp_path, capsys) -> None:
    from merganser.pipeline.recipe import MAX_MODELS

    m = _models(tmp_path, 1)[0]
    refs = [{"model": f"{m}/../{m.name}" + "/." * i} for i in range(MAX_MODELS + 1)]
    p = write_recipe(
        tmp_path / "r.yaml", {"merge_method": "model_stock", "base_model": str(m), "models": refs}
    )
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))
    assert f"at most {MAX_MODELS}" in err


def test_hundreds_of_models_state_their_cost_and_merge(tmp_path, capsys) -> None:
    """Model Stock over 300 models (a 900-model recipe ran for minutes, pair by pair): the plan
    states what it reads, and the merge is the one-model answer (every model the same)."""
    base, m = _models(tmp_path, 2, shape=(48, 48))
    refs = [{"model": f"{m}/../{m.name}" + "/." * i} for i in range(300)]
    recipe = {"merge_method": "model_stock", "base_model": str(base), "models": refs}
    p = write_recipe(tmp_path / "r.yaml", recipe)
    assert main(["plan", str(p)]) == 0
    out = capsys.readouterr().out
    assert "reads: " in out and "peak tensor memory" in out
    assert main(["merge", str(p), str(tmp_path / "o"), "--no-progress"]) == 0
    got, want = load_folder(tmp_path / "o"), load_folder(m)
    for k in want:  # one model 300 times: cos 1, t 1, the model
        torch.testing.assert_close(got[k], want[k])


# -- 3. silently wrong output -------------------------------------------------------------------


def test_overflow_in_the_output_dtype_is_caught(tmp_path, capsys) -> None:
    """The non-finite check ran on float32, before the cast to float16: exit 0 with Inf."""
    p = _weighted(tmp_path, 1e6, parameters={"normalize": False}, out_dtype="float16")
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"), "--no-progress")
    assert "NaN or Inf" in err and not (tmp_path / "o").exists()
    # --allow-nonfinite still writes it, as asked.
    assert main(["merge", str(p), str(tmp_path / "o"), "--allow-nonfinite", "--no-progress"]) == 0
    assert not torch.isfinite(load_folder(tmp_path / "o")["model.layers.0.mlp.weight"]).all()


def test_overflow_of_a_cast_alone_is_caught(tmp_path, capsys) -> None:
    """passthrough casts to float16 with no other arithmetic: the cast alone overflows."""
    m = write_model(tmp_path / "m", {"w": torch.full((4,), 1e6)})
    p = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "passthrough", "models": [{"model": str(m)}], "out_dtype": "float16"},
    )
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"), "--no-progress")
    assert "tensor w: merge produced NaN or Inf in float16" in err


def test_weights_beyond_float32(tmp_path, capsys) -> None:
    p = _weighted(tmp_path, 1e39)
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))
    assert "beyond float32's range" in err


# -- 4. writes where it must not ---------------------------------------------------------------


def _search(tmp_path, task: str):
    """Two models and a SEARCH.yaml over them, evaluated on zoo task ``task``."""
    ms = _models(tmp_path, 2)
    search = tmp_path / "s.yaml"
    cfg = {"strategy": "evolver", "models": [str(m) for m in ms], "evaluator": {"tasks": [task]}}
    search.write_text(yaml.safe_dump(cfg))
    return ms, search


def test_evolve_refuses_an_input_model_folder_as_output(tmp_path, capsys) -> None:
    ms, search = _search(tmp_path, "reverse")
    before = tree_digest(tmp_path)
    for out in (ms[0], ms[0] / "sub", tmp_path):
        err = _one_line_error(capsys, "evolve", str(search), str(out), "--force")
        assert "overlaps input" in err
    assert tree_digest(tmp_path) == before


def test_evolve_refuses_an_unknown_task_in_one_line(tmp_path, capsys) -> None:
    _, search = _search(tmp_path, "nope")
    err = _one_line_error(capsys, "evolve", str(search), str(tmp_path / "o"))
    assert "evaluator.tasks[0]: unknown task 'nope'" in err


def test_kinship_writes_no_file_unless_asked_and_never_over_one(tmp_path, capsys, monkeypatch):
    ms = _models(tmp_path, 3)
    monkeypatch.chdir(tmp_path)
    args = ["kinship", str(ms[1]), str(ms[2]), "--base", str(ms[0])]
    assert main(args) == 0
    assert not (tmp_path / "kinship.png").exists()
    png = tmp_path / "k.png"
    png.write_text("precious")
    capsys.readouterr()
    assert "use --force" in _one_line_error(capsys, *args, "--heatmap", str(png))
    assert png.read_text() == "precious"
    err = _one_line_error(capsys, *args, "--heatmap", str(ms[1] / "k.png"), "--force")
    assert "overlaps input" in err and not (ms[1] / "k.png").exists()
    assert main([*args, "--heatmap", str(png), "--force"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_never_writes_over_its_data_or_an_existing_file(tmp_path, capsys) -> None:
    data = tmp_path / "data.txt"
    data.write_text("hello\n")
    model = tmp_path / "model"
    model.mkdir()
    err = _one_line_error(capsys, "calibrate", str(model), str(data), "--data", str(data))
    assert "overlaps input" in err and data.read_text() == "hello\n"
    err = _one_line_error(
        capsys, "calibrate", str(model), str(model / "s.safetensors"), "--data", str(data)
    )
    assert "overlaps input" in err


def test_merge_refuses_output_holding_the_recipe(tmp_path, capsys) -> None:
    ms = _models(tmp_path, 2)
    (tmp_path / "out").mkdir()
    p = _linear(tmp_path / "out", ms)
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "out"), "--force")
    assert "overlaps input" in err and p.is_file()


# -- 5. trusting what it should verify ---------------------------------------------------------


@pytest.fixture
def merged(tmp_path):
    ms = _models(tmp_path, 2)
    out = tmp_path / "merged"
    assert main(["merge", str(_linear(tmp_path, ms)), str(out), "--out-shard-size", "600"]) == 0
    assert len(list(out.glob("*.safetensors"))) == 1
    return out


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage",
    ["config", "recipe", "card", "extra-shard", "extra-file", "missing-file", "index"],
)
def test_verify_checks_every_file(merged, capsys, damage) -> None:
    from merganser.analysis.verify import verify_output

    assert verify_output(merged)["files_checked"]
    if damage == "config":
        _edit_json(merged / "config.json", lambda c: c.update(hidden_size=4))
    elif damage == "recipe":
        with (merged / "merganser_recipe.yaml").open("a") as f:
            f.write("# edited\n")
    elif damage == "card":
        (merged / "README.md").write_text("nothing to see")
    elif damage == "extra-shard":
        shutil.copy(merged / "model.safetensors", merged / "model-00002-of-00002.safetensors")
    elif damage == "extra-file":
        (merged / "notes.txt").write_text("x")
    elif damage == "missing-file":
        (merged / "config.json").unlink()
    else:
        (merged / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 1}}')
    with pytest.raises(MerganserError):
        verify_output(merged)
    assert main(["verify", str(merged)]) == 1


def test_verify_rederives_the_recipe_hash(merged) -> None:
    """The recipe edited and its digest in the manifest updated: the recipe hash still differs."""
    from merganser.analysis.verify import verify_output
    from merganser.storage.writer import file_digest

    recipe = merged / "merganser_recipe.yaml"
    recipe.write_text(recipe.read_text() + "# edited\n")
    manifest = merged / "merganser_manifest.json"
    _edit_json(
        manifest,
        lambda m: m["files"]["merganser_recipe.yaml"].update(
            blake3=file_digest(recipe), bytes=recipe.stat().st_size
        ),
    )
    with pytest.raises(MerganserError, match="recipe_sha256"):
        verify_output(merged)


def _journal(tmp_path, scores=None):
    from merganser.evaluation.evaluate import Score
    from merganser.search.journal import Journal

    j = Journal(tmp_path, "cfg", resume=False)
    j.record([("k1", "dev", {"t": Score(0.5, 1.0, 4)}), ("k2", "test", {"t": Score(1.0, 0.1, 4)})])
    j.close()
    return tmp_path / "evaluations.jsonl"


@pytest.mark.parametrize(
    "damage, line",
    [
        (lambda ls: ls.__setitem__(1, ls[1].replace('"accuracy": 0.5', '"accuracy": 4.95')), 2),
        (lambda ls: ls.insert(2, "garbage"), 3),
        (lambda ls: ls.insert(2, json.dumps({"key": "k3", "split": "dev", "scores": {}})), 3),
    ],
    ids=["edited-score", "garbage-line", "no-checksum"],
)
def test_damaged_journal_is_refused_with_its_line_unless_repaired(tmp_path, damage, line) -> None:
    from merganser.search.journal import Journal

    path = _journal(tmp_path)
    lines = path.read_text().splitlines()
    damage(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MerganserError, match=f"evaluations.jsonl:{line}: damaged journal line"):
        Journal(tmp_path, "cfg", resume=True)
    j = Journal(tmp_path, "cfg", resume=True, repair=True)
    j.close()
    assert j.dropped == [line]
    assert Journal(tmp_path, "cfg", resume=True).entries  # repaired: resumes cleanly now


def test_journal_scores_out_of_range_even_with_a_valid_checksum(tmp_path) -> None:
    from merganser.search.journal import Journal, _checksum

    path = _journal(tmp_path)
    body = {"key": "k9", "split": "dev", "scores": {"t": {"accuracy": 4.95, "loss": 0.0, "n": 1}}}
    with path.open("a") as f:
        f.write(json.dumps({**body, "sum": _checksum(body)}) + "\n")
    with pytest.raises(MerganserError, match=r"jsonl:4: damaged journal line \(accuracy 4.95"):
        Journal(tmp_path, "cfg", resume=True)


def test_journal_cut_mid_line_drops_that_line_with_a_notice(tmp_path, capsys) -> None:
    from merganser.search.journal import Journal

    path = _journal(tmp_path)
    path.write_bytes(path.read_bytes()[:-20])
    j = Journal(tmp_path, "cfg", resume=True)
    j.close()
    assert set(j.entries) == {("k1", "dev")} and j.dropped == [3]
    assert "evaluations.jsonl:3: dropped a line cut short" in capsys.readouterr().err


# -- 6. internal errors where a one-line error belongs -----------------------------------------


def _st(folder, raw_header: bytes, data: bytes = b""):
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(
        struct.pack("<Q", len(raw_header)) + raw_header + data
    )
    return folder


def test_json_nesting_bomb_in_a_safetensors_header(tmp_path, capsys) -> None:
    bomb = _st(tmp_path / "bomb", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert "nested deeper" in _one_line_error(capsys, "inspect", str(bomb))
    ms = _models(tmp_path, 1)
    _one_line_error(capsys, "merge", str(_linear(tmp_path, [ms[0], bomb])), str(tmp_path / "o"))


def test_json_nesting_bomb_in_calibration_data(tmp_path) -> None:
    from merganser.evaluation.calibrate import read_texts

    p = tmp_path / "d.jsonl"
    p.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(MerganserError, match=r"d\.jsonl:1: nested deeper"):
        read_texts(p)


def test_zip_and_align_without_tokenizer_files(tiny_family, tmp_path, capsys) -> None:
    base, e1, _ = tiny_family
    err = _one_line_error(
        capsys, "zip", str(base), str(e1), str(tmp_path / "z"), "--match", "weights"
    )
    assert "no tokenizer files" in err
    err = _one_line_error(capsys, "align", str(base), str(e1), str(tmp_path / "a"))
    assert "no tokenizer files" in err


def test_malicious_bin_is_refused_by_eval_and_calibrate_in_one_line(tiny_family, tmp_path, capsys):
    from merganser.evaluation.zoo.tokenizer import CharTokenizer

    sys.path.insert(0, os.path.dirname(__file__))
    from test_hostile_inputs import _Evil

    folder = tmp_path / "evil"
    shutil.copytree(tiny_family[0], folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch.save(
        {"model.embed_tokens.weight": torch.ones(2), "x": _Evil(str(marker))},
        folder / "pytorch_model.bin",
    )
    CharTokenizer().save(folder)
    err = _one_line_error(capsys, "eval", str(folder), "--tasks", "reverse", "--n", "1")
    assert "refused to load" in err
    data = tmp_path / "d.txt"
    data.write_text("abc\n")
    err = _one_line_error(
        capsys, "calibrate", str(folder), str(tmp_path / "s.safetensors"), "--data", str(data)
    )
    assert "refused to load" in err
    assert not marker.exists()


# -- 7. real layouts ------------------------------------------------------------------------------


def _hf_cache_model(root, tensors, shards=2):
    """A sharded model laid out as the Hugging Face cache does: snapshot files are links into
    the repository's blobs/.
    """
    from safetensors.torch import save_file

    repo = root / "models--org--name"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(blobs / f"blob{i}"))
        (snap / fname).symlink_to(f"../../blobs/blob{i}")
        weight_map.update(dict.fromkeys(part, fname))
    (blobs / "index").write_text(json.dumps({"weight_map": weight_map}))
    (snap / "model.safetensors.index.json").symlink_to("../../blobs/index")
    return snap


def test_hugging_face_cache_layout_is_followed_but_escapes_are_not(tmp_path, capsys) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"model.layers.{i}.w": torch.randn(4, 4, generator=g) for i in range(4)}
    snap = _hf_cache_model(tmp_path / "cache", tensors)
    plain = write_model(tmp_path / "plain", tensors)
    p = _linear(tmp_path, [snap, plain])
    assert main(["merge", str(p), str(tmp_path / "o"), "--no-progress"]) == 0
    out = load_folder(tmp_path / "o")
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    # A link out of the repository's blobs/ is still an escape.
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(snap.parent.parent / "blobs" / "blob0", outside)
    link = snap / "model-00001-of-00002.safetensors"
    link.unlink()
    link.symlink_to(outside)
    err = _one_line_error(capsys, "merge", str(p), str(tmp_path / "o2"))
    assert "outside the model folder" in err


# -- 8. accepted without a word -------------------------------------------------------------------


def test_duplicate_yaml_keys(tmp_path, capsys) -> None:
    ms = _models(tmp_path, 1)
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: linear\nmerge_method: ties\nmodels:\n  - model: {ms[0]}\n")
    assert "key 'merge_method' appears twice" in _one_line_error(
        capsys, "merge", str(p), str(tmp_path / "o")
    )


def test_a_yaml_key_repeated_with_the_same_value_is_read_once(tmp_path) -> None:
    """A published model card (Stellar-Odyssey-12b) gives merge_method twice, both the same:
    mergekit runs it, and so does merganser; different values stay an error (above).
    """
    from merganser.pipeline.recipe import load_recipe

    ms = _models(tmp_path, 1)
    p = tmp_path / "r.yaml"
    p.write_text(f"merge_method: linear\nmodels:\n  - model: {ms[0]}\nmerge_method: linear\n")
    assert load_recipe(p).merge_method == "linear"


def test_duplicate_tensor_keys_in_a_header(tmp_path, capsys) -> None:
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    h = b'{"w": ' + entry + b', "w": ' + entry + b"}"
    d = _st(tmp_path / "dup", h, b"\0" * 4)
    assert "key 'w' appears twice" in _one_line_error(capsys, "inspect", str(d))


def test_bytes_after_the_last_tensor(tmp_path, capsys) -> None:
    d = write_model(tmp_path / "m", {"w": torch.ones(4)})
    with (d / "model.safetensors").open("ab") as f:
        f.write(b"junk")
    assert "4 bytes after the last tensor" in _one_line_error(capsys, "inspect", str(d))


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"parameters": {"int8_mask": 2}}, "int8_mask: expected true or false"),
        ({"random_seed": 2**64}, "random_seed: expected an integer from 0 to 4294967295"),
        ({"random_seed": -1}, "random_seed: expected an integer"),
    ],
)
def test_values_that_were_accepted_without_a_word(tmp_path, capsys, extra, message) -> None:
    ms = _models(tmp_path, 3)
    recipe = {
        "merge_method": "ties",
        "base_model": str(ms[0]),
        "models": [{"model": str(m)} for m in ms[1:]],
        **extra,
    }
    p = write_recipe(tmp_path / "r.yaml", recipe)
    assert message in _one_line_error(capsys, "merge", str(p), str(tmp_path / "o"))


def test_tokenizer_source_without_a_tokenizer(tmp_path, capsys) -> None:
    ms = _models(tmp_path, 2)
    p = _linear(tmp_path, ms, tokenizer_source=str(ms[1]))
    assert "holds no tokenizer files" in _one_line_error(
        capsys, "merge", str(p), str(tmp_path / "o")
    )


def test_sizes_in_messages_use_a_unit_that_shows_them() -> None:
    assert size_text(512) == "512 B"
    assert size_text(3 * 2**20) == "3.0 MiB"
    assert size_text(1.5 * 2**30) == "1.50 GiB"


def test_unwritable_output_names_the_target_not_the_temporary_folder(
    tmp_path, capsys, monkeypatch
) -> None:
    """A read-only parent: the error named the hidden temporary folder beside the target.
    (Simulated: root, which runs CI, may write into read-only folders.)
    """
    from pathlib import Path

    ms = _models(tmp_path, 2)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if ".merganser-tmp-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    target = tmp_path / "ro" / "out"
    err = _one_line_error(capsys, "merge", str(_linear(tmp_path, ms)), str(target))
    assert f"{target}: cannot create output (Permission denied)" in err
    assert ".merganser-tmp" not in err


def test_a_closed_stdout_stops_quietly(tmp_path) -> None:
    """`merganser kinship ... | head` printed "merganser: error: : Broken pipe"."""
    import subprocess

    p = subprocess.Popen(
        [sys.executable, "-m", "merganser.cli", "methods"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()  # the reader goes away before the first line
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and err == b"", err
