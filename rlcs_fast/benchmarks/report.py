"""The paper's table from the per-benchmark summaries: Markdown, JSON, a bar chart and metric rows.

Layout as in the paper: one row per model, one column per benchmark (accuracy in %), then the average
over the benchmarks the model was run on. Below it, each benchmark's own breakdowns.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from . import BENCHMARKS

log = logging.getLogger("rlcs_fast")

# The breakdowns worth a line under the table, per benchmark (all of them are in summary.json).
DETAILS = {
    "mathvista": ("task", "skills"),
    "mathverse": ("problem_version",),
    "mathvision": ("level",),
    "wemath": (),
}
WEMATH_COLUMNS = (
    "accuracy",
    "score_strict",
    "score_loose",
    "IK_rate",
    "IG_rate",
    "CM_strict_rate",
    "CM_loose_rate",
    "RM_strict_rate",
    "RM_loose_rate",
    "S1",
    "S2",
    "S3",
)


def average(per_bench: dict[str, dict[str, Any]]) -> float:
    return sum(m["accuracy"] for m in per_bench.values()) / max(len(per_bench), 1)


def paper_table(summaries: dict[str, dict[str, dict[str, Any]]], benches: list[str]) -> str:
    titles = [BENCHMARKS[b].TITLE for b in benches]
    lines = ["| model | " + " | ".join(titles) + " | Avg. |", "|---|" + "---:|" * (len(titles) + 1)]
    for model, per in summaries.items():
        cells = [f"{100 * per[b]['accuracy']:.1f}" if b in per else "–" for b in benches]
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {100 * average(per):.1f} |")
    return "\n".join(lines)


def detail_tables(summaries: dict[str, dict[str, dict[str, Any]]], benches: list[str]) -> str:
    parts = []
    models = list(summaries)
    head = "| | " + " | ".join(models) + " |\n|---|" + "---:|" * len(models)
    for b in benches:
        rows = []
        if b == "wemath":
            rows = [(k, [summaries[m].get(b, {}).get(k) for m in models]) for k in WEMATH_COLUMNS]
        for key in DETAILS[b]:
            values = sorted({v for m in models for v in summaries[m].get(b, {}).get(key, {})})
            rows += [
                (f"{key}: {v}", [summaries[m].get(b, {}).get(key, {}).get(v) for m in models]) for v in values
            ]
        if rows:
            body = "\n".join(
                f"| {k} | " + " | ".join("–" if x is None else f"{100 * x:.1f}" for x in xs) + " |"
                for k, xs in rows
            )
            parts.append(f"### {BENCHMARKS[b].TITLE}\n\n{head}\n{body}")
    return "\n\n".join(parts)


def bar_chart(summaries: dict[str, dict[str, dict[str, Any]]], benches: list[str], path: Path) -> Path | None:
    """Grouped bars: benchmarks (and the average) on the x axis, one bar per model."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no bar chart: it needs matplotlib (pip install 'rlcs-fast[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [BENCHMARKS[b].TITLE for b in benches] + ["Avg."]
    models = list(summaries)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 4))
    for k, model in enumerate(models):
        per = summaries[model]
        values = [100 * per[b]["accuracy"] if b in per else 0.0 for b in benches] + [100 * average(per)]
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, values, width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def metric_rows(summaries: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model with the scalar metrics as ``eval/<bench>/<metric>``."""
    rows = []
    for model, per in summaries.items():
        row: dict[str, Any] = {"model": model}
        for b, m in per.items():
            row.update({f"eval/{b}/{k}": v for k, v in m.items() if isinstance(v, (int, float))})
        row["eval/average/accuracy"] = average(per)
        rows.append(row)
    return rows


def write_report(
    summaries: dict[str, dict[str, dict[str, Any]]], benches: list[str], out: Path, header: str
) -> str:
    table = paper_table(summaries, benches)
    details = detail_tables(summaries, benches)
    (out / "summary.md").write_text(f"# {header}\n\naccuracy in %\n\n{table}\n\n{details}\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    with (out / "metrics.jsonl").open("w") as f:
        for row in metric_rows(summaries):
            f.write(json.dumps(row) + "\n")
    bar_chart(summaries, benches, out / "summary.png")
    return table
