"""Models named by Hugging Face hub id (issue 29): resolved from the local cache (built here
in the hub's layout), downloaded only when not offline; never the network in tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_folder, write_model, write_recipe

from merganser.cli import main
from merganser.storage import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A Hugging Face cache holding org/tiny (main = COMMIT), and the same model locally."""
    import huggingface_hub.constants

    g = torch.Generator().manual_seed(0)
    local = {n: write_model(tmp_path / n, {"w": torch.randn(3, 3, generator=g)}) for n in "ab"}
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(local["b"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return local


def _merge(tmp_path, capsys, ref: str, *flags: str) -> tuple[int, str, Path]:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {"merge_method": "linear", "models": [{"model": str(tmp_path / "a")}, {"model": ref}]},
    )
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    capsys.readouterr()
    rc = main(["merge", str(recipe), str(out), "--no-progress", *flags])
    return rc, capsys.readouterr().err, out


@pytest.mark.parametrize("ref", ["org/tiny", f"org/tiny@{COMMIT}", "org/tiny@main"])
def test_hub_id_in_the_cache_merges_as_its_local_copy(tmp_path, capsys, cache, ref) -> None:
    rc, err, out = _merge(tmp_path, capsys, ref)
    assert rc == 0, err
    a, b = load_folder(cache["a"])["w"], load_folder(cache["b"])["w"]
    torch.testing.assert_close(load_folder(out)["w"], (a + b) / 2)
    card = (out / "README.md").read_text()
    assert ref in card and str(tmp_path / "hub") not in card


def test_hub_id_missing_offline_is_one_line(tmp_path, capsys, cache) -> None:
    rc, err, out = _merge(tmp_path, capsys, "org/none")
    assert rc == 1 and err.count("\n") == 1
    assert "org/none: no such local folder, and not in the Hugging Face cache (offline mode" in err
    rc, err, _ = _merge(tmp_path, capsys, "org/tiny@v9")
    assert rc == 1 and "org/tiny@v9: no such local folder" in err
    assert not out.exists()


def test_download_only_when_not_offline(tmp_path, capsys, cache, monkeypatch) -> None:
    """Without offline mode the hub is asked (here a stand-in records the call); --offline
    keeps it to the cache even with HF_HUB_OFFLINE unset.
    """
    import huggingface_hub

    calls = []

    def fake(repo, revision=None, local_files_only=False, allow_patterns=None):
        calls.append((repo, revision, local_files_only))
        return str(cache["b"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert _merge(tmp_path, capsys, "org/other@v1")[0] == 0
    assert calls == [("org/other", "v1", False)]
    assert _merge(tmp_path, capsys, "org/other", "--offline")[0] == 0
    assert calls[-1] == ("org/other", None, True)


@pytest.mark.parametrize(
    ("ref", "is_id"),
    [("org/name", True), ("org/name@rev-1", True), ("./org/name", False), ("/abs/x", False),
     ("a/b/c", False), ("org/..", False), ("name", False), ("org/na me", False)],
)  # fmt: skip
def test_what_counts_as_a_hub_id(ref, is_id) -> None:
    assert hub.is_hub_id(ref) is is_id
