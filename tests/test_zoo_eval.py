"""The offline zoo, the evaluators and the demo."""

from __future__ import annotations

import json

import pytest
import torch

from merganser.errors import MerganserError
from merganser.evaluation.evaluate import LoadedModel, jsonl_evaluator, score_pairs, zoo_evaluator
from merganser.evaluation.zoo import EXPERT_TASKS, ZooSpec, build_zoo, get_task
from merganser.evaluation.zoo.tokenizer import EOS, CharTokenizer


def test_reduced_zoo_is_real_hf_models_with_a_real_tokenizer(reduced_zoo) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = reduced_zoo / "zoo" / "seed0"
    spec = ZooSpec.reduced(0)
    for name in ("base", *(f"expert_{t}" for t in spec.experts)):
        assert (root / name / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(root / name)
        assert tok.encode("R:abc=", add_special_tokens=False) == CharTokenizer().encode("R:abc=")
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    assert model.config.model_type == "llama"


def test_zoo_build_is_cached(reduced_zoo, monkeypatch) -> None:
    import merganser.evaluation.zoo.build as build

    monkeypatch.setattr(build, "train", lambda *a, **k: pytest.fail("retrained a cached zoo"))
    paths = build_zoo(reduced_zoo / "zoo" / "seed0", ZooSpec.reduced(0), verbose=False)
    assert set(paths) == {"base", *ZooSpec.reduced(0).experts}


def test_zoo_build_is_deterministic(tmp_path) -> None:
    tiny = ZooSpec(
        seed=3,
        experts=("add",),
        hidden=32,
        layers=1,
        heads=2,
        intermediate=64,
        base_steps=15,
        expert_steps=5,
        batch=8,
    )
    a = build_zoo(tmp_path / "a", tiny, verbose=False)
    b = build_zoo(tmp_path / "b", tiny, verbose=False)
    for k in a:
        assert (a[k] / "model.safetensors").read_bytes() == (
            b[k] / "model.safetensors"
        ).read_bytes()


def test_experts_have_learned_their_tasks_beyond_the_base(reduced_zoo) -> None:
    from merganser.evaluation.evaluate import evaluate, load_model

    root = reduced_zoo / "zoo" / "seed0"
    ev = zoo_evaluator(["add"], "dev", 60)
    base = evaluate(load_model(root / "base"), [ev])["add"]
    expert = evaluate(load_model(root / "expert_add"), [ev])["add"]
    assert expert.accuracy > base.accuracy and expert.loss < base.loss


class _CopyOracle(torch.nn.Module):
    """A stand-in LM that answers the copy task, except for words starting with 'a'."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = CharTokenizer()
        self.eq = self.tok.stoi["="]

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        logits = torch.zeros(b, n, len(self.tok))
        for r in range(b):
            ids = input_ids[r].tolist()
            for pos in range(n):
                seq = ids[: pos + 1]
                if self.eq not in seq:
                    continue
                start = 3  # [BOS] C :
                word = seq[start : seq.index(self.eq)]
                done = len(seq) - 1 - seq.index(self.eq)
                nxt = word[done] if done < len(word) else EOS
                if self.tok.itos[word[0]] == "a" and done == 0:
                    nxt = self.tok.stoi["h"]  # deliberately wrong
                logits[r, pos, nxt] = 10.0
        return type("Out", (), {"logits": logits})()


class _Tok:
    bos_token_id, eos_token_id, pad_token_id = 1, EOS, 0

    def __init__(self) -> None:
        self.t = CharTokenizer()

    def encode(self, text, add_special_tokens=False):
        return self.t.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.t.decode(ids)


def test_known_model_gives_known_accuracy() -> None:
    lm = LoadedModel(_CopyOracle(), _Tok(), "oracle")
    pairs = get_task("copy").examples("test", 100)
    expected = sum(not p[2:].startswith("a") for p, _ in pairs) / len(pairs)
    score = score_pairs(lm, pairs)
    assert 0 < expected < 1
    assert score.accuracy == pytest.approx(expected)
    assert score.n == 100


def test_jsonl_evaluator(tmp_path) -> None:
    lm = LoadedModel(_CopyOracle(), _Tok(), "oracle")
    f = tmp_path / "mine.jsonl"
    f.write_text(
        "\n".join(
            json.dumps(x)
            for x in [
                {"prompt": "C:bcd=", "answer": "bcd", "task": "copyish"},
                {"prompt": "C:abc=", "answer": "abc", "task": "copyish"},
                {"prompt": "C:hh=", "answer": "hh"},
                {"prompt": "C:gf=", "answer": "xx"},
            ]
        )
        + "\n"
    )
    scores = jsonl_evaluator(f)(lm)
    assert scores["copyish"].accuracy == 0.5 and scores["copyish"].n == 2
    assert scores["mine"].accuracy == 0.5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y"}\n{"prompt": 3}\n')
    with pytest.raises(MerganserError, match=r"bad\.jsonl:2: expected an object"):
        jsonl_evaluator(bad)


def test_eval_cli_table_and_json(reduced_zoo, capsys) -> None:
    from merganser.cli import main

    root = reduced_zoo / "zoo" / "seed0"
    assert (
        main(
            [
                "eval",
                str(root / "expert_add"),
                "--tasks",
                "add",
                "--split",
                "dev",
                "--n",
                "20",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert set(data[str(root / "expert_add")]) == {"add"}
    assert main(["eval", str(root / "base"), "--tasks", "add,reverse", "--n", "10"]) == 0
    out = capsys.readouterr().out
    assert "exact-match accuracy" in out and "average" in out and "answer loss" in out


def test_unknown_task_is_one_line(reduced_zoo, capsys) -> None:
    from merganser.cli import main

    assert main(["eval", str(reduced_zoo / "zoo" / "seed0" / "base"), "--tasks", "nope"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_demo_end_to_end_reduced(reduced_zoo) -> None:
    from merganser.demo import run_demo

    res = run_demo(reduced_zoo, seed=0, reduced=True)
    for ext in ("csv", "json", "png"):
        assert (reduced_zoo / f"results_seed0.{ext}").is_file()
    rows = res["test_accuracy"]
    assert "base" in rows and "expert: add" in rows
    assert {"average", "task arithmetic", "TIES", "DARE-TIES"} == set(res["chosen_on_dev"])
    assert len(res["predictions"]) == 3
    for family in res["chosen_on_dev"]:
        assert (reduced_zoo / "merged" / family.replace(" ", "_") / "model.safetensors").is_file()
    assert set(EXPERT_TASKS) >= set(res["tasks"])
    # The experts side by side as a Mixtral, routed from their tasks' prompts (issue 31).
    moes = [r for r in rows if r.startswith("MoE of the")]
    assert len(moes) == 2 and all("top-2" in r and 0 <= rows[r]["average"] <= 1 for r in moes)
    assert (reduced_zoo / "merged" / "moe_ta" / "config.json").is_file()
    # The report page of the best merge (chosen on dev), with the test table (issue 32).
    page = (reduced_zoo / "report_seed0.html").read_text()
    best = max(res["chosen_on_dev"], key=lambda f: res["chosen_on_dev"][f]["dev_average"])
    assert res["chosen_on_dev"][best]["row"] in page and "<table id='evaluation'>" in page
