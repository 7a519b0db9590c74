"""Merge search: Evolver (spec §6), CMA-ES, kinship-guided greedy merging (spec §11.2), and
`merganser evolve` end to end: parallel determinism, kill-and-resume, a real local Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli

from merganser.search.cmaes import CMAConfig, Genome, cma_search
from merganser.search.common import StateDict
from merganser.search.evolver import EvolverConfig, crossover, evolve, mutate
from merganser.search.kinship_greedy import greedy_merge_search, slerp_merger


class DistanceScorer:
    """dev(x) = −‖x − c‖ (spec §6.3's deterministic fitness); records every call."""

    def __init__(self, target: StateDict):
        self.target = target
        self.calls: list[list[float]] = []
        self.generations: list[tuple[int, float]] = []

    def value(self, sd: StateDict) -> float:
        return -float(
            sum((sd[k].float() - t).square().sum() for k, t in self.target.items()) ** 0.5
        )

    def __call__(self, candidates: Sequence[StateDict]) -> list[float]:
        out = [self.value(c) for c in candidates]
        self.calls.append(out)
        return out

    def generation(self, gen: int, best: StateDict, best_dev: float) -> None:
        assert self.value(best) == pytest.approx(best_dev)  # reported best is what was scored
        self.generations.append((gen, best_dev))


def _models(n: int, seed: int = 0, size: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "model.layers.0.w": torch.randn(size, generator=g),
            "model.layers.1.w": torch.randn(size, generator=g),
            "lm_head.weight": torch.randn(8, generator=g),
        }
        for _ in range(n)
    ]


def test_spec_6_3_mutation_and_crossover() -> None:
    pop = torch.stack([torch.zeros(4), torch.ones(4)])
    m = mutate(pop, 0, 0.5, [1])
    assert m.tolist() == [0.5] * 4
    child = crossover(pop[0], m, 0.5, torch.tensor([0.1, 0.7, 0.3, 0.9]))
    assert child.tolist() == [0.5, 0.0, 0.5, 0.0]


def test_spec_6_3_acceptance_standalone() -> None:
    # x0 = 0, x1 = 1 with c = 0.5: any child of x0 with a 0.5 moves closer, so it is accepted.
    models = [{"w": torch.zeros(4)}, {"w": torch.ones(4)}]
    score = DistanceScorer({"w": torch.full((4,), 0.5)})
    r = evolve(models, score, EvolverConfig(mode="standalone", generations=1, seed=3))
    assert r.start_dev == pytest.approx(-1.0)
    assert r.dev > r.start_dev
    assert set(r.best["w"].tolist()) <= {0.0, 0.5, 1.0}


@pytest.mark.parametrize("mode", ["standalone", "merger"])
@pytest.mark.parametrize("schedule", ["batch", "sequential"])
def test_evolver_never_accepts_a_worse_dev(mode: str, schedule: str) -> None:
    models = _models(5)
    target = {k: 0.3 * models[0][k] + 0.7 * models[3][k] for k in models[0]}
    score = DistanceScorer(target)
    cfg = EvolverConfig(mode=mode, schedule=schedule, generations=6, f=0.5, cr=0.5, seed=1)  # type: ignore[arg-type]
    r = evolve(models, score, cfg)
    devs = [d for _, d in score.generations]
    assert [g for g, _ in score.generations] == list(range(7))
    assert devs == sorted(devs)  # best-so-far by dev never falls
    assert r.dev == devs[-1] > r.start_dev
    assert score.value(r.best) == pytest.approx(r.dev)
    if mode == "merger":  # the result is the merge (average) of the final population
        assert r.evaluations == sum(len(c) for c in score.calls)


def test_evolver_is_reproducible_and_seed_dependent() -> None:
    models = _models(4)
    target = {k: models[1][k] * 0.5 for k in models[0]}
    runs = [
        evolve(models, DistanceScorer(target), EvolverConfig(mutation=m, generations=3, seed=s))
        for m, s in (("rand1", 0), ("rand1", 0), ("rand1", 1))
    ]
    assert torch.equal(runs[0].best["model.layers.0.w"], runs[1].best["model.layers.0.w"])
    assert not torch.equal(runs[0].best["model.layers.0.w"], runs[2].best["model.layers.0.w"])


def test_evolver_rand1_needs_four_models() -> None:
    from merganser.errors import MerganserError

    with pytest.raises(MerganserError, match="rand1 needs at least four"):
        evolve(_models(3), DistanceScorer(_models(1)[0]), EvolverConfig(mutation="rand1"))


def test_cmaes_finds_the_task_vector_weights() -> None:
    base = _models(1, seed=9)[0]
    models = _models(2, seed=4)
    target = {
        k: base[k] + 0.3 * (models[0][k] - base[k]) + 0.9 * (models[1][k] - base[k]) for k in base
    }
    score = DistanceScorer(target)
    cfg = CMAConfig(
        method="task_arithmetic", start={"weight": 0.5}, generations=25, popsize=8, sigma=0.2
    )
    r = cma_search(models, score, cfg, base)
    assert r.dev > r.start_dev
    w = r.details["params"]["weight"][0]
    assert w == pytest.approx([0.3, 0.9], abs=0.05)
    assert r.evaluations == 1 + 25 * 8


def test_cmaes_layer_groups() -> None:
    keys = [f"model.layers.{i}.w" for i in range(4)] + ["model.embed_tokens.weight"]
    g = Genome(CMAConfig(optimize=("weight", "density"), method="ties", layer_groups=2), 3, keys)
    assert g.groups == 3 and g.dim == 2 * 3 * 3
    assert [g.group(k) for k in keys] == [0, 0, 1, 1, 2]
    vals = g.values(g.x0)
    assert vals["weight"].shape == (3, 3)
    assert vals["weight"] == pytest.approx(1 / 3)  # default start: a uniform average
    assert vals["density"] == pytest.approx(0.5)


def test_cmaes_rejects_a_global_parameter() -> None:
    from merganser.errors import MerganserError

    with pytest.raises(MerganserError, match="'lambda' is not a per-model parameter"):
        Genome(CMAConfig(optimize=("lambda",)), 2, ["w"])


def test_kinship_greedy_explores_the_most_distant_relative() -> None:
    base = {"model.layers.0.w": torch.zeros(6)}
    e = torch.eye(6)
    # Three near-identical strong models and two weak ones; model 4 points away from the top.
    pool = [
        {"model.layers.0.w": v}
        for v in (e[0] + 0.01 * e[1], e[0], e[0] + 0.01 * e[2], e[0] + e[3], -e[0])
    ]
    target = {"model.layers.0.w": e[0] + 0.3 * e[3]}  # model 1 is best, models 0 and 2 next

    def average(a: StateDict, b: StateDict) -> dict[str, torch.Tensor]:
        return {k: (a[k] + b[k]) / 2 for k in a}

    explore = greedy_merge_search(pool, average, DistanceScorer(target), base, k=3, generations=4)
    assert explore.history[0]["explored"] == ["model1", "model4"]  # most negative Pearson
    plain = greedy_merge_search(
        pool, average, DistanceScorer(target), base, k=3, generations=4, explore=False
    )
    assert all(h["explored"] is None for h in plain.history)
    # Generation 1 of plain greedy gains nothing over the top 3; the search stops there.
    assert len(plain.history) == 1 and plain.dev == plain.start_dev


def test_slerp_merger_uses_the_layer_schedule() -> None:
    a = {"model.layers.0.self_attn.q.weight": torch.tensor([1.0, 0.0]),
         "model.layers.1.self_attn.q.weight": torch.tensor([1.0, 0.0]),
         "model.layers.0.mlp.up.weight": torch.tensor([1.0, 0.0])}  # fmt: skip
    b = {k: torch.tensor([0.0, 1.0]) for k in a}
    out = slerp_merger()(a, b)
    # self_attn schedule [0, .5, .3, .7, 1]: layer 0 -> t=0 (a), last layer -> t=1 (b)
    assert out["model.layers.0.self_attn.q.weight"].tolist() == pytest.approx([1.0, 0.0])
    assert out["model.layers.1.self_attn.q.weight"].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert out["model.layers.0.mlp.up.weight"].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


# --- merganser evolve, end to end on the reduced zoo --------------------------------------


def _search_file(zoo: Path, tmp: Path, strategy: str = "evolver", **extra: object) -> Path:
    root = zoo / "zoo" / "seed0"
    cfg = {
        "strategy": strategy,
        "models": [str(root / "expert_reverse"), str(root / "expert_add")],
        "base_model": str(root / "base"),
        "evaluator": {"tasks": ["reverse", "add"], "n": 24},
        "seed": 0,
        "evolver": {
            "generations": 3,
            "merger": {"method": "task_arithmetic", "parameters": {"lambda": 0.8}},
        },
        **extra,
    }
    p = tmp / f"{strategy}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _report(out: Path) -> dict:
    return json.loads((out / "search.json").read_text())


@pytest.mark.slow
def test_evolve_cli_processes_match_in_process(reduced_zoo: Path, tmp_path: Path) -> None:
    s = _search_file(reduced_zoo, tmp_path)
    one = run_cli("evolve", str(s), str(tmp_path / "one"), "--workers", "1")
    two = run_cli("evolve", str(s), str(tmp_path / "two"), "--workers", "2")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    r1, r2 = _report(tmp_path / "one"), _report(tmp_path / "two")
    assert r2["backend"] == "processes" and r2["workers"] == 2
    assert r1["best"] == r2["best"] and r1["generations"] == r2["generations"]
    assert (tmp_path / "one/best/model.safetensors").read_bytes() == (
        tmp_path / "two/best/model.safetensors"
    ).read_bytes()
    assert r1["best"]["dev"] >= r1["start"]["dev"]
    assert [g["generation"] for g in r1["generations"]] == [0, 1, 2, 3]
    assert (tmp_path / "one/search.png").stat().st_size > 0
    assert "generation 3/3: best dev" in one.stderr
    # The saved best model is loadable and scores what the search measured on test.
    from merganser.evaluation.evaluate import evaluate, zoo_evaluator

    scores = evaluate(tmp_path / "one/best", [zoo_evaluator(["reverse", "add"], "test", 24)])
    assert sum(s.accuracy for s in scores.values()) / 2 == pytest.approx(r1["best"]["test"])
    # A second run into the same folder needs --resume or --force.
    again = run_cli("evolve", str(s), str(tmp_path / "one"))
    assert again.returncode == 1 and "--resume" in again.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["cmaes", "greedy_soup", "kinship_greedy"])
def test_evolve_cli_other_strategies(reduced_zoo: Path, tmp_path: Path, strategy: str) -> None:
    s = _search_file(
        reduced_zoo,
        tmp_path,
        strategy,
        cmaes={"method": "ties", "optimize": ["weight", "density"], "generations": 2, "popsize": 4,
               "start": {"weight": 0.8, "density": 0.5}},
        kinship_greedy={"k": 2, "generations": 2},
    )  # fmt: skip
    keep = tmp_path / "out" / "keep.txt"
    keep.parent.mkdir()
    keep.write_text("the user's own file")
    refused = run_cli("evolve", str(s), str(tmp_path / "out"), "--quiet")
    assert refused.returncode == 1 and "is not a search folder" in refused.stderr
    r = run_cli("evolve", str(s), str(tmp_path / "out"), "--workers", "1", "--quiet", "--force")
    assert r.returncode == 0, r.stderr
    assert keep.read_text() == "the user's own file"  # --force replaces only search outputs
    rep = _report(tmp_path / "out")
    assert rep["best"]["dev"] >= rep["start"]["dev"]
    devs = [g["dev"] for g in rep["generations"]]
    assert devs == sorted(devs)
    if strategy == "greedy_soup":
        best = rep["history"][0]["dev"]
        for h in rep["history"][1:]:  # each kept ingredient raised dev over the soup before it
            if h["kept"]:
                assert h["dev"] > best
                best = h["dev"]
            else:
                assert h["dev"] <= best
        assert best == rep["best"]["dev"]


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_result(reduced_zoo: Path, tmp_path: Path) -> None:
    s = _search_file(reduced_zoo, tmp_path, evolver={"generations": 4, "schedule": "sequential"})
    clean = run_cli("evolve", str(s), str(tmp_path / "clean"), "--workers", "1")
    assert clean.returncode == 0, clean.stderr
    total = len((tmp_path / "clean/evaluations.jsonl").read_text().splitlines())
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "merganser.cli", "evolve", str(s), str(out), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = out / "evaluations.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if journal.exists() and len(journal.read_text().splitlines()) >= total // 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(journal.read_text().splitlines())
    assert 1 < done < total, "the kill should land mid-search"
    assert not (out / "search.json").exists()
    resumed = run_cli("evolve", str(s), str(out), "--workers", "1", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _report(tmp_path / "clean"), _report(out)
    assert a["best"] == b["best"] and a["history"] == b["history"]
    assert b["replayed"] > 0 and b["evaluations"] < a["evaluations"]
    assert (tmp_path / "clean/best/model.safetensors").read_bytes() == (
        out / "best/model.safetensors"
    ).read_bytes()
    # A changed search file is refused rather than silently mixed with the old journal.
    changed = _search_file(reduced_zoo, tmp_path, evolver={"generations": 5})
    bad = run_cli("evolve", str(changed), str(out), "--resume")
    assert bad.returncode == 1 and "different search configuration" in bad.stderr


@pytest.mark.slow
def test_search_on_a_real_local_ray_cluster(reduced_zoo: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        s = _search_file(reduced_zoo, tmp_path)
        r = run_cli(
            "evolve", str(s), str(tmp_path / "ray"), "--ray", cluster.address, "--workers", "2",
            timeout=600,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        local = run_cli("evolve", str(s), str(tmp_path / "local"), "--workers", "1")
        assert local.returncode == 0, local.stderr
    finally:
        cluster.shutdown()
    rep, ref = _report(tmp_path / "ray"), _report(tmp_path / "local")
    assert rep["backend"] == "ray" and rep["workers"] == 2 and rep["nodes"] == 2
    assert rep["best"] == ref["best"] and rep["generations"] == ref["generations"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategy": "annealing"}, "strategy: input should be"),
        ({"evolver": {"f": 0}}, "evolver.f: input should be greater than 0"),
        ({"evaluator": {"n": 10}}, "evaluator: give zoo tasks, both dev and test JSONL files"),
        ({"models": ["nope_a", "nope_b"]}, "nope_a: model not found"),
        ({"colour": 1}, "colour: unknown key"),
    ],
)
def test_evolve_bad_search_files(
    reduced_zoo: Path, tmp_path: Path, change: dict, message: str
) -> None:
    s = _search_file(reduced_zoo, tmp_path, **change)
    r = run_cli("evolve", str(s), str(tmp_path / "out"))
    assert r.returncode == 1
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("examples/search/*.yaml")))
def test_example_search_files_parse(path: Path) -> None:
    from merganser.search.config import load_search

    cfg = load_search(path)
    assert cfg.resolve(cfg.models[0]).parts[-3:] == ("zoo", "seed0", "expert_reverse")


def test_evolver_with_a_data_aware_merger() -> None:
    # Fisher merging with equal Fishers is the plain average: the two searches must agree.
    models = _models(3)
    target = {k: 0.2 * models[0][k] + 0.8 * models[2][k] for k in models[0]}
    ones = [{f"fisher.{k}": torch.ones_like(v) for k, v in m.items()} for m in models]
    runs = [
        evolve(models, DistanceScorer(target), EvolverConfig(generations=3, **kw))  # type: ignore[arg-type]
        for kw in ({"merger": "linear"}, {"merger": "fisher", "merger_statistics": ones})
    ]
    assert runs[0].dev == pytest.approx(runs[1].dev, abs=1e-5)
    for k, v in runs[0].best.items():
        assert torch.allclose(v, runs[1].best[k], atol=1e-5)
