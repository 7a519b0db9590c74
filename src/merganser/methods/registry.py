"""The method registry: each merge method is one pure function over tensors plus its schema."""

from __future__ import annotations

import difflib
import keyword
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from merganser.errors import RecipeError

if TYPE_CHECKING:
    import torch

Scope = Literal["model", "global"]
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class Param:
    """One parameter of a method: per-model (a list, one per input) or global (one value)."""

    name: str
    scope: Scope
    default: Any  # None: required (mergekit has no default either)
    kind: type = float
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""
    # mergekit spells some choices as booleans (``rescale: true``): (value for false, for true).
    bool_map: tuple[str, str] | None = None
    # The paper's (or its official code's) value where it differs from the default, which is
    # mergekit's for every method mergekit has: the paper's behaviour is one parameter away.
    paper: Any = None

    @property
    def arg(self) -> str:
        """The Python keyword argument name (``lambda`` becomes ``lambda_``)."""
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def check(self, value: Any, where: str) -> Any:
        """Validate and coerce one evaluated value."""
        if self.kind is bool:
            flag = as_bool(value)
            if flag is None:
                raise RecipeError(f"{where}: expected true or false (or 1 or 0), got {value!r}")
            return flag
        if self.kind is str:
            if isinstance(value, bool) and self.bool_map is not None:
                value = self.bool_map[int(value)]
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                opts = " or ".join(self.choices or ())
                raise RecipeError(f"{where}: expected {opts or 'a string'}, got {value!r}")
            return value
        if isinstance(value, str):
            value = _number(value)  # YAML 1.1 reads 1e-10 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where}: must be finite, got {value}")
        if abs(value) > FLOAT32_MAX:  # the math runs in float32
            raise RecipeError(f"{where}: {value:g} is beyond float32's range (±{FLOAT32_MAX:.4g})")
        if self.kind is int:
            if value != int(value):
                raise RecipeError(f"{where}: expected an integer, got {value!r}")
            value = int(value)
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise RecipeError(
                f"{where}: {value} is out of range [{_fmt(self.low)}, {_fmt(self.high)}]"
            )
        return float(value) if self.kind is float else value


def as_bool(value: Any) -> bool | None:
    """A recipe's boolean: true/false, or the numbers 1/0 that model cards write
    (``normalize: 1.0``; mergekit reads any truthy value); None for anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return None


def _number(text: str) -> int | float | str:
    """A number written as a string, as mergekit (pydantic) reads one: ``"1e-10"`` is 1e-10,
    ``"3"`` is 3; anything else stays the string (and is refused).
    """
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _fmt(x: float | None) -> str:
    return "-inf" if x is None else f"{x:g}"


class WholeModelStats(Protocol):
    """Whole-model statistics gathered in streaming passes before the merge pass (a method's
    ``stats``): the engine feeds each tensor's float32 inputs once per pass, never holding more
    than the tensors in flight; ``params_for`` then gives each tensor's extra arguments.

    A statistic with ``chunked = True`` is fed pieces of a tensor instead (flat, starting at
    multiples of blockwise.BLOCK, in any order and on any thread): ``start`` is a piece's first
    entry and ``shape`` the whole tensor's. Otherwise ``start`` is 0 and ``shape`` the tensors'.
    """

    passes: int

    def observe(
        self,
        pass_index: int,
        name: str,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: dict[str, Any],
        start: int,
        shape: tuple[int, ...],
    ) -> None: ...

    def end_pass(self, pass_index: int) -> None: ...

    def params_for(self, name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Method:
    """A registered merge method.

    ``fn(tensors, base, **params)`` when ``needs_base`` else ``fn(tensors, **params)``; per-model
    parameters arrive as lists aligned with ``tensors``. Tensors are float32.
    """

    name: str
    fn: Callable[..., Any]
    reference: str
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    # Elementwise methods may be fed any slice of a tensor, which bounds memory for huge tensors.
    elementwise: bool = False
    min_models: int = 1
    max_models: int | None = None
    # Extra float32 working copies of the inputs the method allocates, for the memory budget.
    workspace: float = 1.0
    experimental: bool = False
    aliases: tuple[str, ...] = field(default=())
    # Uses the base when the recipe names one (fn always takes ``base``, possibly None).
    optional_base: bool = False
    # Takes a ``seed`` argument derived from the recipe's random_seed and the tensor name.
    stochastic: bool = False
    # Per-tensor check of evaluated parameters; returns an error message or None.
    validate: Callable[[dict[str, Any]], str | None] | None = None
    # Factory for whole-model statistics gathered in extra passes before merging (or None).
    stats: Callable[[dict[str, Any]], WholeModelStats | None] | None = None
    # Parameters mergekit accepts for this method but that have no effect on it.
    ignored: frozenset[str] = frozenset()
    # Calibration statistics each model must bring ("gram" or "fisher", from `merganser
    # calibrate`); fn then takes ``stats``: one tensor (or None) per model for this tensor.
    statistics: str | None = None
    # Arguments ``fn`` takes for tensor ``name`` from each model's statistics-file metadata
    # (one mapping per model), and the metadata a statistics file carries, computed from its
    # tensors where the statistics are in memory rather than a `merganser calibrate` file.
    statistics_params: Callable[[list[Mapping[str, str]], str], dict[str, Any]] | None = None
    statistics_metadata: Callable[[Mapping[str, torch.Tensor]], dict[str, str]] | None = None
    # ``blockwise(params, shape)``: a BlockMerge that computes fn's result block by block (after
    # statistic passes over the blocks), or None where the whole tensor is needed at once.
    blockwise: Callable[[dict[str, Any], tuple[int, ...]], Any] | None = None

    def bind(
        self,
        value: Callable[[Param, int | None], tuple[Any, str]],
        n_models: int,
        where: str,
    ) -> dict[str, Any]:
        """The keyword arguments of one call: each parameter's value (``value(param, model)``
        gives it, or None for the default, with where it was set; ``model`` is None for a
        global parameter), checked, then the method's own validation. One binding for the
        streaming engine's plan and for ``merge_tensors``.
        """
        out: dict[str, Any] = {}
        for p in self.params:
            models = range(n_models) if p.scope == "model" else [None]
            vals = []
            for i in models:
                v, at = value(p, i)
                if v is None and p.default is None:
                    raise RecipeError(f"{at}: {p.name} is required for {self.name}")
                vals.append(p.check(p.default if v is None else v, at))
            out[p.arg] = vals if p.scope == "model" else vals[0]
        if self.validate is not None and (problem := self.validate(out)):
            raise RecipeError(f"{where}: {problem}")
        return out

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def takes_base(self) -> bool:
        return self.needs_base or self.optional_base

    def __call__(self, tensors: list[Any], base: Any = None, **params: Any) -> Any:
        if self.takes_base:
            return self.fn(tensors, base, **params)
        return self.fn(tensors, **params)


# Parameters mergekit accepts that only tune its own memory use; accepted and ignored here.
IGNORED_PARAMS = frozenset({"int8_mask"})

_REGISTRY: dict[str, Method] = {}


def register(name: str, **fields: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a tensor function as merge method ``name``; ``fields`` are
    ``Method``'s (its one list of what a method may declare).
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        m = Method(name=name, fn=fn, **fields)
        for key in (name, *m.aliases):
            if key in _REGISTRY:
                raise ValueError(f"merge method {key!r} registered twice")
            _REGISTRY[key] = m
        return fn

    return deco


def get_method(name: str, where: str = "merge_method") -> Method:
    """Look up a registered method by name, with a one-line error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        known = ", ".join(sorted({m.name for m in _REGISTRY.values()}))
        raise RecipeError(
            f"{where}: unknown merge method {name!r} ({hint}known: {known})"
        ) from None


def all_methods() -> list[Method]:
    return sorted({m.name: m for m in _REGISTRY.values()}.values(), key=lambda m: m.name)


def _range(p: Param) -> str:
    if p.choices:
        return " \\| ".join(p.choices)
    if p.kind is bool:
        return "true \\| false"
    if p.low is None and p.high is None:
        return p.kind.__name__
    return f"[{_fmt(p.low)}, {'inf' if p.high is None else f'{p.high:g}'}]"


def method_json(m: Method) -> dict[str, Any]:
    """One method's schema as plain JSON values (``merganser methods --json``)."""
    return {
        "name": m.name,
        "aliases": list(m.aliases),
        "reference": m.reference,
        "experimental": m.experimental,
        "base": "required" if m.needs_base else "optional" if m.optional_base else "unused",
        "min_models": m.min_models,
        "max_models": m.max_models,
        "statistics": m.statistics,
        "params": [
            {
                "name": p.name,
                "scope": p.scope,
                "type": p.kind.__name__,
                "required": p.default is None,
                "default": p.default,
                "low": p.low,
                "high": p.high,
                "choices": list(p.choices) if p.choices else None,
                "paper": p.paper,
                "doc": p.doc,
            }
            for p in m.params
        ],
    }


def markdown_table() -> str:
    """Every registered method's parameters as a Markdown table (docs/methods.md embeds it;
    a test checks the two agree).
    """
    rows = [
        "| method | parameter | scope | default | values | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for m in all_methods():
        name = f"`{m.name}`" + (" (experimental)" if m.experimental else "")
        if not m.params:
            rows.append(f"| {name} | — | | | | |")
        for p in m.params:
            doc = p.doc.replace("|", "\\|")
            default = "required" if p.default is None else f"`{p.default!r}`"
            if p.paper is not None:
                default += f" (paper: `{p.paper!r}`)"
            rows.append(f"| {name} | `{p.name}` | {p.scope} | {default} | {_range(p)} | {doc} |")
    return "\n".join(rows) + "\n"
