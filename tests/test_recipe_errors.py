"""Every bad recipe is one clear line (file, key, expectation), a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_folder, run_cli, write_model, write_recipe

from merganser.cli import main


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {
        "base": write_model(tmp_path / "base", {"w": w, "ids": torch.arange(3)}),
        "a": write_model(tmp_path / "a", {"w": w + 1, "ids": torch.arange(3)}),
        "b": write_model(tmp_path / "b", {"w": w + 2, "ids": torch.arange(3)}),
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
    "misspelt parameter gets a suggestion": (
        lambda m: _ta(m, parameters={"lamdba": 0.5}),
        "(did you mean 'lambda'?)",
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
        "method 'passthrough' merges at most 1 model, got 2",
    ),
    "slerp given three models counts them as written": (
        lambda m: {
            "merge_method": "slerp",
            "base_model": str(m["base"]),
            "models": [{"model": str(m["base"])}, {"model": str(m["a"])}, {"model": str(m["b"])}],
            "parameters": {"t": 0.5},
        },
        "merges at most 2 models (the base_model and one other), got 3",
    ),
    "top-level typo is named, with the key it resembles": (
        lambda m: {"merge_methd": "linear", "models": [{"model": str(m["a"])}]},
        "merge_methd: unknown key (did you mean 'merge_method'?)",
    ),
    "nested typo": (
        lambda m: _ta(m, models=[{"model": str(m["a"]), "parameter": {"weight": 1}}]),
        "models[0].parameter: unknown key (did you mean 'parameters'?)",
    ),
    "unknown method gets a suggestion": (
        lambda m: {**_ta(m), "merge_method": "tie"},
        "unknown merge method 'tie' (did you mean 'ties'?",
    ),
    "a mergekit-moe config": (
        lambda m: {
            "base_model": str(m["base"]),
            "gate_mode": "hidden",
            "experts": [{"source_model": str(m["a"]), "positive_prompts": ["x"]}],
        },
        "a mergekit-moe config (it has experts:)",
    ),
    "a boolean given as a number other than 0 or 1": (
        lambda m: _ta(m, parameters={"normalize": 0.5}),
        "parameters.normalize (tensor w): expected true or false (or 1 or 0), got 0.5",
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
    from merganser.storage.checkpoint import Checkpoint

    monkeypatch.setattr(Checkpoint, "read", lambda *a, **k: pytest.fail("tensor data was read"))
    recipe = _ta(models, tokenizer_source=source)
    with pytest.raises(merganser.MerganserError, match="tokenizer_source"):
        merganser.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_numeric_booleans_are_read_as_model_cards_write_them(models, tmp_path) -> None:
    """`normalize: 1.0` (a number where a boolean is meant, as mergekit accepts) was refused."""
    import merganser

    outs = {}
    for flag in (1.0, True, 0, False):
        recipe = write_recipe(
            tmp_path / f"r{flag!r}.yaml",
            {"merge_method": "linear", "parameters": {"normalize": flag},
             "models": [{"model": str(models["a"]), "parameters": {"weight": 2.0}}]},
        )  # fmt: skip
        outs[repr(flag)] = load_folder(merganser.merge(recipe, tmp_path / f"o{flag!r}"))["w"]
    a = load_folder(models["a"])["w"]
    assert torch.equal(outs["1.0"], a) and torch.equal(outs["True"], a)
    assert torch.equal(outs["0"], 2 * a) and torch.equal(outs["False"], 2 * a)


def test_another_methods_parameter_warns_as_mergekit_accepts_it(models, tmp_path, capsys) -> None:
    """A published recipe (YOYO-AI/Qwen2.5-14B-Fusion) gives arcee_fusion `normalize` and
    `rescale`, which mergekit never reads: a warning, not a refusal (--strict refuses).
    """
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "arcee_fusion", "base_model": str(models["base"]),
         "models": [{"model": str(models["a"])}],
         "parameters": {"normalize": True, "rescale": False}},
    )  # fmt: skip
    r = run_cli("merge", str(recipe), str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "parameters.normalize: has no effect on method 'arcee_fusion'" in r.stderr
    r = run_cli("merge", str(recipe), str(tmp_path / "o2"), "--strict")
    assert r.returncode == 1 and "(--strict)" in r.stderr


def test_a_global_parameter_set_per_model_warns_and_is_not_used(models, tmp_path) -> None:
    """Published recipes (YOYO-AI/Qwen2.5-7B-YOYO-super) set della's lambda per model; mergekit
    reads only the top-level value (its output is unchanged by the per-model one), so this
    was a refusal and is now a warning naming the key; --strict refuses.
    """
    per_model = _ta(models, models=[{"model": str(models["a"]), "parameters": {"lambda": 2}}])
    r = run_cli("merge", str(write_recipe(tmp_path / "r.yaml", per_model)), str(tmp_path / "o"))
    assert r.returncode == 0 and "'lambda' is a global parameter" in r.stderr
    plain = run_cli(
        "merge", str(write_recipe(tmp_path / "p.yaml", _ta(models))), str(tmp_path / "p")
    )
    assert plain.returncode == 0
    assert torch.equal(load_folder(tmp_path / "o")["w"], load_folder(tmp_path / "p")["w"])
    strict = run_cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "o2"), "--strict")
    assert strict.returncode == 1 and "(--strict)" in strict.stderr


def test_numbers_that_yaml_reads_as_strings_are_numbers(models, tmp_path) -> None:
    """YAML 1.1 reads ``1e-10`` (no dot) as a string; mergekit (pydantic) takes it as a number,
    and a published card (Vortex5/Velvet-Orchid-12B: ``tol: 1e-10``) relies on it. It was
    refused ("expected a number"). A word is still refused.
    """
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
        f"models:\n  - model: {models['a']}\n    parameters:\n      weight: 5e-1\n"
    )
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress"]) == 0
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert torch.equal(load_folder(out)["w"], w + 0.5)
    recipe.write_text(recipe.read_text().replace("5e-1", "half"))
    assert main(["merge", str(recipe), str(tmp_path / "o2"), "--no-progress"]) == 1
