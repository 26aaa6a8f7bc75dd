"""Training curves from a run's ``metrics.jsonl``, one PNG per group.

``python -m rlcs_fast.plot RUN_DIR [--out DIR]`` (default ``RUN_DIR/plots``). Both stages share one x
axis: GRPO's steps continue after the last SFT step, and a dashed line marks where GRPO starts. A group
with no data in the run (e.g. KL in an SFT-only run) is not drawn. Needs matplotlib
(``pip install 'rlcs-fast[plot]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .metrics import read_metrics

STAGE_ORDER = ("sft", "grpo")
# group (file name) -> (title, y label, metrics drawn)
GROUPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "loss": ("Loss", "nats / token", ("train/loss", "val/loss")),
    "reward": ("Reward (train rollouts)", "mean reward",
               ("reward/overall", "reward/accuracy", "reward/format")),
    "accuracy": ("Accuracy: train reward and validation", "accuracy", ("reward/accuracy", "val/accuracy")),
    "kl": ("KL to the reference policy", "KL (per token)", ("actor/kl",)),
    "entropy": ("Policy entropy", "nats / token", ("actor/entropy",)),
    "response_length": ("Response length", "tokens", ("response/length", "response/length_max")),
    "throughput": ("Throughput", "tokens / s", ("perf/tokens_per_s",)),
}


def _matplotlib():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'rlcs-fast[plot]'") from e
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def stage_offsets(rows: list[dict[str, Any]]) -> dict[str, int]:
    """x offset of each stage: a stage starts after the last step of the stages before it."""
    last: dict[str, int] = {}
    for r in rows:
        last[r["stage"]] = max(last.get(r["stage"], 0), int(r.get("step", 0)))
    offsets, start = {}, 0
    for stage in [s for s in STAGE_ORDER if s in last] + sorted(set(last) - set(STAGE_ORDER)):
        offsets[stage] = start
        start += last[stage]
    return offsets


def series(rows: list[dict[str, Any]], key: str,
           offsets: dict[str, int]) -> dict[str, tuple[list[int], list[float]]]:
    """Per stage, (global steps, values) of one metric; non-numeric values (e.g. "nan") are dropped."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        xs, ys = out.setdefault(r["stage"], ([], []))
        xs.append(offsets[r["stage"]] + int(r.get("step", 0)))
        ys.append(float(v))
    return out


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per group that has data; returns the paths written."""
    plt = _matplotlib()
    rows = [r for r in read_metrics(run_dir) if "stage" in r]
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    offsets = stage_offsets(rows)
    written = []
    for name, (title, ylabel, keys) in GROUPS.items():
        drawn = {k: series(rows, k, offsets) for k in keys}
        if not any(drawn.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        for key, per_stage in drawn.items():
            for stage, (xs, ys) in per_stage.items():
                order = sorted(range(len(xs)), key=xs.__getitem__)
                ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", markersize=3,
                        label=f"{key} ({stage})")
        for stage, start in offsets.items():
            if start > 0:
                ax.axvline(start, color="gray", linestyle="--", linewidth=1)
                ax.annotate(f"{stage} starts", (start, 1), xycoords=("data", "axes fraction"), fontsize=8,
                            ha="left", va="top", color="gray")
        ax.set(title=title, xlabel="step (" + " then ".join(offsets) + ")", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"rlcs_fast.plot: {args.run_dir!r} has no metrics.jsonl (give a run directory, run.dir)",
              file=sys.stderr)
        return 2
    try:
        paths = plot_run(args.run_dir, args.out)
    except ImportError as e:
        print(f"rlcs_fast.plot: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
