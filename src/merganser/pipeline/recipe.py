"""Merge recipes: a validated superset of mergekit's YAML format.

A parameter value is a scalar, a gradient (list of numbers interpolated over layer depth), or a
list of ``{filter, value}`` overrides matched as substrings of tensor names, first match wins.
Validation happens here, before any checkpoint is opened.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from merganser.errors import RecipeError, did_you_mean
from merganser.storage import safejson
from merganser.storage.inputs import read_text

MAX_GRADIENT_POINTS = 4096
MAX_SEED = 2**32 - 1
# Merges of 2-16 models are the common case and soups reach 72 (Wortsman et al. 2022); a
# 900-model Model Stock has been asked for. Far more is an accident: each model costs a file
# descriptor set and a read of every tensor (`merganser plan` states the total first).
MAX_MODELS = 1024
VOCAB_POLICIES = ("error", "common_submatrix", "base")

Scalar = float | int | bool | str


@dataclass(frozen=True)
class Gradient:
    """Values at evenly spaced depths; evaluated by piecewise-linear interpolation at t in [0,1]."""

    points: tuple[float, ...]

    def at(self, t: float) -> float:
        # Same arithmetic as mergekit's evaluate_setting, so gradients give identical numbers.
        scaled = t * (len(self.points) - 1)
        i0 = int(scaled)
        i1 = min(len(self.points) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * self.points[i0] + frac * self.points[i1]


@dataclass(frozen=True)
class Conditional:
    """Ordered ``(filter, value)`` pairs; a ``None`` or ``"*"`` filter matches every tensor."""

    rules: tuple[tuple[str | None, Scalar | Gradient], ...]


ParamValue = Scalar | Gradient | Conditional


def evaluate(value: ParamValue, tensor_name: str, t: float) -> Scalar | None:
    """The value a parameter takes for one tensor at layer depth ``t``."""
    if isinstance(value, Gradient):
        return value.at(t)
    if isinstance(value, Conditional):
        for filt, v in value.rules:
            if filt is None or filt == "*" or filt in tensor_name:
                return evaluate(v, tensor_name, t)
        return None
    return value


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _scalar(v: Any, key: str) -> Scalar:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{key}: must be a finite number, got {v}")
    return v


def parse_value(v: Any, key: str, allow_conditional: bool = True) -> ParamValue:
    """A parameter in recipe syntax: a number, a layer gradient, or ``{filter, value}`` rules."""
    if isinstance(v, (bool, int, float, str)):
        return _scalar(v, key)
    if isinstance(v, dict) and allow_conditional:
        return parse_value([v], key)
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{key}: empty list (expected numbers or {{filter, value}} entries)")
        if all(_is_number(e) for e in v):
            if len(v) > MAX_GRADIENT_POINTS:
                raise ValueError(
                    f"{key}: gradient has {len(v)} points (at most {MAX_GRADIENT_POINTS})"
                )
            return Gradient(tuple(float(_scalar(e, key)) for e in v))
        if allow_conditional and all(isinstance(e, dict) for e in v):
            rules = []
            for i, e in enumerate(v):
                extra = set(e) - {"filter", "value"}
                if extra:
                    raise ValueError(f"{key}[{i}]: unknown key {sorted(extra)[0]!r}")
                if "value" not in e:
                    raise ValueError(f"{key}[{i}]: missing 'value'")
                filt = e.get("filter")
                if filt is not None and not isinstance(filt, str):
                    raise ValueError(f"{key}[{i}].filter: expected a string")
                rules.append((filt, parse_value(e["value"], f"{key}[{i}].value", False)))
            return Conditional(tuple(rules))
    raise ValueError(
        f"{key}: expected a number, a list of numbers (layer gradient) or a list of "
        f"{{filter, value}} entries, got {type(v).__name__}"
    )


def _parse_params(v: Any) -> dict[str, ParamValue] | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"expected a mapping of parameter names to values, got {type(v).__name__}")
    out: dict[str, ParamValue] = {}
    for k, val in v.items():
        if not isinstance(k, str):
            raise ValueError(f"parameter names must be strings, got {k!r}")
        out[k] = parse_value(val, k)
    return out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class _HasParams(_Strict):
    parameters: Any = None

    @field_validator("parameters", mode="before")
    @classmethod
    def _check_params(cls, v: Any) -> dict[str, ParamValue] | None:
        return _parse_params(v)


def _model_ref(v: Any) -> Any:
    if isinstance(v, str) and not v.strip():
        raise ValueError("expected a model path or hub id, got an empty string")
    return v


class ModelEntry(_HasParams):
    model: str
    statistics: str | None = None  # `merganser calibrate` output, for data-aware methods

    _check_model = field_validator("model")(classmethod(lambda cls, v: _model_ref(v)))


class SliceSource(_HasParams):
    model: str
    layer_range: tuple[int, int]

    _check_model = field_validator("model")(classmethod(lambda cls, v: _model_ref(v)))


class OutputSlice(_HasParams):
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None

    _check_base = field_validator("base_model")(classmethod(lambda cls, v: _model_ref(v)))


class OutputModule(_HasParams):
    """One part of a multi-stack model (mergekit's ``modules:``): its own models or slices."""

    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None


class TokenSource(_Strict):
    """Where a token's row comes from (mergekit's ``tokenizer.tokens.<t>.source``)."""

    kind: str  # "model_token" or "zero"
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


class TokenEntry(_Strict):
    source: str | TokenSource
    force: bool = False


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary's source, padding and the rows
    of chosen tokens.
    """

    source: str = "union"
    pad_to_multiple_of: int | None = None
    tokens: dict[str, TokenEntry] | None = None
    # merganser's own: how a model's missing token is filled. mergekit: one shared row (the
    # base's, or the mean of the models that have it); pieces: the mean of the model's own
    # rows for the pieces its tokenizer splits the token's text into (as tokensurgeon does).
    fill: str = "mergekit"

    @field_validator("fill")
    @classmethod
    def _check_fill(cls, v: str) -> str:
        if v not in ("mergekit", "pieces"):
            raise ValueError(f"expected mergekit or pieces, got {v!r}")
        return v

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _check_pad(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 1 << 20:
            raise ValueError(f"expected an integer from 1 to {1 << 20}, got {v}")
        return v


class Recipe(_HasParams):
    """A merge recipe (mergekit-compatible fields plus merganser's own)."""

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    random_seed: int | None = None
    # Embedding/head matrices of different vocabulary sizes: error, common_submatrix or base.
    vocab_policy: str = "error"

    _check_refs = field_validator("base_model", "tokenizer_source")(
        classmethod(lambda cls, v: _model_ref(v))
    )

    @field_validator("random_seed", mode="before")
    @classmethod
    def _check_seed(cls, v: Any) -> int | None:
        # numpy's seeds (and so mergekit's, which seeds numpy) are 32-bit unsigned.
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_SEED:
            raise ValueError(f"expected an integer from 0 to {MAX_SEED}, got {str(v)[:40]}")
        return v

    @field_validator("vocab_policy")
    @classmethod
    def _check_vocab_policy(cls, v: str) -> str:
        if v not in VOCAB_POLICIES:
            raise ValueError(f"expected one of {', '.join(VOCAB_POLICIES)}, got {v!r}")
        return v

    # Where relative model paths are resolved when they do not exist relative to the cwd.
    source_dir: Path | None = None
    source_name: str = "<recipe>"
    source_text: str = ""
    source_file: Path | None = None  # the YAML file it was read from, if any

    def model_paths(self) -> list[str]:
        paths = [self.base_model] if self.base_model else []
        for m in self.models or []:
            paths.append(m.model)
        for s in self.slices or []:
            paths.extend(src.model for src in s.sources)
        for mod in (self.modules or {}).values():
            paths.extend(m.model for m in mod.models or [])
            for s in mod.slices or []:
                paths.extend(src.model for src in s.sources)
        return list(dict.fromkeys(p for p in paths if p))

    def resolve(self, ref: str) -> Path:
        p = Path(os.path.expanduser(ref))
        if not p.is_absolute() and not p.exists() and self.source_dir is not None:
            alt = self.source_dir / p
            if alt.exists():
                return alt
        return p

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "recipe"


def format_error(err: dict[str, Any]) -> str:
    """One line for a pydantic error: where (dotted path) and what was expected."""
    loc = _format_loc(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
    typ, msg = err["type"], err["msg"]
    if typ == "extra_forbidden":
        return f"{loc}: unknown key{did_you_mean(str(err['loc'][-1]), _ALL_KEYS)}"
    if typ == "missing":
        return f"{loc}: required key is missing"
    if typ == "value_error":
        msg = msg.removeprefix("Value error, ")
        if loc == "recipe":
            return msg
        # Parameter validators name the sub-key themselves ("weight[0]: ..."); others do not.
        head, sep, _ = msg.partition(":")
        return f"{loc}.{msg}" if sep and " " not in head else f"{loc}: {msg}"
    inp = err.get("input")
    shown = repr(inp) if not isinstance(inp, (dict, list)) else type(inp).__name__
    return f"{loc}: {msg.lower()}, got {shown[:60]}"


def parse_recipe(
    data: Any, name: str = "<recipe>", source_dir: Path | None = None, file: Path | None = None
) -> Recipe:
    """Validate an already-parsed recipe mapping (``file``: the YAML file it came from)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: expected a YAML mapping at the top level")
    if "experts" in data and "merge_method" not in data:
        raise RecipeError(
            f"{name}: a mergekit-moe config (it has experts:): build it with `merganser moe "
            "CONFIG OUT`; `merge` takes merge recipes (merge_method:, models:)"
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise RecipeError(f"{name}: {key}: unknown key{did_you_mean(str(key), _TOP_KEYS)}")
    text = yaml.safe_dump(data, sort_keys=True)
    try:
        recipe = Recipe.model_validate(
            {
                **data,
                "source_dir": source_dir,
                "source_name": name,
                "source_text": text,
                "source_file": file,
            }
        )
    except ValidationError as e:
        errors = e.errors()
        # A union failure lists each branch; the first is the most informative.
        raise RecipeError(f"{name}: {format_error(errors[0])}") from None
    if recipe.tokenizer is not None and recipe.tokenizer_source is not None:
        raise RecipeError(f"{name}: give tokenizer_source or a tokenizer: block, not both")
    for tok, entry in ((recipe.tokenizer and recipe.tokenizer.tokens) or {}).items():
        src = entry.source
        ok = isinstance(src, str) or (
            (
                src.kind == "zero"
                and src.model is None
                and src.token is None
                and src.token_id is None
            )
            or (
                src.kind == "model_token"
                and src.model
                and (src.token is None) != (src.token_id is None)
            )
        )
        if not ok:
            raise RecipeError(
                f"{name}: tokenizer.tokens.{tok}.source: expected a model, {{kind: zero}}, or "
                "{kind: model_token, model: M, token: T | token_id: N}"
            )
    given = [k for k in ("models", "slices", "modules") if getattr(recipe, k)]
    if not given:
        raise RecipeError(
            f"{name}: models: at least one model is required (or give slices or modules)"
        )
    if len(given) > 1:
        raise RecipeError(
            f"{name}: give one of models, slices or modules, not {' and '.join(given)}"
        )
    for key, mod in (recipe.modules or {}).items():
        if bool(mod.models) == bool(mod.slices):
            raise RecipeError(f"{name}: modules.{key}: give either models or slices")
    n = len(recipe.model_paths())
    if n > MAX_MODELS:
        raise RecipeError(
            f"{name}: names {n} models; at most {MAX_MODELS} (every output tensor reads each "
            "of them)"
        )
    return recipe


_INTERNAL = {"source_dir", "source_name", "source_text", "source_file"}
_TOP_KEYS = set(Recipe.model_fields) - _INTERNAL
_ALL_KEYS = {
    k for c in (ModelEntry, SliceSource, OutputSlice, OutputModule, Recipe) for k in c.model_fields
} - _INTERNAL


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping with different values
    (plain YAML lets the last one win without a word). The same key and value twice, as some
    published model cards have it (``merge_method: della_linear`` twice), means one thing
    and is read once.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key; the base class reports it
                break
            value = self.construct_object(value_node, deep=True)
            if duplicate and seen[key] != value:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice with different values",
                    key_node.start_mark,
                )
            seen[key] = value
        return super().construct_mapping(node, deep=deep)


# Recipes nest a few levels (slices > sources > parameters > filter rules); far deeper is an
# attack or an accident, refused before anything walks it recursively.
MAX_RECIPE_DEPTH = 32
MAX_RECIPE_BYTES = 16 << 20


def read_yaml(path: str | os.PathLike[str], what: str = "recipe") -> tuple[str, Any]:
    """A YAML file's text and safely parsed data; any problem is one line naming the file.

    Limits: at most MAX_RECIPE_BYTES, nesting at most MAX_RECIPE_DEPTH levels, integers of at
    most 4300 digits (Python's own limit), no key twice in a mapping.
    """
    text, docs = read_yaml_documents(path, what)
    if len(docs) != 1:
        raise RecipeError(f"{path}: expected one YAML document, found {len(docs)}")
    return text, docs[0]


def read_yaml_documents(
    path: str | os.PathLike[str], what: str = "recipe"
) -> tuple[str, list[Any]]:
    """A YAML file's text and its documents (mergekit-multimerge files hold several,
    separated by ``---``), with read_yaml's checks; empty documents are left out.
    """
    p = Path(path)
    text = read_text(p, what, MAX_RECIPE_BYTES, RecipeError)
    try:
        docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise RecipeError(f"{p}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{p}: {what} nests deeper than {MAX_RECIPE_DEPTH} levels") from None
    except ValueError as e:  # an integer beyond Python's digit limit
        raise RecipeError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from None
    if not docs:
        raise RecipeError(f"{p}: the {what} is empty")
    if any(safejson.depth(d) > MAX_RECIPE_DEPTH for d in docs):
        raise RecipeError(f"{p}: {what} nests deeper than {MAX_RECIPE_DEPTH} levels")
    return text, docs


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and validate a YAML recipe file."""
    p = Path(path)
    text, data = read_yaml(p)
    recipe = parse_recipe(data, name=str(p), source_dir=p.parent.resolve(), file=p)
    return recipe.model_copy(update={"source_text": text})
