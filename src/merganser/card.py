"""The model card (README.md) written beside every merged model."""

from __future__ import annotations

import json

from merganser import __version__
from merganser.plan import Plan


def model_card(
    plan: Plan, manifest: dict[str, dict[str, object]], inputs: dict[str, str | None]
) -> str:
    """A Hugging Face model card naming the method, the inputs and the exact recipe."""
    recipe = plan.recipe
    method = plan.method
    base = recipe.base_model
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines += ["tags:", "- merge", "- merganser", f"- {method.name}", "---", ""]
    lines.append(f"# {plan.refs[plan.reference].rstrip('/').split('/')[-1]}-{method.name}")
    lines.append("")
    lines.append(
        f"Merged with [merganser](https://pypi.org/project/merganser/) {__version__} using "
        f"**{method.name}** ({method.reference})."
    )
    lines += ["", "## Input models", ""]
    for ref, ckpt in zip(plan.refs, plan.checkpoints, strict=True):
        role = " (base)" if ref == base else ""
        n = sum(t.numel for t in ckpt.tensors.values())
        digest = f", tensor content blake3 `{inputs[ref]}`" if inputs.get(ref) else ""
        lines.append(f"- `{ref}`{role}: {len(ckpt.tensors)} tensors, {n:,} parameters{digest}")
    lines += ["", "## Recipe", "", "```yaml", recipe.source_text.rstrip(), "```", ""]
    lines += [
        "## Provenance",
        "",
        f"- merganser version: {__version__}",
        f"- recipe sha256: `{recipe.sha256}`",
    ]
    for fname, info in manifest.items():
        lines.append(f"- `{fname}` blake3: `{info['blake3']}`")
    return "\n".join(lines) + "\n"
