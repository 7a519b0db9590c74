"""`merganser plan` / `merge --dry-run` and the `--json` outputs (issue 29): the plan from
headers alone, every missing input listed, nothing written.
"""

from __future__ import annotations

import json
import re

import torch
import yaml
from conftest import load_folder, write_model, write_recipe

from merganser.cli import main


def _models(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"a.w": (16, 8), "b.w": (8,), "ids": None}
    out = []
    for i in range(3):
        t = {k: torch.randn(s, generator=g) for k, s in shapes.items() if s}
        t["ids"] = torch.arange(4)
        out.append(write_model(tmp_path / f"m{i}", t))
    return out


def _json(capsys, *argv) -> tuple[int, object]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, json.loads(capsys.readouterr().out)


def test_plan_reports_what_the_merge_then_does(tmp_path, capsys) -> None:
    base, e1, e2 = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "ties", "base_model": str(base), "out_dtype": "bfloat16",
         "models": [{"model": str(e1)}, {"model": str(e2)}], "parameters": {"density": 0.5}},
    )  # fmt: skip
    rc, plan = _json(capsys, "plan", str(recipe), "--json")
    assert rc == 0 and plan["missing"] == [] and plan["method"] == "ties"
    assert [i["status"] for i in plan["inputs"]] == ["found"] * 3
    assert plan["output_tensors"] == 3 and plan["merged_tensors"] == 2
    # Merged tensors in bf16; the int64 buffer copied as is.
    assert plan["write_bytes"] == (16 * 8 + 8) * 2 + 4 * 8
    assert plan["read_bytes"] == 3 * (16 * 8 + 8) * 4 + 4 * 8
    assert plan["peak_memory_bytes"] > 0
    # --dry-run gives the same plan and writes nothing.
    rc, dry = _json(capsys, "merge", str(recipe), str(tmp_path / "o"), "--dry-run", "--json")
    assert rc == 0 and dry == plan and not (tmp_path / "o").exists()
    rc, done = _json(capsys, "merge", str(recipe), str(tmp_path / "o"), "--json", "--no-progress")
    assert rc == 0 and done["method"] == "ties" and done["shards"] == 1
    written = sum(t.nbytes for t in load_folder(tmp_path / "o").values())
    assert written == plan["write_bytes"]


def test_plan_lists_every_missing_input(tmp_path, capsys) -> None:
    base, _, _ = _models(tmp_path)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(tmp_path / "x")},
                                              {"model": "org/not-cached"}]},
    )  # fmt: skip
    rc, plan = _json(capsys, "plan", str(recipe), "--json")
    assert rc == 1 and plan["missing"] == [str(tmp_path / "x"), "org/not-cached"]
    assert "output_tensors" not in plan
    capsys.readouterr()
    assert main(["plan", str(recipe)]) == 1
    text = capsys.readouterr().out
    assert re.search(r"org/not-cached +missing \(no local path, not in the HF cache\)", text)


def test_plan_of_a_multi_document_recipe_marks_inputs_made_by_earlier_merges(
    tmp_path, capsys
) -> None:
    base, e1, e2 = _models(tmp_path)
    docs = [
        {"name": "soup", "merge_method": "linear",
         "models": [{"model": str(e1)}, {"model": str(e2)}]},
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": "soup"}]},
    ]  # fmt: skip
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    rc, plans = _json(capsys, "merge", str(path), str(tmp_path / "o"), "--dry-run", "--json")
    assert rc == 0 and len(plans) == 2
    assert plans[0]["output_tensors"] == 3
    soup = plans[1]["inputs"][1]
    assert soup["status"] == "made by document 1 (soup)" and plans[1]["pending"]
    assert soup["ref"] == str(tmp_path / "o.intermediate" / "soup")


def test_methods_json_is_the_registry(capsys) -> None:
    rc, methods = _json(capsys, "methods", "--json")
    by_name = {m["name"]: m for m in methods}
    assert rc == 0 and by_name["magmax"]["params"][0]["default"] == 0.5
    assert by_name["nearswap"]["params"][0]["required"] is True
    assert by_name["slerp"]["base"] == "required" and by_name["linear"]["base"] == "unused"
