"""lm-evaluation-harness as an evaluator (issue 32): a local lm-eval task built from the zoo's
data (task YAML + JSONL, no network) scores exactly what merganser's own evaluator scores on
the same examples; `merganser eval --lm-eval` and evolve's lm_eval fitness use it; without the
extra installed it is one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lm_eval  # noqa: F401  (a dev dependency: a broken install fails here, not skips)
import pytest
import yaml

from merganser.cli import main
from merganser.evaluation.evaluate import load_model, score_pairs
from merganser.evaluation.lm_eval import lm_eval_evaluator
from merganser.evaluation.zoo.tasks import get_task


def local_task(folder: Path, name: str, pairs: list[tuple[str, str]]) -> Path:
    """An lm-eval task of prompt/answer pairs: the answer and EOS must be the greedy
    continuation of BOS + prompt (lm-eval's loglikelihood ``acc``), which is exact match of
    greedy decoding stopped at EOS, as merganser scores it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "<bos>{{prompt}}",  # the zoo tokenizer's special tokens
        "doc_to_target": "{{answer}}<eos>",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


@pytest.fixture(scope="module")
def zoo_task(reduced_zoo, tmp_path_factory):
    pairs = get_task("add").examples("test", 40, 0)
    return reduced_zoo / "zoo" / "seed0", local_task(tmp_path_factory.mktemp("tasks"),
                                                       "zoo_add", pairs), pairs  # fmt: skip


@pytest.mark.parametrize("model", ["expert_add", "base"])
def test_lm_eval_scores_what_merganser_scores(zoo_task, model) -> None:
    zoo, include, pairs = zoo_task
    lm = load_model(zoo / model)
    ours = score_pairs(lm, pairs)
    theirs = lm_eval_evaluator(["zoo_add"], include_path=include)(lm)["zoo_add"]
    assert theirs.n == len(pairs) == 40
    assert theirs.accuracy == ours.accuracy
    if model == "expert_add":
        assert ours.accuracy > 0  # not a trivial 0 == 0


def test_eval_cli_with_lm_eval(zoo_task, capsys) -> None:
    zoo, include, pairs = zoo_task
    argv = ["eval", str(zoo / "expert_add"), "--lm-eval", "zoo_add", "--lm-eval-include",
            str(include), "--limit", "10", "--json"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)[str(zoo / "expert_add")]["zoo_add"]
    assert got["n"] == 10
    want = score_pairs(load_model(zoo / "expert_add"), pairs[:10]).accuracy
    assert got["accuracy"] == want


def test_unknown_task_and_missing_extra_are_one_line(zoo_task, capsys, monkeypatch) -> None:
    zoo, include, _ = zoo_task
    model = str(zoo / "base")
    capsys.readouterr()
    assert main(["eval", model, "--lm-eval", "zoo_nothing", "--lm-eval-include", str(include)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown task 'zoo_nothing'" in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    assert main(["eval", model, "--lm-eval", "zoo_add"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'merganser[lm-eval]'" in err


def test_evolve_with_lm_eval_fitness(zoo_task, tmp_path) -> None:
    """A greedy soup selected on an lm-eval dev task and reported on an lm-eval test task."""
    zoo, _, _ = zoo_task
    include = tmp_path / "tasks"
    local_task(include, "zoo_add_dev", get_task("add").examples("dev", 20, 0))
    local_task(include, "zoo_add_test", get_task("add").examples("test", 20, 0))
    search = {
        "models": [str(zoo / "expert_add"), str(zoo / "expert_reverse")],
        "evaluator": {"lm_eval": {"dev": ["zoo_add_dev"], "test": ["zoo_add_test"],
                                  "include_path": str(include)}},
        "strategy": "greedy_soup",
    }  # fmt: skip
    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(search))
    assert main(["evolve", str(cfg), str(tmp_path / "out"), "--workers", "1", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "search.json").read_text())
    assert (tmp_path / "out" / "best" / "config.json").is_file()
    journal = (tmp_path / "out" / "evaluations.jsonl").read_text()
    assert "zoo_add_dev" in journal and "zoo_add_test" in journal
    assert report


def test_a_multi_head_model_is_one_line(zoo_task) -> None:
    """lm-eval would run a partially zipped model's trunk-and-heads container as if it were
    one causal LM; its task names are not the heads' either. One line instead.
    """
    from merganser.errors import MerganserError

    zoo, include, _ = zoo_task
    lm = load_model(zoo / "base")
    lm.routes = {"add": "add"}
    with pytest.raises(MerganserError, match="a multi-head model; lm-eval evaluates one"):
        lm_eval_evaluator(["zoo_add"], include_path=include)(lm)
