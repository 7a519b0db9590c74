"""In-memory merging: tensors (or state dicts) in, a merged tensor (or state dict) out.

The same methods and parameter checks as a recipe merge, without files: for search loops,
notebooks and tests. ``merganser.merge_tensors`` is this function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from merganser.errors import MerganserError
from merganser.methods import get_method
from merganser.pipeline.plan import tensor_seed


def merge_tensors(
    method: str,
    models: Sequence[Mapping[str, torch.Tensor]] | Sequence[torch.Tensor],
    base: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    tensor_params: Callable[[str], Mapping[str, Any]] | None = None,
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
    statistics_metadata: Sequence[Mapping[str, str]] | None = None,
    **params: Any,
) -> Any:
    """Merge in memory: tensors (or state dicts) in, a tensor (or state dict) out.

    Per-model parameters are lists aligned with ``models`` (a scalar is broadcast);
    ``tensor_params(name)`` may override parameters per tensor (layer schedules, groups).
    Data-aware methods take ``statistics``: per model, the tensors `merganser calibrate` saves
    (``gram.<name>`` or ``fisher.<name>``); for single tensors, per model ``{"": stat}``.
    ``statistics_metadata`` is the metadata calibrate returned with them (which weights are
    GPT-2 ``Conv1D``, stored ``[in, out]``; whole-model Fisher norms).
    Results are computed in float32 and returned in the dtype of the first model's tensor.
    """
    m = get_method(method, "method")
    if not models:
        raise MerganserError("merge_tensors: at least one model is required")
    if m.needs_base and base is None:
        raise MerganserError(f"merge_tensors: method {method!r} needs base=")
    if m.statistics and (statistics is None or len(statistics) != len(models)):
        raise MerganserError(
            f"merge_tensors: method {method!r} needs statistics= ({m.statistics}), one per model"
        )
    seed = params.pop("seed", 0)
    known = {p.name for p in m.params} | {p.arg for p in m.params}
    if unknown := sorted(set(params) - known):
        raise MerganserError(f"merge_tensors: unknown parameter {unknown[0]!r} for {method!r}")

    def resolve(values: Mapping[str, Any]) -> dict[str, Any]:
        def value(p: Any, model: int | None) -> tuple[Any, str]:
            v = values.get(p.name, values.get(p.arg, p.default))
            if model is None:
                return v, p.name
            vs = list(v) if isinstance(v, (list, tuple)) else [v] * len(models)
            if len(vs) != len(models):
                raise MerganserError(f"merge_tensors: {p.name} needs {len(models)} values")
            return vs[model], p.name

        return m.bind(value, len(models), "merge_tensors")

    kwargs = resolve(params)
    single = isinstance(models[0], torch.Tensor)
    dicts: list[Mapping[str, torch.Tensor]] = (
        [{"": t} for t in models] if single else list(models)  # type: ignore[misc]
    )
    bases: Mapping[str, torch.Tensor] | None = (
        None if base is None else ({"": base} if single else base)  # type: ignore[dict-item]
    )
    keys = [k for k in dicts[0] if dicts[0][k].dtype.is_floating_point]

    def inputs(k: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        return [d[k].float() for d in dicts], None if bases is None else bases[k].float()

    stats = m.stats(kwargs) if m.stats is not None else None
    for p in range(stats.passes if stats is not None else 0):
        for k in keys:
            shape = tuple(dicts[0][k].shape)
            stats.observe(p, k, *inputs(k), kwargs, 0, shape)  # type: ignore[union-attr]
        stats.end_pass(p)  # type: ignore[union-attr]

    # Each model's statistics metadata: as calibrate returned it, else computed from the tensors.
    metadata: list[Mapping[str, str]] | None = None
    if statistics_metadata is not None:
        if len(statistics_metadata) != len(models):
            raise MerganserError("merge_tensors: statistics_metadata needs one mapping per model")
        metadata = list(statistics_metadata)
    elif m.statistics_params is not None:
        metadata = [
            m.statistics_metadata(s) if m.statistics_metadata is not None else {}
            for s in statistics  # type: ignore[union-attr]
        ]

    out: dict[str, torch.Tensor] = {}
    for k, first in dicts[0].items():
        if k not in keys:
            out[k] = first.clone()
            continue
        kw = kwargs if tensor_params is None else resolve({**params, **tensor_params(k)})
        extra: dict[str, Any] = {"seed": tensor_seed(seed, k)} if m.stochastic else {}
        if m.statistics:
            name = f"{m.statistics}.{k}" if k else ""
            extra["stats"] = [s.get(name) for s in statistics]  # type: ignore[union-attr]
        if m.statistics_params is not None and metadata is not None:
            extra.update(m.statistics_params(metadata, k))
        if stats is not None:
            extra.update(stats.params_for(k))
        ts, b = inputs(k)
        out[k] = m(ts, b, **kw, **extra).to(first.dtype)
    return out[""] if single else out
