"""Multi-document recipes (mergekit-multimerge's format): several merges in one YAML file,
each with a ``name`` that later documents use in place of a model path.

This module only plans: the order of the merges, where each goes, and each document with the
names it uses replaced by folders. api.merge runs the steps; preview.py shows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merganser.errors import RecipeError
from merganser.pipeline.recipe import Recipe, parse_recipe

# A name becomes a folder under the intermediate directory.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Keys whose string values name a model (mergekit's ModelReference fields).
MODEL_KEYS = ("model", "base_model", "tokenizer_source")


@dataclass
class Step:
    """One merge of a multi-document recipe."""

    name: str | None  # None: the unnamed (final) document
    index: int  # its position in the file, from 1
    data: dict[str, Any]  # the document without its name
    needs: list[str]  # names of earlier merges it uses

    @property
    def label(self) -> str:
        return f"document {self.index}" + (f" ({self.name})" if self.name else "")


def plan_steps(docs: list[Any], where: str) -> list[Step]:
    """The documents' merges in an order where each comes after the merges it uses; the last
    is the final output. One line for a bad name, a name used twice, a cycle, or an ending
    that is not one merge (one unnamed document, or one named merge that no other uses).
    """
    steps: list[Step] = []
    for i, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise RecipeError(f"{where}: document {i}: expected a YAML mapping")
        data = dict(doc)
        name = data.pop("name", None)
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise RecipeError(
                f"{where}: document {i}: name {name!r} must be letters, digits, '.', '_' or "
                "'-' (it names a folder)"
            )
        steps.append(Step(name, i, data, []))
    names = [s.name for s in steps if s.name]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise RecipeError(f"{where}: name {dupes[0]!r} is given to two documents")
    for s in steps:
        s.needs = sorted(_references(s.data, set(names)))
    ordered = _ordered(steps, where)  # a cycle is refused here
    unnamed = [s for s in steps if s.name is None]
    if len(unnamed) > 1:
        raise RecipeError(
            f"{where}: {len(unnamed)} documents have no name; all but the final merge need one"
        )
    used = {n for s in steps for n in s.needs}
    ends = unnamed or [s for s in steps if s.name not in used]
    if len(ends) != 1:
        labels = ", ".join(s.label for s in ends)
        raise RecipeError(
            f"{where}: expected one final merge (unnamed, or the one merge no other uses); "
            f"found {labels}"
        )
    return [s for s in ordered if s is not ends[0]] + ends


def _references(value: Any, names: set[str]) -> set[str]:
    """Merge names used as model references anywhere in a document."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k in MODEL_KEYS and isinstance(v, str) and v in names:
                found.add(v)
            else:
                found |= _references(v, names)
    elif isinstance(value, list):
        for v in value:
            found |= _references(v, names)
    return found


def _ordered(steps: list[Step], where: str) -> list[Step]:
    """File order, each merge moved after those it uses; a cycle is one line."""
    by_name = {s.name: s for s in steps if s.name}
    done: list[Step] = []
    state: dict[int, str] = {}

    def visit(s: Step, chain: list[str]) -> None:
        if state.get(s.index) == "done":
            return
        if state.get(s.index) == "active":
            cycle = " -> ".join([*chain[chain.index(s.name or "") :], s.name or ""])
            raise RecipeError(f"{where}: merges use each other in a cycle: {cycle}")
        state[s.index] = "active"
        for n in s.needs:
            visit(by_name[n], [*chain, s.name or ""])
        state[s.index] = "done"
        done.append(s)

    for s in steps:
        visit(s, [])
    return done


def patched(data: dict[str, Any], folders: dict[str, Path]) -> dict[str, Any]:
    """The document with each merge name used as a model reference replaced by its folder."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {
                k: str(folders[v])
                if k in MODEL_KEYS and isinstance(v, str) and v in folders
                else walk(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(data)


def is_multi(docs: list[Any]) -> bool:
    """Whether a recipe file's documents are a multi-document recipe (several, or one named)."""
    return len(docs) > 1 or (isinstance(docs[0], dict) and "name" in docs[0])


def intermediate_dir(out: Path | None, chosen: str | None) -> Path:
    """Where named merges go: ``chosen``, else ``OUT.intermediate`` beside the output."""
    if chosen:
        return Path(chosen)
    return out.parent / f"{out.name}.intermediate" if out else Path("OUT.intermediate")


def recipes(path: Path, docs: list[Any], inter: Path) -> list[tuple[Step, Recipe, Path | None]]:
    """Each merge in the order it runs: its step, its recipe (merge names replaced by their
    folders under ``inter``), and its folder there (None for the final merge).
    """
    steps = plan_steps(docs, str(path))
    folders = {s.name: inter / s.name for s in steps if s.name}
    out = []
    for s in steps:
        rec = parse_recipe(
            patched(s.data, folders),
            name=f"{path}: {s.label}",
            source_dir=path.parent.resolve(),
            file=path,
        )
        out.append((s, rec, None if s is steps[-1] else folders[s.name]))  # type: ignore[index]
    return out
