"""Every bad recipe is one clear line (file, key, expectation), a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_model, write_recipe

from merganser.cli import main


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {
        "base": write_model(tmp_path / "base", {"w": w, "ids": torch.arange(3)}),
        "a": write_model(tmp_path / "a", {"w": w + 1, "ids": torch.arange(3)}),
        "wide": write_model(tmp_path / "wide", {"w": torch.zeros(2, 4), "ids": torch.arange(3)}),
        "intw": write_model(
            tmp_path / "intw", {"w": torch.zeros(2, 3, dtype=torch.int32), "ids": torch.arange(3)}
        ),
        "nokey": write_model(tmp_path / "nokey", {"ids": torch.arange(3)}),
    }


def _ta(m: dict[str, Path], **over: object) -> dict:
    r = {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [{"model": str(m["a"])}],
    }
    r.update(over)
    return r


CASES = {
    "unknown top-level key": (
        lambda m: {**_ta(m), "merge_methd": "ties"},
        "merge_methd: unknown key",
    ),
    "unknown nested key": (
        lambda m: _ta(m, models=[{"model": str(m["a"]), "weight": 1}]),
        "models[0].weight: unknown key",
    ),
    "wrong type for models": (lambda m: _ta(m, models=5), "models: input should be a valid list"),
    "string weight": (
        lambda m: _ta(m, models=[{"model": str(m["a"]), "parameters": {"weight": "heavy"}}]),
        "models[0].parameters.weight (tensor w): expected a number, got 'heavy'",
    ),
    "bool expected": (
        lambda m: _ta(m, parameters={"normalize": "yes"}),
        "parameters.normalize (tensor w): expected true or false",
    ),
    "missing model": (
        lambda m: _ta(m, models=[{"model": str(m["base"].parent / "nope")}]),
        "no such file or directory",
    ),
    "shape mismatch": (
        lambda m: _ta(m, models=[{"model": str(m["wide"])}]),
        "tensor 'w': shape [2, 4] does not match [2, 3]",
    ),
    "dtype mismatch": (
        lambda m: _ta(m, models=[{"model": str(m["intw"])}]),
        "tensor 'w': dtype torch.int32 cannot be merged with torch.float32",
    ),
    "missing tensor": (
        lambda m: _ta(m, models=[{"model": str(m["nokey"])}]),
        "tensor 'w': missing",
    ),
    "unknown method": (
        lambda m: _ta(m, merge_method="tie"),
        "merge_method: unknown merge method 'tie'",
    ),
    "unknown parameter": (
        lambda m: _ta(m, parameters={"lamda": 0.5}),
        "parameters.lamda: unknown parameter for method 'task_arithmetic'",
    ),
    "global parameter per model": (
        lambda m: _ta(m, models=[{"model": str(m["a"]), "parameters": {"lambda": 2}}]),
        "'lambda' is a global parameter",
    ),
    "nan weight": (
        lambda m: _ta(m, parameters={"weight": float("nan")}),
        "weight: must be a finite",
    ),
    "inf in gradient": (
        lambda m: _ta(m, parameters={"weight": [0.0, float("inf")]}),
        "weight: must be a finite number",
    ),
    "mixed gradient": (
        lambda m: _ta(m, parameters={"weight": [0.1, "x"]}),
        "parameters.weight: expected a number, a list of numbers",
    ),
    "bad filter entry": (
        lambda m: _ta(m, parameters={"weight": [{"filtr": "mlp", "value": 1}]}),
        "parameters.weight[0]: unknown key 'filtr'",
    ),
    "empty models": (lambda m: _ta(m, models=[]), "models: at least one model is required"),
    "needs base": (
        lambda m: {"merge_method": "task_arithmetic", "models": [{"model": str(m["a"])}]},
        "base_model: method 'task_arithmetic' needs a base_model",
    ),
    "zero weight sum": (
        lambda m: {
            "merge_method": "linear",
            "models": [
                {"model": str(m["a"]), "parameters": {"weight": 1}},
                {"model": str(m["base"]), "parameters": {"weight": -1}},
            ],
        },
        "weights sum to zero",
    ),
    "bad dtype": (lambda m: _ta(m, out_dtype="float8"), "out_dtype: unknown dtype 'float8'"),
    "too many models for passthrough": (
        lambda m: {
            "merge_method": "passthrough",
            "models": [{"model": str(m["a"])}, {"model": str(m["base"])}],
        },
        "takes at most 1 model(s), got 2",
    ),
    "top level not a mapping": (lambda m: [1, 2], "expected a YAML mapping at the top level"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_recipe_gives_one_line(case, models, tmp_path, capsys) -> None:
    build, expected = CASES[case]
    recipe = write_recipe(tmp_path / "bad.yaml", build(models))
    rc = main(["merge", str(recipe), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("merganser: error: "), err
    assert str(recipe) in err or str(tmp_path) in err, err
    assert expected in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_invalid_yaml_names_the_line(tmp_path, capsys) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("merge_method: linear\nmodels: [\n  - a\n")
    assert main(["merge", str(p), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"merganser: error: {p}: invalid YAML at line") and err.count("\n") == 1


def test_non_empty_output_needs_force(models, tmp_path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ta(models))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["merge", str(recipe), str(out)]) == 1
    assert "output folder exists and is not empty (use --force)" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["merge", str(recipe), str(out), "--force", "--no-progress"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_inside_an_input_is_refused(models, tmp_path, capsys) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ta(models))
    assert main(["merge", str(recipe), str(models["a"]), "--force"]) == 1
    assert "overlaps input" in capsys.readouterr().err
    assert (models["a"] / "model.safetensors").is_file()


def test_real_process_prints_no_traceback(models, tmp_path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _ta(models, merge_method="nope"))
    r = run_cli("merge", str(recipe), str(tmp_path / "o"))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("source", ["union", "no/such/model"])
def test_bad_tokenizer_source_fails_before_any_tensor_is_read(
    models, tmp_path, monkeypatch, source
) -> None:
    import merganser
    from merganser.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("tensor data was read"))
    recipe = _ta(models, tokenizer_source=source)
    with pytest.raises(merganser.MerganserError, match="tokenizer_source"):
        merganser.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
