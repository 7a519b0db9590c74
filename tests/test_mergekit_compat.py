"""Drop-in compatibility: the same YAML through mergekit 0.1.5 and merganser gives the same
tensors (deterministic methods: max |Δ| ≤ 1e-6 on float32 models; DARE/DELLA: kept fraction and
L1 mass within statistical tolerance).

mergekit lives in its own venv (``make mergekit-venv``, done by CI); without it these tests
are skipped with that reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, load_folder, venv_python

import merganser
from merganser.evaluation.tiny import build_family

MK_PYTHON = venv_python("MERGEKIT_PYTHON", ".venv-mergekit", "mergekit")
pytestmark = pytest.mark.skipif(
    MK_PYTHON is None,
    reason="mergekit 0.1.5 is not installed: run `make mergekit-venv` (CI does) to compare",
)


def _configs(base: str, e1: str, e2: str) -> dict[str, dict]:
    ta = {
        "base_model": base,
        "models": [
            {"model": e1, "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": e2, "parameters": {"weight": [0.2, 0.9], "density": 0.3}},
        ],
    }
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": base, "parameters": {"weight": 0.3}},
                {"model": e1, "parameters": {"weight": 0.5}},
                {"model": e2, "parameters": {"weight": 0.2}},
            ],
        },
        "linear_raw": {
            "merge_method": "linear",
            "parameters": {"normalize": False},
            "models": [
                {"model": e1, "parameters": {"weight": 0.6}},
                {"model": e2, "parameters": {"weight": [0.1, 0.8]}},
            ],
        },
        "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}, **ta},
        "ties": {"merge_method": "ties", **ta},
        "ties_filters": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {
                    "model": e1,
                    "parameters": {
                        "weight": 1.0,
                        "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}],
                    },
                },
                {"model": e2, "parameters": {"weight": 0.5, "density": 0.4}},
            ],
            "parameters": {"normalize": False, "lambda": 1.3},
        },
        "breadcrumbs": {"merge_method": "breadcrumbs", "parameters": {"gamma": 0.05}, **ta},
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "parameters": {"gamma": 0.05},
            **ta,
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": e1}, {"model": e2}],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": e1}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": e1, "parameters": {"weight": 0.3}},
                {"model": e2, "parameters": {"weight": 0.7}},
            ],
        },
        "passthrough": {"merge_method": "passthrough", "models": [{"model": e1}]},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": e1}],
            "parameters": {"t": 0.01},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": e1}],
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": e1}, {"model": e2}],
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": e1}, {"model": e2}],
            "parameters": {"r": 0.5, "alpha": 0.9},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": e1, "parameters": {"weight": 0.3}},
                {"model": e2, "parameters": {"weight": 0.7}},
            ],
        },
        "slices": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": e1, "layer_range": [0, 3]}]},
                {"sources": [{"model": e2, "layer_range": [1, 4]}]},
            ],
        },
    }


def _stochastic(base: str, e1: str, e2: str) -> dict[str, dict]:
    two = {
        "base_model": base,
        "models": [
            {"model": e1, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": e2, "parameters": {"weight": 0.4, "density": 0.5}},
        ],
    }
    return {
        "dare_linear": {"merge_method": "dare_linear", **two},
        "dare_ties": {"merge_method": "dare_ties", **two},
        "della": {"merge_method": "della", "parameters": {"epsilon": 0.1, "lambda": 1.1}, **two},
        "della_linear": {"merge_method": "della_linear", "parameters": {"epsilon": 0.1}, **two},
    }


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    base, e1, e2 = (
        str(p)
        for p in build_family(
            root / "models",
            experts=2,
            seed=5,
            dtype=torch.float32,
            layers=4,
            hidden_size=64,
            intermediate=128,
            vocab_size=256,
        )
    )
    configs = {**_configs(base, e1, e2), **_stochastic(base, e1, e2)}
    args = []
    for name, cfg in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        args += [str(root / f"{name}.yaml"), str(root / "mk" / name)]
    r = subprocess.run(
        [MK_PYTHON, str(REPO / "tests/compat/mergekit_driver.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ours = {}
    for name in configs:
        merganser.merge(
            root / f"{name}.yaml", root / "ours" / name, merganser.MergeOptions(progress=False)
        )
        ours[name] = (load_folder(root / "mk" / name), load_folder(root / "ours" / name))
    return ours, load_folder(Path(base))


@pytest.mark.parametrize("name", list(_configs("b", "e1", "e2")))
def test_same_tensors_as_mergekit(outputs, name) -> None:
    mk, ours = outputs[0][name]
    assert mk.keys() == ours.keys()
    worst = max(float((mk[k].float() - ours[k].float()).abs().max()) for k in mk)
    assert worst <= 1e-6, f"{name}: max |mergekit - merganser| = {worst}"


@pytest.mark.parametrize("name", list(_stochastic("b", "e1", "e2")))
def test_stochastic_methods_match_mergekit_in_expectation(outputs, name) -> None:
    (mk, ours), base = outputs[0][name], outputs[1]
    big = [k for k, v in base.items() if v.numel() >= 8192]
    for k in big:
        dm, do = mk[k] - base[k], ours[k] - base[k]
        kept_m, kept_o = (dm != 0).float().mean().item(), (do != 0).float().mean().item()
        # both draw Bernoulli masks of the same density: 5 sigma of the kept fraction
        assert abs(kept_m - kept_o) < 5 * (0.25 / dm.numel()) ** 0.5 * 2 + 0.01, (name, k)
        l1_m, l1_o = dm.abs().sum().item(), do.abs().sum().item()
        assert abs(l1_m - l1_o) / l1_m < 0.08, (name, k, l1_m, l1_o)


def _mergekit(tmp_path: Path, cfg: dict, name: str) -> dict[str, torch.Tensor]:
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [MK_PYTHON, str(REPO / "tests/compat/mergekit_driver.py"), str(tmp_path / f"{name}.yaml"),
         str(tmp_path / "mk" / name)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return load_folder(tmp_path / "mk" / name)


def _both_ties(tmp_path: Path, base: Path, e1: Path, e2: Path) -> tuple[dict, dict]:
    """TIES (weights 0.6/0.4, density 0.5, float32) through mergekit and merganser."""
    cfg = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(e1), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(e2), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "dtype": "float32",
    }
    mk = _mergekit(tmp_path, cfg, "ties")
    merganser.merge(cfg, tmp_path / "ours", merganser.MergeOptions(progress=False))
    return mk, load_folder(tmp_path / "ours")


def test_mixtral_ties_difference_is_mergekits_fused_expert_bank(tmp_path) -> None:
    """docs/anatomy.md: mergekit 0.1.5 (with transformers 5) writes Mixtral's experts as
    transformers' fused bank (``mlp.experts.gate_up_proj``: every expert's w1 and w3) and trims
    over it; merganser keeps the checkpoint's per-expert tensors and trims each. Everything
    else is equal, and mergekit's bank is exactly TIES over the fused inputs.
    """
    from families import build_family as build

    base, e1, e2 = build("mixtral", tmp_path / "m")
    mk, ours = _both_ties(tmp_path, base, e1, e2)
    for k in set(mk) & set(ours):
        assert torch.equal(mk[k], ours[k]), k
    ins = [load_folder(p) for p in (base, e1, e2)]
    experts = 4
    for layer in range(4):
        p = f"model.layers.{layer}.block_sparse_moe"
        assert torch.equal(mk[f"model.layers.{layer}.mlp.gate.weight"], ours[f"{p}.gate.weight"])

        def bank(sd, p=p):
            up = [torch.cat([sd[f"{p}.experts.{e}.w1.weight"], sd[f"{p}.experts.{e}.w3.weight"]])
                  for e in range(experts)]  # fmt: skip
            return torch.stack(up), torch.stack(
                [sd[f"{p}.experts.{e}.w2.weight"] for e in range(experts)]
            )

        b, x, y = (bank(sd) for sd in ins)
        fused_ours = bank(ours)
        for j, name in enumerate(("gate_up_proj", "down_proj")):
            theirs = mk[f"model.layers.{layer}.mlp.experts.{name}"]
            want = merganser.merge_tensors(
                "ties", [x[j], y[j]], base=b[j], weight=[0.6, 0.4], density=[0.5, 0.5]
            )
            assert torch.equal(theirs, want)
            assert not torch.equal(theirs, fused_ours[j])  # per-expert trimming differs


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "gemma2",
        "gemma3",
        "phi3",
        "gpt2",
        "roberta",
        "vit",
    ],
)
def test_families_match_mergekit(tmp_path, family) -> None:
    """Linear and TIES over other families give mergekit's tensors (where mergekit runs them)."""
    from families import build_family as build

    base, e1, e2 = build(family, tmp_path / "m")
    mk, ours = _both_ties(tmp_path, base, e1, e2)
    if family == "qwen3_moe":  # experts: mergekit writes transformers' fused bank (see above)
        assert {k for k in ours if ".experts." in k} and not {
            k for k in mk if ".experts." in k and k.endswith(".weight")
        }
        ours = {k: v for k, v in ours.items() if ".experts." not in k}
        mk = {k: v for k, v in mk.items() if ".experts." not in k}
    if family == "vit":  # mergekit 0.1.5 writes 8 of ViT's 72 tensors without a word
        assert set(mk) < set(ours) and len(ours) == len(load_folder(base)) == 72
        ours = {k: ours[k] for k in mk}
    assert mk.keys() == ours.keys(), sorted(set(mk) ^ set(ours))[:4]
    worst = max(float((mk[k] - ours[k]).abs().max()) for k in mk)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("kind", ["linear", "slerp", "task_arithmetic", "slices"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"])
def test_family_recipes_match_mergekit(tmp_path, family, kind) -> None:
    """The rest of the family matrix (linear, SLERP with filtered gradients, task arithmetic
    with a weight gradient, an overlapping frankenmerge) through both tools: the same tensors,
    where mergekit 0.1.5 can run the recipe at all.
    """
    from families import build_family as build
    from test_families import _recipe

    base, e1, e2 = build(family, tmp_path / "m")
    cfg = {**_recipe(kind, base, e1, e2), "dtype": "float32"}
    if kind == "linear":  # mergekit requires the weights (merganser's default is 1)
        cfg["models"] = [{**m, "parameters": {"weight": 0.5}} for m in cfg["models"]]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [MK_PYTHON, str(REPO / "tests/compat/mergekit_driver.py"), str(tmp_path / "r.yaml"),
         str(tmp_path / "mk")],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    merganser.merge(tmp_path / "r.yaml", tmp_path / "ours", merganser.MergeOptions(progress=False))
    ours = load_folder(tmp_path / "ours")
    if kind == "slices" and family in ("qwen2", "qwen3", "gemma2", "gemma3"):
        # mergekit keeps layer_types at 4 entries for 6 layers, and its own config check stops
        # it; merganser rebuilds layer_types (test_families checks the result loads).
        assert r.returncode != 0 and "layer_types" in r.stderr
        return
    assert r.returncode == 0, r.stderr[-3000:]
    mk = load_folder(tmp_path / "mk")
    assert mk.keys() == ours.keys(), sorted(set(mk) ^ set(ours))[:4]
    worst = max(float((mk[k] - ours[k]).abs().max()) for k in mk)
    assert worst <= 1e-6, worst
