"""Result tables (terminal, CSV, JSON) and bar charts."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def format_table(table: dict[str, dict[str, float]], columns: list[str], pct: bool = True) -> str:
    """Rows are models, columns are tasks (accuracy shown in percent)."""
    width = max(12, *(len(m) for m in table)) + 2
    head = f"{'model':<{width}}" + "".join(f"{c:>10}" for c in columns)
    lines = [head, "-" * len(head)]
    for m, row in table.items():
        cells = "".join(f"{100 * row[c]:>10.1f}" if pct else f"{row[c]:>10.3f}" for c in columns)
        lines.append(f"{m:<{width}}{cells}")
    return "\n".join(lines)


def write_csv(table: dict[str, dict[str, float]], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *columns])
        for m, row in table.items():
            w.writerow([m, *(f"{row[c]:.4f}" for c in columns)])


def write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def bar_chart(
    table: dict[str, dict[str, float]], columns: list[str], path: Path, title: str
) -> None:
    """Grouped bars: one group per task (and the average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(table)
    fig, ax = plt.subplots(figsize=(max(11, 2.2 * len(columns)), 4.8))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [c + (i - (len(models) - 1) / 2) * width for c in range(len(columns))]
        ax.bar(xs, [100 * table[m][c] for c in columns], width, label=m)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
