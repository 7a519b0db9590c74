"""The command line: inspect, verify, methods, tiny, sizes."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from conftest import REPO, run_cli, write_model, write_recipe

from merganser.cli import main, parse_size


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    assert parse_size("1.5k") == 1500
    for bad in ("", "-1", "5XB", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


def test_inspect_reports_architecture_counts_and_groups(tiny_family, capsys) -> None:
    base = tiny_family[0]
    assert main(["inspect", str(base)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "layers:       2" in text
    assert "model.layers.*.self_attn.q_proj.weight" in text and "x2" in text
    assert main(["inspect", str(base), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    from safetensors.torch import load_file

    assert s["parameters"] == sum(
        v.numel() for v in load_file(str(base / "model.safetensors")).values()
    )
    assert s["dtypes"] == {"float32": s["parameters"]}


def test_verify_accepts_a_merge_and_catches_tampering(tmp_path, capsys) -> None:
    a = write_model(tmp_path / "a", {"w": torch.randn(300, 300), "v": torch.randn(200, 200)})
    r = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(a)}]})
    out = tmp_path / "out"
    assert main(["merge", str(r), str(out), "--out-shard-size", "200KB", "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    assert "OK (2 shard(s), 2 tensors; every file)" in capsys.readouterr().out
    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "checksum does not match" in capsys.readouterr().err


def test_verify_reads_manifests_that_record_sha256(tmp_path, capsys) -> None:
    """Outputs of versions before BLAKE3 shard checksums still verify, and still catch edits."""
    import hashlib

    a = write_model(tmp_path / "a", {"w": torch.randn(100, 100)})
    r = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [{"model": str(a)}]})
    out = tmp_path / "out"
    assert main(["merge", str(r), str(out), "--no-progress"]) == 0
    mpath = out / "merganser_manifest.json"
    manifest = json.loads(mpath.read_text())
    shard = out / "model.safetensors"
    info = manifest["shards"]["model.safetensors"]
    del info["blake3"]
    info["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    mpath.write_text(json.dumps(manifest))
    assert main(["verify", str(out)]) == 0
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "checksum does not match" in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("linear", "task_arithmetic", "passthrough"):
        assert f"\n{name}:" in "\n" + out


def test_tiny_then_merge_as_a_real_process(tmp_path) -> None:
    r = run_cli("tiny", str(tmp_path / "fam"), "--experts", "1")
    assert r.returncode == 0, r.stderr
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tmp_path / "fam" / "base"),
            "models": [{"model": str(tmp_path / "fam" / "expert_1")}],
        },
    )
    r = run_cli("merge", str(recipe), str(tmp_path / "o"))
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no progress bar in a pipe
    assert (tmp_path / "o" / "merganser_manifest.json").is_file()


def _entry_then(argv: list[str], probe: str, setup: str = "") -> str:
    """Run the console script's ``entry`` in a fresh interpreter (after ``setup``); print
    ``probe`` after it.
    """
    import subprocess
    import sys

    code = (
        "import gc, sys\n"
        f"{setup}"
        f"sys.argv = {['merganser', *argv]!r}\n"
        "from merganser import cli\n"
        "try:\n    cli.entry()\nexcept SystemExit:\n    pass\n"
        f"print({probe})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return r.stdout.strip().splitlines()[-1]


def test_the_console_script_prefetches_until_the_merge_is_written(tmp_path) -> None:
    # The engine computes the ranges the prefetch brought in with no reads of its own, so the
    # prefetch goes on (to its limit) while the merge runs, and is stopped only after it.
    m = write_model(tmp_path / "m", {"w": torch.ones(4)})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "models": [{"model": str(m)}]}))
    out = tmp_path / "out"
    setup = (
        "import os\nfrom merganser.storage import pagecache\nseen = []\n"
        "stop = pagecache.Prefetch.stop\n"
        "pagecache.Prefetch.stop = lambda self: "
        f"(seen.append(os.path.exists({str(out)!r})), stop(self))[1]\n"
    )
    assert _entry_then(["merge", str(recipe), str(out), "--no-progress"], "seen", setup) == "[True]"


def test_importing_the_package_help_and_usage_errors_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, merganser\n"
        "print('torch' in sys.modules)\n"
        "from merganser import MergeOptions, merge\n"
        "print('torch' in sys.modules, callable(merge), MergeOptions().force)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["False", "True", "True", "False"]
    assert _entry_then(["--help"], "'torch' in sys.modules") == "False"
    assert _entry_then(["merge", "--help"], "'torch' in sys.modules") == "False"
    assert _entry_then(["no-such-command"], "'torch' in sys.modules") == "False"


def test_the_console_script_freezes_what_its_imports_built() -> None:
    # torch's objects in the permanent generation: the GC no longer walks them (start-up, exit).
    assert int(_entry_then(["methods"], "gc.get_freeze_count()")) > 100_000
    assert _entry_then(["methods"], "gc.isenabled()") == "True"


def test_merge_flags_reach_the_merge_options(monkeypatch, tmp_path) -> None:
    """The CLI's defaults are the API's, and --device/--gpu-memory arrive as given."""
    from merganser import api

    seen: list[api.MergeOptions] = []

    def fake_merge(recipe, out, options):
        seen.append(options)
        return out

    monkeypatch.setattr(api, "merge", fake_merge)
    assert main(["merge", "r.yaml", str(tmp_path / "a")]) == 0
    assert seen[-1] == api.MergeOptions()
    argv = ["merge", "r.yaml", str(tmp_path / "b"), "--device", "cuda", "--gpu-memory", "2GiB"]
    assert main(argv) == 0
    assert (seen[-1].device, seen[-1].gpu_memory) == ("cuda", 2 << 30)


def test_every_merge_flag_is_documented_and_no_other() -> None:
    """docs/options.md lists exactly the flags MergeOptions generates (options.py)."""
    import re

    from merganser.cli import build_parser

    merge = build_parser()._subparsers._group_actions[0].choices["merge"]  # type: ignore[union-attr]
    flags = {s for a in merge._actions for s in a.option_strings if s not in ("-h", "--help")}
    doc = (REPO / "docs" / "options.md").read_text()
    documented = set()
    for cell in re.findall(r"^\| `([^`]+)` \|", doc, flags=re.M):
        documented |= {"--" + f.lstrip("-") for f in cell.split("/")}
    assert documented == flags, (sorted(flags - documented), sorted(documented - flags))


def test_the_parameter_table_in_the_docs_is_the_registry(capsys) -> None:
    """docs/methods.md embeds `merganser methods --markdown`; regenerate it when this fails."""
    assert main(["methods", "--markdown"]) == 0
    table = capsys.readouterr().out
    doc = (REPO / "docs" / "methods.md").read_text()
    start = doc.index("<!-- generated: merganser methods --markdown -->\n")
    end = doc.index("<!-- end generated -->")
    assert doc[start:end].split("\n", 1)[1] == table
    assert "| `magmax` | `lambda` | global | `0.5` |" in table
