"""Fuzzed recipes never crash with a traceback: each either merges or is rejected in one line."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import yaml
from conftest import write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merganser.analysis.verify import verify_output
from merganser.cli import main
from merganser.methods import all_methods

EXAMPLES = 300
STATS = {"tried": 0, "merged": 0, "rejected": 0}


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    print(f"\nfuzzed recipes: {STATS}")
    assert STATS["merged"] > 0 and STATS["rejected"] > 0, f"one outcome never happened: {STATS}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzmodels")
    g = torch.Generator().manual_seed(0)
    base = {
        "model.layers.0.mlp.weight": torch.randn(8, 4, generator=g),
        "model.layers.1.mlp.weight": torch.randn(8, 4, generator=g),
        "model.embed_tokens.weight": torch.randn(6, 4, generator=g),
        "ids": torch.arange(3),
    }
    paths = {}
    for i in range(3):
        t = {
            k: (v + 0.1 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v)
            for k, v in base.items()
        }
        paths[f"m{i}"] = str(write_model(root / f"m{i}", t, {"num_hidden_layers": 2}))
    return paths


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    floats,
    st.floats(-0.5, 1.5),
    st.text(max_size=4),
    st.lists(st.floats(-1, 2), min_size=1, max_size=6),
    st.lists(st.floats(0, 1), min_size=4090, max_size=4200),
    st.lists(
        st.fixed_dictionaries(
            {"value": st.floats(-1, 2)}, optional={"filter": st.sampled_from(["mlp", "embed", "x"])}
        ),
        max_size=3,
    ),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.lists(st.none()),
)
names = st.sampled_from(
    [
        "weight",
        "density",
        "lambda",
        "normalize",
        "gamma",
        "epsilon",
        "t",
        "rescale",
        "scope",
        "sign_method",
        "select_topk",
        "filter_wise",
        "bogus",
        "int8_mask",
        "max_iter",
        "normalise",
        "factor",
    ]
)
params = st.dictionaries(names, values, max_size=4)
methods = st.sampled_from([m.name for m in all_methods()] + ["nope", "", "TIES"])


def mutated_valid(models: dict[str, str]):
    """A valid recipe for a random method, with a few parameters set to fuzzed values."""
    m0, m1, m2 = models.values()
    return st.builds(
        lambda method, p, w: {
            "merge_method": method,
            "base_model": m0,
            "models": [{"model": m1, "parameters": w}, {"model": m2}],
            "parameters": p,
        },
        st.sampled_from(
            [m.name for m in all_methods() if m.name not in ("passthrough", "slerp", "reborn")]
        ),
        st.dictionaries(names, values | st.floats(0.05, 0.95), max_size=2),
        st.dictionaries(
            st.sampled_from(["weight", "density", "gamma", "epsilon"]),
            st.floats(0.05, 0.95) | values,
            max_size=2,
        ),
    )


def recipes(models: dict[str, str]):
    ref = st.sampled_from([*models.values(), "missing/model", ""])
    entry = st.fixed_dictionaries({"model": ref}, optional={"parameters": params | values})
    slices = st.lists(
        st.fixed_dictionaries(
            {
                "sources": st.lists(
                    st.fixed_dictionaries(
                        {
                            "model": ref,
                            "layer_range": st.lists(st.integers(-1, 3), min_size=2, max_size=2),
                        }
                    ),
                    max_size=2,
                )
            }
        ),
        max_size=2,
    )
    return st.fixed_dictionaries(
        {"merge_method": methods | values},
        optional={
            "base_model": ref | values,
            "models": st.lists(entry, max_size=3) | values,
            "parameters": params | values,
            "slices": slices,
            "dtype": st.sampled_from(["bfloat16", "float16", "fp32", "int8"]) | values,
            "out_dtype": st.sampled_from(["bfloat16", "float32"]),
            "random_seed": st.integers(-5, 2**40) | values,
            "vocab_policy": values,
            "unknown_key": values,
        },
    )


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_fuzzed_recipe(data, models, tmp_path, capsys) -> None:
    recipe = data.draw(recipes(models) | mutated_valid(models))
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    rc = main(["merge", str(path), str(out), "--force", "--no-progress"])
    # Warnings (a filter matching no tensor...) are lines of their own; the error is one line.
    lines = capsys.readouterr().err.splitlines(keepends=True)
    err = "".join(ln for ln in lines if not ln.startswith("merganser: warning: "))
    STATS["tried"] += 1
    assert rc in (0, 1), f"rc={rc}: {err}"
    if rc == 1:
        STATS["rejected"] += 1
        assert err.count("\n") == 1 and err.startswith("merganser: error: "), err
        assert "Traceback" not in err
        if os.environ.get("FUZZ_SHOW"):
            sys.__stderr__.write(err)
    else:
        STATS["merged"] += 1
        verify_output(out)
        for f in out.glob("*.safetensors"):
            from safetensors.torch import load_file

            for t in load_file(str(f)).values():
                assert not t.is_floating_point() or bool(torch.isfinite(t).all())
