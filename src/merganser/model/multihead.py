"""A partially zipped model (ZipIt!, spec §8.2): one shared trunk, one head per source model.

The trunk is the zipped embeddings and first k blocks, in the merged residual basis. Head i
maps the merged residual stream back into model i's basis with its unmerge Uᵢ (d × d), then
runs model i's own blocks k..L−1, final norm and lm_head. Each head is a plain
``LlamaForCausalLM`` that shares the trunk's modules, so evaluation and generation work as for
any causal LM; a task is routed to its head by name.

On disk: ``config.json`` (``model_type: merganser_multihead``, the Llama config nested, the
head names and routes), ``model.safetensors`` (trunk tensors under their Llama names; head
tensors under ``heads.<name>.``) and the tokenizer files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.model.naming import layer_of

MODEL_TYPE = "merganser_multihead"


class _Unmerge(torch.nn.Module):
    """Runs ``inner`` on the hidden states mapped into one model's residual basis."""

    def __init__(self, inner: torch.nn.Module, matrix: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("matrix", matrix)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.inner(hidden_states @ self.matrix.T, *args, **kwargs)


class MultiHeadLM(torch.nn.Module):
    """Shared zipped trunk plus per-model heads; ``heads[name]`` is a causal LM."""

    def __init__(
        self,
        config: Any,
        shared: int,
        tensors: Mapping[str, torch.Tensor],
        names: Sequence[str],
        routes: Mapping[str, str] | None = None,
    ) -> None:
        from transformers import LlamaForCausalLM

        super().__init__()
        self.config, self.shared, self.names = config, shared, list(names)
        self.routes = dict(routes or {n: n for n in names})
        self.heads = torch.nn.ModuleDict()
        trunk = {k: v for k, v in tensors.items() if not k.startswith("heads.")}
        first: Any = None
        for name in self.names:
            prefix = f"heads.{name}."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            unmerge = own.pop("unmerge", None)
            if unmerge is None:
                raise MerganserError(f"multi-head model: head {name!r} has no unmerge matrix")
            lm = LlamaForCausalLM(config)
            missing, unexpected = lm.load_state_dict({**trunk, **own}, strict=False)
            missing = [k for k in missing if not k.endswith("inv_freq")]
            if missing or unexpected:
                raise MerganserError(
                    f"multi-head model: head {name!r}: "
                    + (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}")
                )
            body = lm.model
            if first is None:
                first = body
            else:  # one trunk, shared by every head
                body.embed_tokens = first.embed_tokens
                for i in range(shared):
                    body.layers[i] = first.layers[i]
            if shared < config.num_hidden_layers:
                body.layers[shared] = _Unmerge(body.layers[shared], unmerge)
            else:
                body.norm = _Unmerge(body.norm, unmerge)
            self.heads[name] = lm.eval()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise MerganserError(
            f"a multi-head model has no single output; pick a head ({', '.join(self.names)})"
        )


def trunk_names(names: Sequence[str], shared: int) -> list[str]:
    """The Llama tensor names that belong to the trunk of a k-block partial zip."""

    out = []
    for n in names:
        layer = layer_of(n)
        if n == "model.embed_tokens.weight" or (layer is not None and layer < shared):
            out.append(n)
    return out


def save_multihead(
    folder: str | os.PathLike[str],
    config: Any,
    shared: int,
    tensors: Mapping[str, torch.Tensor],
    names: Sequence[str],
    routes: Mapping[str, str] | None = None,
) -> None:
    """Write config.json and model.safetensors of a multi-head model into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = {
        "model_type": MODEL_TYPE,
        "architectures": ["MerganserMultiHead"],
        "shared_layers": shared,
        "heads": list(names),
        "routes": dict(routes or {n: n for n in names}),
        "llama": config.to_dict(),
    }
    (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )


def is_multihead(folder: str | os.PathLike[str]) -> bool:
    p = Path(folder) / "config.json"
    try:
        return json.loads(p.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_multihead(folder: str | os.PathLike[str]) -> MultiHeadLM:
    """Load a multi-head model folder written by :func:`save_multihead` (float32)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    folder = Path(folder)
    meta = json.loads((folder / "config.json").read_text())
    try:
        config = LlamaConfig.from_dict(meta["llama"])
        shared, names, routes = int(meta["shared_layers"]), meta["heads"], meta["routes"]
    except (KeyError, TypeError, ValueError) as e:
        raise MerganserError(f"{folder}/config.json: bad multi-head config ({e})") from None
    tensors = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    return MultiHeadLM(config, shared, tensors, names, routes)
