"""Rewrite the generated parts of docs/ (run by `make docs`; tests/test_cli.py checks them)."""

from __future__ import annotations

from pathlib import Path

from merganser.methods import markdown_table

DOC = Path(__file__).resolve().parent.parent / "docs" / "methods.md"
START = "<!-- generated: merganser methods --markdown -->\n"
END = "<!-- end generated -->"

text = DOC.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
DOC.write_text(head + START + markdown_table() + END + tail)
print(f"wrote {DOC}")
