"""The model card (README.md) written beside every merged model."""

from __future__ import annotations

import json

from merganser import __version__
from merganser.model.adapter import split_ref
from merganser.pipeline.plan import Plan


def display_name(ref: str) -> str:
    """How the card names an input: a hub id as given, a local folder by its name (a Hugging
    Face cache snapshot by its repository, ``org/name``), never by its absolute path; a
    ``BASE+ADAPTER`` reference by both names.
    """
    pair = split_ref(ref)
    return "+".join(_one_name(r) for r in pair) if pair else _one_name(ref)


def _one_name(ref: str) -> str:
    parts = [p for p in ref.replace("\\", "/").split("/") if p not in ("", ".")]
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 2 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    if not ref.startswith(("/", "~", ".")) and len(parts) == 2:
        return ref  # org/name: a hub id, or a relative folder named like one
    return parts[-1] if parts else ref


def model_card(
    plan: Plan, manifest: dict[str, dict[str, object]], inputs: dict[str, str | None]
) -> str:
    """A Hugging Face model card naming the method, every input model and the exact recipe."""
    recipe = plan.recipe
    method = plan.method
    base = recipe.base_model
    models = recipe.model_paths()
    names = {ref: display_name(ref) for ref in plan.refs}
    lines = ["---"]
    if plan.reference_checkpoint.config is not None:
        lines.append("library_name: transformers")
    lines.append("base_model:")
    lines += [f"- {json.dumps(names[r])}" for r in models]
    lines += ["tags:", "- merge", "- merganser", f"- {method.name}", "---", ""]
    lines.append(f"# {names[plan.refs[plan.reference]]}-{method.name}")
    lines.append("")
    lines.append(
        f"Merged with [merganser](https://pypi.org/project/merganser/) {__version__} using "
        f"**{method.name}** ({method.reference})."
    )
    lines += ["", "## Input models", ""]
    for ref, ckpt in zip(plan.refs, plan.checkpoints, strict=True):
        role = " (base)" if ref == base else "" if ref in models else " (statistics)"
        n = sum(t.numel for t in ckpt.tensors.values())
        digest = f", tensor content blake3 `{inputs[ref]}`" if inputs.get(ref) else ""
        lines.append(
            f"- `{names[ref]}`{role}: {len(ckpt.tensors)} tensors, {n:,} parameters{digest}"
        )
    # The recipe as run, with local paths shown by folder name (merganser_recipe.yaml beside
    # the card keeps the exact text, whose sha256 the manifest records).
    shown = recipe.source_text.rstrip()
    for ref in sorted(plan.refs, key=len, reverse=True):
        if names[ref] != ref:
            shown = shown.replace(ref, names[ref])
    lines += ["", "## Recipe", "", "```yaml", shown, "```", ""]
    lines += [
        "## Provenance",
        "",
        f"- merganser version: {__version__}",
        f"- recipe sha256: `{recipe.sha256}`",
    ]
    for fname, info in manifest.items():
        lines.append(f"- `{fname}` blake3: `{info['blake3']}`")
    return "\n".join(lines) + "\n"
