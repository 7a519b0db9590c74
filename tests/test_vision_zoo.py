"""The vision zoo (reduced): deterministic data, and every data-aware path on its ViT experts:
`merganser calibrate` on image tensors, RegMean and Fisher recipes, AdaMerging with a head per
task and RegMean++."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, load_folder

from merganser.api import (
    AdaMergingConfig,
    CalibrationOptions,
    adamerging,
    calibrate_module,
    merge_tensors,
    regmean_plusplus,
)
from merganser.evaluation.zoo.vision import (
    VISION_TASKS,
    TaskModel,
    VisionZooSpec,
    accuracy,
    build_vision_zoo,
    load_backbone,
    load_head,
    task_data,
)

SPEC = VisionZooSpec.reduced()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(2)
    return build_vision_zoo(tmp_path_factory.mktemp("vision"), SPEC)


def test_task_data_is_deterministic_and_labelled() -> None:
    for task, k in VISION_TASKS.items():
        x, y = task_data(task, "dev", 24, seed=3)
        x2, y2 = task_data(task, "dev", 24, seed=3)
        assert torch.equal(x, x2) and torch.equal(y, y2)
        assert x.shape == (24, 3, 16, 16) and float(x.min()) >= -1 and float(x.max()) <= 1
        assert int(y.min()) >= 0 and int(y.max()) < k
        assert not torch.equal(task_data(task, "test", 24, seed=3)[0], x)  # splits differ


def test_zoo_layout_and_reuse(zoo: Path) -> None:
    assert (zoo / "zoo.json").is_file()
    for t in SPEC.tasks:
        assert (zoo / "experts" / t / "config.json").is_file()
        assert (zoo / "heads" / f"{t}.safetensors").is_file()
    assert build_vision_zoo(zoo.parent, SPEC) == zoo  # cached: not rebuilt


def test_calibrate_and_data_aware_merges_on_vit_experts(
    zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experts = [zoo / "experts" / t for t in SPEC.tasks]
    stats = []
    for t, e in zip(SPEC.tasks, experts, strict=True):
        out = tmp_path / f"{t}.safetensors"
        data = zoo / "calib" / f"{t}.safetensors"
        r = cli(capsys, "calibrate", str(e), str(out), "--data", str(data), "--examples", "32")
        assert r.returncode == 0, r.stderr
        assert "32 examples" in r.stdout and "LOAD REPORT" not in r.stderr  # no random pooler
        stats.append(out)
    # A backbone has no logits: the Fisher needs its head (the API), one line here.
    r = cli(capsys, "calibrate", str(experts[0]), str(tmp_path / "f.safetensors"), "--fisher",
                "--data", str(zoo / "calib" / f"{SPEC.tasks[0]}.safetensors"))  # fmt: skip
    assert r.returncode != 0 and "has no logits" in r.stderr
    assert not (tmp_path / "f.safetensors").exists()
    heads = [load_head(zoo / "heads" / f"{t}.safetensors") for t in SPEC.tasks]
    tests = [task_data(t, "test", 200, SPEC.seed) for t in SPEC.tasks]
    recipe = {
        "merge_method": "regmean",
        "models": [{"model": str(e), "statistics": str(s)}
                   for e, s in zip(experts, stats, strict=True)],
    }  # fmt: skip
    (tmp_path / "regmean.yaml").write_text(yaml.safe_dump(recipe))
    r = cli(capsys, "merge", str(tmp_path / "regmean.yaml"), str(tmp_path / "regmean"))
    assert r.returncode == 0, r.stderr
    merged = load_backbone(tmp_path / "regmean")
    # The recipe's output is RegMean in memory on the same checkpoints and statistics.
    from safetensors.torch import load_file

    want = merge_tensors(
        "regmean", [load_folder(e) for e in experts], statistics=[load_file(str(s)) for s in stats]
    )
    got = load_folder(tmp_path / "regmean")
    assert set(got) == set(want)
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    accs = [accuracy(TaskModel(merged, h), x, y) for h, (x, y) in zip(heads, tests, strict=True)]
    assert mean_of(accs) > 100 / max(VISION_TASKS[t] for t in SPEC.tasks)  # above chance
    # The Fisher through each task's head (the API), merged in memory.
    models = [load_backbone(e) for e in experts]
    fishers = []
    for m, h, t in zip(models, heads, SPEC.tasks, strict=True):
        x = task_data(t, "calib", 32, SPEC.seed)[0]
        opts = CalibrationOptions(grams=False, fisher=True)
        tensors, _ = calibrate_module(TaskModel(m, h), [x[:16], x[16:]], options=opts)
        fishers.append({k.replace("fisher.backbone.", "fisher."): v for k, v in tensors.items()})
    sd = [dict(m.state_dict()) for m in models]
    fisher = merge_tensors("fisher", sd, statistics=fishers)
    assert set(fisher) == set(sd[0]) and all(v.isfinite().all() for v in fisher.values())


def test_adamerging_and_regmean_plusplus_on_the_zoo(zoo: Path) -> None:
    base = load_backbone(zoo / "base")
    experts = [load_backbone(zoo / "experts" / t) for t in SPEC.tasks]
    heads = [load_head(zoo / "heads" / f"{t}.safetensors") for t in SPEC.tasks]
    skeleton = load_backbone(zoo / "base")
    nets = [TaskModel(skeleton, h) for h in heads]
    pre = {f"backbone.{k}": v for k, v in base.state_dict().items()}
    ex = [{f"backbone.{k}": v for k, v in e.state_dict().items()} for e in experts]
    unlabelled = [[task_data(t, "dev", 32, SPEC.seed)[0]] for t in SPEC.tasks]
    cfg = AdaMergingConfig(granularity="task", steps=10, lr=1e-2, report_every=5)
    r = adamerging(nets, pre, ex, unlabelled, config=cfg)
    lam = r.details["lambdas"]
    assert len(lam[0]) == len(SPEC.tasks) and lam[0] != [0.3] * len(SPEC.tasks)
    batches = [[{"pixel_values": task_data(t, "calib", 32, SPEC.seed)[0]}] for t in SPEC.tasks]
    merged = regmean_plusplus(experts, batches, base=base)
    assert set(merged) == set(base.state_dict())
    # After the blocks (the final layer norm) stays the base's, as the official code does.
    assert torch.equal(merged["layernorm.weight"], base.state_dict()["layernorm.weight"])


def mean_of(xs: list[float]) -> float:
    return sum(xs) / len(xs)
