"""Multi-document recipes (mergekit-multimerge's format), which failed as invalid YAML: each
document a merge, later ones naming earlier ones in place of a model path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_folder, write_model

from merganser.cli import main
from merganser.storage.writer import MANIFEST_NAME

STAGE1 = {"name": "soup", "merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}
FINAL = {
    "merge_method": "task_arithmetic",
    "base_model": "base",
    "models": [{"model": "soup", "parameters": {"weight": 2.0}}],
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a", "b"):
        write_model(tmp_path / name, {"w": torch.randn(4, 4, generator=g)})
    return tmp_path


def _write(folder: Path, *docs: dict) -> Path:
    path = folder / "multi.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _run(capsys, recipe: Path, out: Path, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(out), "--no-progress", *flags])
    return rc, capsys.readouterr().err


def _expected(folder: Path) -> torch.Tensor:
    w = {n: load_folder(folder / n)["w"] for n in ("base", "a", "b")}
    soup = (w["a"] + w["b"]) / 2
    return w["base"] + 2.0 * (soup - w["base"])


@pytest.mark.parametrize("final_first", [False, True])
def test_later_merge_uses_an_earlier_one_by_name(folder, capsys, final_first) -> None:
    docs = (FINAL, STAGE1) if final_first else (STAGE1, FINAL)
    rc, err = _run(capsys, _write(folder, *docs), folder / "out")
    assert rc == 0, err
    torch.testing.assert_close(load_folder(folder / "out")["w"], _expected(folder))
    inter = folder / "out.intermediate" / "soup"
    assert (inter / MANIFEST_NAME).is_file() and load_folder(inter)["w"].shape == (4, 4)
    assert "document 1" in err and "merging into" in err


def test_an_intermediate_of_the_same_document_is_reused(folder, capsys) -> None:
    recipe = _write(folder, STAGE1, FINAL)
    assert _run(capsys, recipe, folder / "out")[0] == 0
    rc, err = _run(capsys, recipe, folder / "out", "--force")
    assert rc == 0 and "(soup): reusing" in err
    # A changed document is merged again, and an intermediate it would replace is refused.
    changed = {**STAGE1, "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 3}}]}
    rc, err = _run(capsys, _write(folder, changed, FINAL), folder / "out", "--force")
    assert rc == 0, err
    assert "reusing" not in err


def test_changed_intermediate_without_force_is_refused(folder, capsys) -> None:
    parts = ("--intermediate-dir", str(folder / "parts"))
    assert _run(capsys, _write(folder, STAGE1, FINAL), folder / "out", *parts)[0] == 0
    changed = {**STAGE1, "models": [{"model": "a"}]}
    rc, err = _run(capsys, _write(folder, changed, FINAL), folder / "out2", *parts)
    assert rc == 1 and f"{folder / 'parts' / 'soup'}" in err and "--force" in err, err
    assert not (folder / "out2").exists()


def test_every_document_named_ends_with_the_one_nobody_uses(folder, capsys) -> None:
    rc, err = _run(capsys, _write(folder, STAGE1, {**FINAL, "name": "last"}), folder / "out")
    assert rc == 0, err
    torch.testing.assert_close(load_folder(folder / "out")["w"], _expected(folder))
    assert not (folder / "out.intermediate" / "last").exists()


def test_intermediate_dir_option(folder, capsys) -> None:
    rc, err = _run(
        capsys, _write(folder, STAGE1, FINAL), folder / "out", "--intermediate-dir",
        str(folder / "parts"),
    )  # fmt: skip
    assert rc == 0, err
    assert (folder / "parts" / "soup").is_dir()


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ((STAGE1, STAGE1, FINAL), "name 'soup' is given to two documents"),
        ((FINAL, {**FINAL, "base_model": "a"}), "2 documents have no name"),
        (({**STAGE1, "name": "x/y"}, FINAL), "name 'x/y' must be letters, digits"),
        (
            ({**STAGE1, "models": [{"model": "last"}]}, {**FINAL, "name": "last"}),
            "merges use each other in a cycle: soup -> last -> soup",
        ),
        ((STAGE1, {**STAGE1, "name": "other"}), "expected one final merge"),
        ((STAGE1, [1, 2]), "document 2: expected a YAML mapping"),
    ],
)
def test_bad_multi_document_recipe_is_one_line(folder, capsys, docs, message) -> None:
    rc, err = _run(capsys, _write(folder, *docs), folder / "out")
    assert rc == 1 and err.count("\n") == 1 and message in err, err
    assert not (folder / "out").exists() and not (folder / "out.intermediate").exists()


def test_an_error_names_its_document(folder, capsys) -> None:
    bad = {**FINAL, "merge_method": "tie"}
    rc, err = _run(capsys, _write(folder, STAGE1, bad), folder / "out")
    assert rc == 1 and "multi.yaml: document 2: merge_method: unknown merge method 'tie'" in err


def test_report_is_written_for_the_final_merge(folder, capsys) -> None:
    """merge --report of a multi-document recipe writes the final merge's page (the flag was
    accepted and ignored); with --output adapter it is one line, before any work.
    """
    recipe = _write(folder, STAGE1, FINAL)
    rc, err = _run(capsys, recipe, folder / "out", "--report")
    assert rc == 0, err
    page = (folder / "out.report.html").read_text()
    assert "<code>task_arithmetic</code>" in page
    assert "<td>base</td>" in page and "out.intermediate/soup</td>" in page  # its inputs
    rc, err = _run(capsys, recipe, folder / "out2", "--report", "--output", "adapter")
    assert rc == 1 and "--report: an adapter output holds no merged tensors" in err
    assert not (folder / "out2").exists()
