"""`merganser report` (issue 32): exact numbers on a worked example, the page's numbers equal
--json's, digests equal the merge's manifest, the page renders in a real headless browser,
`merge --report`, and one-line refusals.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_folder, write_model

from merganser.analysis.report import fmt, report, to_html, with_evaluation
from merganser.cli import main


@pytest.fixture
def merged(tmp_path: Path) -> tuple[Path, Path]:
    """A worked example: base 0; τ₁ = [1, −1, 0, 2], τ₂ = [1, 1, 0, −2] in a layer tensor."""
    name = "model.layers.0.mlp.up_proj.weight"
    write_model(tmp_path / "base", {name: torch.zeros(2, 2)})
    write_model(tmp_path / "a", {name: torch.tensor([[1.0, -1.0], [0.0, 2.0]])})
    write_model(tmp_path / "b", {name: torch.tensor([[1.0, 1.0], [0.0, -2.0]])})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / m), "parameters": {"density": 0.5}}
                   for m in ("a", "b")],
    }))  # fmt: skip
    out = tmp_path / "out"
    assert main(["merge", str(recipe), str(out), "--no-progress", "--report"]) == 0
    return recipe, out


def test_the_worked_example_numbers(merged, capsys) -> None:
    _, out = merged
    capsys.readouterr()
    assert main(["report", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    m = r["model"]
    assert m["parameters"] == 4
    assert m["task_vector_norm"] == [pytest.approx(math.sqrt(6), rel=1e-6)] * 2
    assert m["cosine"][0][1] == pytest.approx(-4 / 6, rel=1e-5)  # (1 − 1 + 0 − 4) / 6
    assert m["sign_conflict"] == 0.5  # entries 2 and 4 have both signs
    assert m["trimmed"] == [0.5, 0.5]
    merged_w = load_folder(out)["model.layers.0.mlp.up_proj.weight"].reshape(-1).double()
    for i, t in enumerate(([1.0, -1, 0, 2], [1.0, 1, 0, -2])):
        t = torch.tensor(t, dtype=torch.float64)
        want = float((merged_w - t).norm() / t.norm())
        assert m["output_distance"][i] == pytest.approx(want, rel=1e-5)
    assert [x["name"] for x in r["layers"]] == ["layer 0"]
    assert [g["name"] for g in r["groups"]] == ["mlp"]
    assert r["reference"] == "base" and r["method"] == "ties"


def test_digests_are_the_merges_own(merged) -> None:
    _, out = merged
    r = report(out)
    manifest = json.loads((out / "merganser_manifest.json").read_text())["inputs"]
    assert {x["ref"]: x["digest"] for x in r["inputs"]} == manifest


def test_merge_report_writes_the_page_beside_the_output(merged) -> None:
    _, out = merged
    page = out.with_name("out.report.html")
    assert page.is_file() and "<h1>Merge report" in page.read_text()
    assert not (out / "out.report.html").exists()  # the output (and its manifest) untouched
    assert main(["verify", str(out)]) == 0


def test_the_pages_numbers_are_the_json(merged, tmp_path, capsys) -> None:
    recipe, out = merged
    page = tmp_path / "page.html"
    capsys.readouterr()
    assert main(["report", str(recipe), "--output", str(out), "-o", str(page), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    text = page.read_text()
    embedded = re.search(r"id='report-data'>(.*?)</script>", text, flags=re.S).group(1)
    assert json.loads(embedded.replace("<\\/", "</")) == r
    table = re.search(r"<table id='layers'>(.*?)</table>", text, flags=re.S).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
    cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", rows[1])]
    row = r["layers"][0]
    want = [row["name"], fmt(row["parameters"]), fmt(row["sign_conflict"])]
    for key in ("task_vector_norm", "relative_task_vector_norm", "trimmed", "output_distance"):
        want += [fmt(v) for v in row[key]]
    want += [fmt(row["cosine"][0][1])]
    assert cells == want


def test_the_page_renders_in_a_headless_browser(merged, tmp_path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    recipe, out = merged
    r = with_evaluation(report(recipe, out), {"a": {"t": 0.5}, "out": {"t": 0.75}}, ["t"])
    page = tmp_path / "page.html"
    page.write_text(to_html(r))
    args = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--virtual-time-budget=3000", "--enable-logging=stderr", "--v=0"]  # fmt: skip
    dom = subprocess.run([*args, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert dom.returncode == 0, dom.stderr[-2000:]
    n = len(re.findall(r"<img ", dom.stdout))
    assert n == 5  # norms, conflicts, cosine, distances, evaluation
    assert f'data-plots="{n}/{n}"' in dom.stdout  # every plot decoded, non-empty
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    snap = subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,2400",
                           page.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert snap.returncode == 0 and shot.stat().st_size > 10_000


def test_without_a_base_the_reference_is_the_inputs_mean(tmp_path, capsys) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    write_model(tmp_path / "a", {name: torch.tensor([1.0, 3.0])})
    write_model(tmp_path / "b", {name: torch.tensor([3.0, 1.0])})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}]}))  # fmt: skip
    r = report(recipe)
    assert r["reference"] == "mean of the inputs"
    assert r["model"]["task_vector_norm"] == [pytest.approx(math.sqrt(2), rel=1e-5)] * 2
    assert r["model"]["cosine"][0][1] == pytest.approx(-1.0)
    assert r["model"]["trimmed"] is None and r["model"]["output_distance"] is None
    assert r["groups"][0]["name"] == "attention"


def test_bad_sources_are_one_line(tmp_path, capsys) -> None:
    write_model(tmp_path / "m", {"w": torch.ones(2)})
    capsys.readouterr()
    assert main(["report", str(tmp_path / "m"), "--json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a merganser output" in err
    assert main(["report", str(tmp_path / "m")]) == 1
    assert "give -o PAGE.html, --json, or both" in capsys.readouterr().err


def test_tensors_from_other_inputs_are_named_not_mixed_in(tmp_path) -> None:
    """A frankenmerge's layers come from different models: the statistics keep to the first
    tensor's inputs and say how many tensors they leave out (they were silently mixed)."""
    for m, v in (("a", 1.0), ("b", 2.0)):
        write_model(tmp_path / m, {f"model.layers.{i}.mlp.up_proj.weight": torch.full((2,), v + i)
                                   for i in range(2)})  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tmp_path / "a"), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(tmp_path / "b"), "layer_range": [1, 2]}]}]}))  # fmt: skip
    r = report(recipe)
    assert [x["ref"] for x in r["inputs"]] == [str(tmp_path / "a")]
    assert r["model"]["parameters"] == 2
    assert any("1 tensor(s) are merged from other inputs" in w for w in r["warnings"])


def test_warnings_name_what_looks_wrong(tmp_path) -> None:
    """A non-finite input value is one warning per input (count and first tensor), and a model
    that is not a small change of the base is flagged by the group where it shows.
    """
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    write_model(tmp_path / "base", {n: torch.ones(4) for n in names})
    write_model(tmp_path / "near", {n: torch.full((4,), 1.01) for n in names})
    far = {n: torch.full((4,), 3.0) for n in names}
    far[names[1]][0] = float("nan")
    far[names[2]][1] = float("inf")
    write_model(tmp_path / "far", far)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic",
                                      "base_model": str(tmp_path / "base"), "models": [
        {"model": str(tmp_path / "near")}, {"model": str(tmp_path / "far")}]}))  # fmt: skip
    w = report(recipe)["warnings"]
    assert [x for x in w if "non-finite" in x] == [
        f"{tmp_path / 'far'}: non-finite values in 2 tensor(s), first {names[1]} "
        "(counted as no change from the reference)"
    ]
    flagged = [x for x in w if "not a fine-tune" in x]
    assert len(flagged) == 1 and flagged[0].startswith(f"{tmp_path / 'far'}: its mlp task vector")


def test_the_page_is_never_written_over_or_into_an_input(merged, tmp_path, capsys) -> None:
    """Even with --force: the page may not replace an input's file nor go inside an input
    folder (it could have, with --force); nothing is read before that is checked.
    """
    recipe, out = merged
    victim = tmp_path / "a" / "model.safetensors"
    before = victim.read_bytes()
    capsys.readouterr()
    for page in (victim, tmp_path / "a" / "page.html", out / "page.html"):
        assert main(["report", str(recipe), "--output", str(out), "-o", str(page), "--force"]) == 1
        assert "overlaps input" in capsys.readouterr().err
    assert victim.read_bytes() == before and not (tmp_path / "a" / "page.html").exists()
    assert main(["verify", str(out)]) == 0


def test_an_output_of_another_recipe_is_one_line_and_a_global_trim_is_not_faked(
    merged, tmp_path, capsys
) -> None:
    """--output whose tensors have other shapes than the recipe makes is refused before any
    read (it died on a size mismatch); with TIES scope: global the per-tensor fraction trimmed
    is not the density, so none is shown and a warning says why (it showed 1 − density).
    """
    recipe, _ = merged
    other = write_model(tmp_path / "other", {"model.layers.0.mlp.up_proj.weight": torch.ones(3)})
    capsys.readouterr()
    assert main(["report", str(recipe), "--output", str(other), "--json"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'model.layers.0.mlp.up_proj.weight' is [3]" in err
    doc = yaml.safe_load(recipe.read_text())
    doc["parameters"] = {"scope": "global"}
    recipe.write_text(yaml.safe_dump(doc))
    r = report(recipe)
    assert r["model"]["trimmed"] is None and r["layers"][0]["trimmed"] is None
    assert any("scope: global" in w for w in r["warnings"])


def test_tensors_missing_from_the_output_are_named(merged, tmp_path) -> None:
    recipe, _ = merged
    partial = write_model(tmp_path / "partial", {"unrelated": torch.ones(1)})
    r = report(recipe, partial)
    assert any("1 tensor(s) of the recipe are not in the output" in w for w in r["warnings"])
