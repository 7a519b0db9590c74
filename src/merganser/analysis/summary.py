"""`merganser inspect`: what a checkpoint holds, from headers alone."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from merganser.model import anatomy
from merganser.storage.checkpoint import Checkpoint
from merganser.storage.dtypes import dtype_name

_IDX = re.compile(r"\.(\d+)\.")


def summarize(path: str | Path) -> dict[str, Any]:
    """Architecture, parameter count, dtypes, files and a grouped list of tensor names."""
    with Checkpoint(path) as ckpt:
        cfg = ckpt.config or {}
        groups: Counter[str] = Counter()
        shapes: dict[str, list[int]] = {}
        for name, info in ckpt.tensors.items():
            key = _IDX.sub(".*.", name)
            groups[key] += 1
            shapes.setdefault(key, list(info.shape))
        dtypes: Counter[str] = Counter()
        for info in ckpt.tensors.values():
            dtypes[dtype_name(info.dtype)] += info.numel
        archs, model_type = cfg.get("architectures"), cfg.get("model_type")
        side_files = [p.name for p in ckpt.path.iterdir()] if ckpt.path.is_dir() else []
        return {
            "path": str(ckpt.path),
            # config.json is the user's: a field of an unexpected type shows as unknown.
            "architecture": archs[0]
            if isinstance(archs, list) and archs and isinstance(archs[0], str)
            else None,
            "model_type": model_type if isinstance(model_type, str) else None,
            "num_layers": ckpt.num_layers(),
            "parameters": sum(t.numel for t in ckpt.tensors.values()),
            "tensors": len(ckpt.tensors),
            "bytes": sum(t.nbytes for t in ckpt.tensors.values()),
            "dtypes": dict(dtypes),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in ckpt.files],
            # What merging reads off the names and config (anatomy.py), shown so a user can
            # see what was inferred for a family transformers does not know.
            "stacks": anatomy.describe(ckpt.tensors, cfg),
            "experts": _experts(ckpt.tensors, cfg),
            "tied_embeddings": anatomy.tied_embeddings(ckpt.tensors, cfg),
            "weights": anatomy.weight_format(ckpt.tensors, cfg, side_files) or "plain",
            "groups": [{"pattern": k, "count": n, "shape": shapes[k]} for k, n in groups.items()],
        }


def _experts(tensors: Any, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The MoE layout the names show, with the config's experts per token and shared experts
    (Mixtral's num_experts_per_tok; Qwen-MoE's shared_expert_intermediate_size; DeepSeek's
    n_shared_experts).
    """
    found = anatomy.experts(tensors)
    if found is None:
        return None
    per = cfg.get("num_experts_per_tok")
    shared = cfg.get("n_shared_experts") or (1 if cfg.get("shared_expert_intermediate_size") else 0)
    return {**found, "per_token": per if isinstance(per, int) else None, "shared": shared}


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"path:         {s['path']}",
        f"architecture: {s['architecture'] or 'unknown'} ({s['model_type'] or '-'})",
        f"layers:       {s['num_layers'] if s['num_layers'] is not None else 'unknown'}",
        f"parameters:   {s['parameters']:,} in {s['tensors']} tensors "
        f"({s['bytes'] / 2**20:.1f} MiB)",
        "dtypes:       " + ", ".join(f"{k} ({v:,})" for k, v in s["dtypes"].items()),
        f"weights:      {s['weights']}",
        f"files:        {len(s['files'])}",
    ]
    lines += [f"  {f['name']}  {f['bytes'] / 2**20:.1f} MiB" for f in s["files"]]
    lines.append("layer stacks:" if s["stacks"] else "layer stacks: none found")
    for st in s["stacks"]:
        where = f"config {st['config']}" if st["config"] else "no count in config.json"
        lines.append(f"  {st['prefix']}.N  {st['layers']} layers ({where})")
    if s["experts"]:
        e = s["experts"]
        count = f"{e['experts']} experts, " if e["experts"] else ""
        per = f"{e['per_token']} per token, " if e.get("per_token") else ""
        shared = f"{e['shared']} shared, " if e.get("shared") else ""
        lines.append(f"experts:      {count}{per}{shared}{e['layout'].replace('_', ' ')} tensors")
    if s["tied_embeddings"]:
        lines.append("embeddings:   tied (the head shares the input embedding)")
    lines.append("tensors:")
    width = max(len(g["pattern"]) for g in s["groups"])
    for g in s["groups"]:
        count = f"x{g['count']}" if g["count"] > 1 else ""
        lines.append(f"  {g['pattern']:<{width}}  {count:>5}  {g['shape']}")
    return "\n".join(lines)
