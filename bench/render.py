"""Render ``bench/results/*.json`` into README.md (markdown between the bench markers) and PNG plots.

    python bench/render.py [--results bench/results] [--readme README.md] [--plots bench/results/plots]

Sources (whatever exists; nothing is typed by hand):
- ``kernels_<gpu>.json`` (``pytest bench/`` on a GPU): per op and mode, median time and peak extra memory of
  each method vs N, and the fraction of the matmul floor; PNGs of time and memory vs N, per method.
  Results of the CPU smoke variant (``settings.ci``) are not rendered: they time the interpreter.
- ``profile_*.json`` (``python -m rlcs_fast.profile --out ...``): training step throughput, MFU, memory.
- ``aot_sm90a.json`` (``bench/aot_report.py``): registers, spills, shared memory, HGMMA per kernel config.
- ``packing_ratio_cpu.json`` (``bench/packing_ratio.py``): packed vs padded token positions.
- ``overhead_<model>_cpu.json`` (``python -m rlcs_fast.profile --overhead``): a GRPO step's FLOPs, host→device
  bytes, host syncs, host seconds and rank imbalance, before and after issue 22.
Plots need matplotlib (``pip install 'rlcs-fast[plot]'``); without it the tables are still rendered.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench:begin (bench/render.py writes this part) -->", "<!-- bench:end -->"


def load(results: Path) -> dict[str, Any]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def _fmt(v: float | None, spec: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, spec)


def _env_line(env: dict[str, Any]) -> str:
    v = env.get("versions", {})
    parts = [f"torch {v.get('torch')}", f"triton {v.get('triton')}"]
    if v.get("liger_kernel"):
        parts.append(f"liger-kernel {v['liger_kernel']}")
    rev = (env.get("git_revision") or "unknown")[:12]
    return f"{env.get('device')}, {', '.join(parts)}, git {rev}, {env.get('time_utc', '')}"


def gpu_kernel_runs(data: dict[str, Any]) -> dict[str, Any]:
    return {k: d for k, d in data.items()
            if isinstance(d, dict) and d.get("kind") == "kernels" and not d.get("settings", {}).get("ci")}


def kernel_tables(name: str, run: dict[str, Any]) -> list[str]:
    out = [f"#### Kernels: {_env_line(run['environment'])} (`bench/results/{name}.json`)", ""]
    groups: dict[tuple, dict[tuple, dict[str, Any]]] = defaultdict(dict)
    methods: dict[tuple, list[str]] = defaultdict(list)
    for r in run["records"]:
        key = (r["op"], r["variant"], r["mode"])
        groups[key][(r["model"], r["N"], r["method"])] = r
        if r["method"] not in methods[key]:
            methods[key].append(r["method"])
    for (op, variant, mode), recs in groups.items():
        ms = methods[(op, variant, mode)]
        out += [f"`{op}`{variant} {mode}: median ms (peak extra GiB); last column: fraction of the floor "
                "reached by `rlcs_triton`", "",
                "| shape | N | " + " | ".join(ms) + " | floor fraction |",
                "|---|---:|" + "---:|" * (len(ms) + 1)]
        for model, n in sorted({(m, n) for m, n, _ in recs}, key=lambda x: (x[0], x[1])):
            cells = []
            for m in ms:
                r = recs.get((model, n, m))
                if r is None or r["status"] == "skipped":
                    cells.append("–")
                elif r["status"] == "oom":
                    cells.append("OOM")
                else:
                    cells.append(f"{r['median_ms']:.2f} ({_fmt(r['peak_mem_delta_gib'])})")
            mine = recs.get((model, n, "rlcs_triton"))
            frac = _fmt(mine.get("floor_fraction") if mine else None)
            out.append(f"| {model} | {n:,} | " + " | ".join(cells) + f" | {frac} |")
        out.append("")
    return out


def profile_table(data: dict[str, Any]) -> list[str]:
    runs = {k: d for k, d in data.items() if isinstance(d, dict) and d.get("kind") == "profile"
            and d["environment"]["device_type"] == "cuda"}
    if not runs:
        return []
    out = ["#### Training step (`python -m rlcs_fast.profile`)", "",
           "| model | device | layers | tokens | step ms (fwd / bwd / opt) | tokens/s | MFU | peak GiB "
           "| rollout tok/s |",
           "|---|---|---|---:|---|---:|---:|---:|---:|"]
    for _, d in sorted(runs.items()):
        t, s = d.get("scaled_to_full_depth") or d["train"], d["settings"]
        ts = t["time_s"]
        layers = (f"{s['layers_full']} (est. from {s['layers_built']})" if "scaled_to_full_depth" in d
                  else str(s["layers_built"]))
        peak = t.get("peak_memory_gib", t.get("memory", {}).get("peak_gib"))
        ro = d.get("rollout", {})
        ro_tps = _fmt(ro.get("generate_tokens_per_s"), ",.0f")
        if ro.get("decoder_layers") not in (None, s["layers_full"]):  # measured on the --layers model
            ro_tps += f" ({ro['decoder_layers']} layers)"
        out.append(f"| {d['model']} | {d['environment']['device']} | {layers} | {d['train']['tokens']:,} | "
                   f"{ts['step'] * 1e3:.0f} ({ts['forward'] * 1e3:.0f} / {ts['backward'] * 1e3:.0f} / "
                   f"{ts['optimizer'] * 1e3:.0f}) | {t['tokens_per_s']:,.0f} | {t['mfu']:.1%} | "
                   f"{_fmt(peak, '.1f')} | {ro_tps} |")
    return out + [""]


def aot_table(rows: list[dict[str, Any]], name: str) -> list[str]:
    out = [f"#### Ahead-of-time compile for {rows[0]['arch']} (`bench/aot_report.py`, "
           f"`bench/results/{name}.json`)", "",
           "Every Triton kernel and autotune config compiled on the CPU for the GPU target, as the JIT would "
           "(same specialisation): registers, spills, shared memory, and warpgroup tensor-core "
           "instructions.", "",
           "| kernel | config | regs | spill stores / loads | smem KiB | HGMMA |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        c = r["config"]
        blocks = "×".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
        cfg = f"{blocks}, {c.get('num_warps')}w/{c.get('num_stages')}s"
        out.append(f"| {r['kernel']} | {cfg} | {r['regs']} | {r['spill_stores']} / {r['spill_loads']} | "
                   f"{r['smem'] / 1024:.0f} | {r.get('hgmma', '–')} |")
    return out + [""]


def packing_table(d: dict[str, Any], name: str) -> list[str]:
    out = [f"#### Packed vs padded micro-batches (`bench/packing_ratio.py`, `bench/results/{name}.json`)", "",
           f"{d['metric']}. Public sets: lengths simulated (see the JSON's assumptions).", "",
           "| set | sequences | mean length | packed positions | padded, same micro-batches | saving | "
           "padded, length-sorted | saving |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for set_name, s in d["sets"].items():
        p, sv = s["positions"], s["packed_saving_vs"]
        out.append(f"| {set_name} | {s['sequences']:,} | {s['length']['mean']:,.0f} | {p['packed']:,} | "
                   f"{p['padded_matched']:,} | {sv['padded_matched']:.1%} | {p['padded_matched_sorted']:,} | "
                   f"{sv['padded_matched_sorted']:.1%} |")
    return out + [""]


def overhead_table(d: dict[str, Any], name: str) -> list[str]:
    from rlcs_fast.overhead import markdown

    rec, env = d["recipe"], d["environment"]
    return [f"#### A {d['model']} GRPO step's overhead, before and after issue 22 "
            f"(`python -m rlcs_fast.profile --overhead`, `bench/results/{name}.json`)", "",
            f"Counted on the CPU ({env.get('device', 'cpu')}) at the recipe's shapes: {rec['prompts']} "
            f"prompts × {rec['n']} responses, {rec['ranks']} simulated ranks, {rec['updates_per_step']} "
            "updates per step, "
            f"{rec['max_tokens_per_microbatch']:,} tokens per micro-batch, images of "
            f"{rec['min_pixels']:,}-{rec['max_pixels']:,} pixels; responses "
            f"{d['assumptions']['responses']}. Host seconds are this machine's.", "", markdown(d), ""]


def render_markdown(data: dict[str, Any]) -> str:
    lines: list[str] = []
    kernels = gpu_kernel_runs(data)
    if not kernels:
        lines += ["No GPU benchmark results yet: `bench/results/` holds no `kernels_<gpu>.json`. The figures "
                  "below come from a CPU machine (compile reports and packing arithmetic, no timings).", ""]
    for name, run in sorted(kernels.items()):
        lines += kernel_tables(name, run)
    lines += profile_table(data)
    for name, d in sorted(data.items()):
        if isinstance(d, list) and d and "arch" in d[0] and d[0]["arch"] == "sm_90a":
            lines += aot_table(d, name)
    for name, d in sorted(data.items()):
        if isinstance(d, dict) and d.get("generated_by") == "bench/packing_ratio.py":
            lines += packing_table(d, name)
    for name, d in sorted(data.items()):
        if isinstance(d, dict) and d.get("generated_by") == "rlcs_fast.overhead":
            lines += overhead_table(d, name)
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, markdown: str) -> bool:
    """Replace the text between the markers; True when the file changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(
            f"{readme}: markers not found; add these two lines where the tables go:\n{BEGIN}\n{END}"
        )
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = head + BEGIN + "\n" + markdown + END + tail
    if new != text:
        readme.write_text(new)
    return new != text


def plot(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """Time and peak memory vs N per method, one PNG per (run, op, variant, mode, shape)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/render.py: matplotlib is missing, no plots (pip install 'rlcs-fast[plot]')",
              file=sys.stderr)
        return []
    written = []
    for name, run in sorted(gpu_kernel_runs(data).items()):
        # (op, variant, mode, model) -> method -> [(N, median ms, peak GiB)]
        series: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for r in run["records"]:
            if r["status"] == "ok":
                key = (r["op"], r["variant"], r["mode"], r["model"])
                series[key][r["method"]].append((r["N"], r["median_ms"], r["peak_mem_delta_gib"]))
        for (op, variant, mode, model), by_method in series.items():
            fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
            for method, pts in sorted(by_method.items()):
                pts.sort()
                ns = [p[0] for p in pts]
                ax_t.plot(ns, [p[1] for p in pts], marker="o", label=method)
                if all(p[2] is not None for p in pts):
                    ax_m.plot(ns, [p[2] for p in pts], marker="o", label=method)
            for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (GiB)")):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("tokens N")
                ax.set_ylabel(ylabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_t.legend(fontsize=8)
            hidden = sorted({r["H"] for r in run["records"] if r["op"] == op and r["model"] == model})
            h = "/".join(map(str, hidden)) if model != "any" else "-"
            fig.suptitle(f"{op}{variant} {mode}, {model} (H={h}), {run['environment']['device']}")
            fig.tight_layout()
            path = out_dir / f"{name}__{op}{variant.replace('+', '_')}__{mode.replace('+', '_')}__{model}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/render.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(HERE / "results"))
    p.add_argument("--readme", default=str(HERE.parent / "README.md"))
    p.add_argument("--plots", default=None, help="PNG folder (default: <results>/plots)")
    args = p.parse_args(argv)
    results = Path(args.results)
    data = load(results)
    changed = update_readme(Path(args.readme), render_markdown(data))
    pngs = plot(data, Path(args.plots) if args.plots else results / "plots")
    print(f"{args.readme}: {'updated' if changed else 'unchanged'}; {len(pngs)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
