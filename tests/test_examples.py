"""Every recipe under examples/ runs on tiny models, and every method has one."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from conftest import REPO, load_folder

import merganser
from merganser.evaluation.calibrate import CalibrationOptions, calibrate
from merganser.evaluation.tiny import build_family
from merganser.evaluation.zoo.tasks import get_task
from merganser.evaluation.zoo.tokenizer import CharTokenizer
from merganser.methods import all_methods
from merganser.pipeline.recipe import load_recipe

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# The output of every example on the tiny models, pinned (issue 28: a move of code must not
# change one byte). After a deliberate change of results, regenerate with
# MERGANSER_PIN_OUTPUTS=1 pytest tests/test_examples.py and say why in the commit.
PINNED = REPO / "tests" / "data" / "example_outputs.json"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    build_family(root / "models", experts=2, seed=11, layers=4)
    # Calibration statistics for the data-aware examples (regmean, fisher).
    tok = CharTokenizer()
    texts = [p + a for p, a in get_task("add").examples("train", 8)]
    # One intra-op thread: the statistics' float sums (and so the pinned outputs) must not
    # depend on the thread count other tests leave torch with.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in (1, 2):
            folder = root / "models" / f"expert_{i}"
            tok.save(folder)
            opts = CalibrationOptions(fisher=True, progress=False)
            calibrate(folder, texts, root / "models" / f"expert_{i}.stats.safetensors", opts)
    finally:
        torch.set_num_threads(threads)
    return root


def test_every_method_has_an_example() -> None:
    used = {load_recipe(p).merge_method for p in EXAMPLES}
    missing = {m.name for m in all_methods()} - used
    assert not missing, f"methods without an example under examples/: {sorted(missing)}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(example, workdir) -> None:
    recipe = shutil.copy(example, workdir / example.name)
    out = merganser.merge(
        recipe, workdir / "out" / example.stem, merganser.MergeOptions(progress=False)
    )
    tensors = load_folder(out)
    base = load_folder(workdir / "models" / "base")
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())
    layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert layers == (6 if example.stem == "slices" else 4)
    if example.stem != "slices":
        assert tensors.keys() == base.keys()
        assert any(not torch.equal(tensors[k], base[k]) for k in base), "merge changed nothing"


def test_outputs_are_byte_identical_to_the_pinned_ones(workdir) -> None:
    """Each example's shards hash as pinned: same bytes across refactors of the engine."""
    digests = {}
    for example in EXAMPLES:
        out = workdir / "pinned" / example.stem
        recipe = shutil.copy(example, workdir / example.name)
        merganser.merge(recipe, out, merganser.MergeOptions(progress=False))
        h = hashlib.sha256()
        for f in sorted(out.glob("*.safetensors")):
            h.update(f.read_bytes())
        digests[example.stem] = h.hexdigest()
    if os.environ.get("MERGANSER_PIN_OUTPUTS"):
        PINNED.parent.mkdir(exist_ok=True)
        PINNED.write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")
        pytest.skip("pinned the outputs anew")
    pinned = json.loads(PINNED.read_text())
    changed = sorted(k for k in digests if pinned.get(k) != digests[k])
    assert not changed, f"outputs changed (or are new) for: {changed}"
