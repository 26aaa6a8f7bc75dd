"""The one command a lent GPU runs (through ``bench/gpu_check.sh``): every figure the project still lacks.

    python -m bench.gpu_check [--out DIR] [--smoke]

Steps, most valuable first, each a subprocess with its own time budget (a step that runs over is killed
and recorded as ``timeout``; the next one still runs). ``gpu_check.json`` and ``gpu_check.md`` in
``--out`` are rewritten after every step, so a run cut short keeps everything measured so far.

1. ``tests``: the ``gpu``-marked tests (compiled Triton kernels against float64 on the device, the CUDA
   attention backends against SDPA, packed == one-by-one in bf16, vLLM vs HF where vLLM is present).
2. ``kernels_7b`` / ``kernels_3b`` / ``kernels_qwen3vl_8b``: ``fused_linear_logprob`` and
   ``fused_linear_grpo_loss`` forward + backward at N = 16,384 tokens, H = 3,584 (7B) / 2,048 (3B) /
   4,096 (Qwen3-VL-8B), V = 151,936 in bf16, through ``pytest bench/``
   (``bench/benchlib.py``): time, peak memory, ratios to eager torch, ``torch.compile`` and Liger-Kernel
   measured in the same run, and the multiple of the 6·N·H·V matmul floor (``torch.mm`` on the device).
3. ``train_3b``: ``python -m rlcs_fast.profile --model 3b``: one packed SFT step of the full Qwen2.5-VL-3B
   architecture (random weights), tokens/s, MFU and peak memory per phase, against the memory predicted by
   ``python -m rlcs_fast.profile --plan`` for one GPU of this size.
4. ``grpo_3b``: ``python -m rlcs_fast.profile_grpo --model 3b``: one GRPO step with the transformers engine,
   each phase timed (sync, rollout, reward, train) and the old-log-prob forward that on-policy saves; and
   issue 22's figures of one more (untimed) update: host syncs, host→device bytes, tower patches with
   gradients per response (``rlcs_fast.overhead.OverheadCounter``).

``--smoke`` runs the same steps at tiny sizes on the CPU (the Triton interpreter in the kernel steps, the
tiny model with the torch kernels in the step profiles) in about 70 s of CPU time:
``tests/test_gpu_check_smoke.py`` runs it in CI so that this script cannot rot without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# pytest -k: forward+backward only, our fused op against the baselines (not the composed or chunked variants)
KERNEL_FILTER = (
    "bwd and not entropy and not composed and (rlcs_triton or eager_naive or compile_naive or liger)"
)
GPU_TEST_FILES = [
    "tests/kernels/test_on_device.py",
    "tests/test_attention.py",
    "tests/test_engine_protocol.py",
    "tests/test_distributed.py",
]


@dataclass
class Step:
    name: str
    budget_s: int  # on the GPU; a smoke step gets SMOKE_BUDGET_S
    what: str


STEPS = [
    Step("tests", 60, "gpu-marked tests: compiled kernels vs float64, attention backends, packed bf16"),
    Step("kernels_7b", 130, "fused log-prob and GRPO loss fwd+bwd at 7B shapes vs eager / compile / Liger"),
    Step("kernels_3b", 60, "the same at 3B shapes"),
    Step("kernels_qwen3vl_8b", 60, "the same at Qwen3-VL-8B's head (H 4096, V 151936), N 16384"),
    Step("train_3b", 80, "packed SFT step of Qwen2.5-VL-3B (random weights) vs the --plan memory"),
    Step("grpo_3b", 90, "GRPO step of Qwen2.5-VL-3B with the transformers engine, per phase"),
]
SMOKE_BUDGET_S = 120  # a kill limit for a loaded CI machine; each step takes 10-40 s of CPU
# under 8 minutes on a bare H100/H200, wheels installed: a lent GPU's one call, with time to rerun it
TOTAL_BUDGET_S = 480


# --- the commands ------------------------------------------------------------------------------------------


def command(step: str, out: Path, smoke: bool) -> list[str]:
    py = [sys.executable, "-m"]
    if step == "tests":
        # --timeout: pytest-timeout (on the device image), so that one hung test cannot eat the step
        limit = [] if smoke else ["--timeout", "45"]
        return py + ["pytest", *GPU_TEST_FILES, "-m", "gpu", "-q", "-p", "no:cacheprovider",
                     "--junitxml", str(out / "gpu_tests.xml"), *limit]  # fmt: skip
    if step.startswith("kernels_"):
        tests = ["bench/test_fused_linear_logprob.py", "bench/test_fused_linear_grpo_loss.py"]
        args = py + ["pytest", *tests, "-q", "-p", "no:cacheprovider", "-k", KERNEL_FILTER,
                     "--bench-out", str(out / f"{step}.json")]  # fmt: skip
        if smoke:
            return args + ["--bench-ci", "--benchmark-disable"]
        model = step.removeprefix("kernels_")
        return args + ["--bench-models", model, "--bench-tokens", "16384", "--bench-rounds", "5",
                       "--bench-warmup", "1"]  # fmt: skip
    result = ["--out", str(out / f"{step}.json")]
    if step == "train_3b":
        if smoke:
            return py + ["rlcs_fast.profile", "--model", "tiny", "--tokens", "512", "--seq-len", "128",
                         "--steps", "1", "--warmup", "0", "--kernels", "torch", *result]  # fmt: skip
        return py + ["rlcs_fast.profile", "--model", "3b", "--steps", "2", "--warmup", "1", *result]
    if step == "grpo_3b":
        if smoke:
            return py + ["rlcs_fast.profile_grpo", "--model", "tiny", "--prompts", "2", "--n", "2",
                         "--prompt-len", "8", "--image-tokens", "4", "--response-len", "8", "--steps", "1",
                         "--kernels", "torch", *result]  # fmt: skip
        return py + ["rlcs_fast.profile_grpo", "--model", "3b", "--prompts", "8", "--n", "4",
                     "--response-len", "128", "--steps", "2", *result]  # fmt: skip
    raise ValueError(f"unknown step {step!r}")


# --- what each step's files say ----------------------------------------------------------------------------


def summarize_tests(out: Path) -> dict[str, Any]:
    xml = out / "gpu_tests.xml"
    if not xml.is_file():
        return {}
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        status = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                cases.append(
                    {
                        "test": f"{case.get('classname')}::{case.get('name')}",
                        "status": status,
                        "message": (node.get("message") or "")[:300],
                    }
                )
                break
        else:
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status})
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def summarize_kernels(path: Path) -> dict[str, Any]:
    """Per op: our time, memory and floor multiple, and each baseline's time and memory as ratios to ours."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    ops: dict[str, Any] = {}
    for r in data["records"]:
        op = ops.setdefault(r["op"], {"shape": {k: r[k] for k in ("N", "H", "V")}, "methods": {}})
        op["methods"][r["method"]] = {
            k: r[k]
            for k in ("status", "reason", "median_ms", "peak_mem_delta_gib", "floor_ms", "floor_fraction")
        }
    for op in ops.values():
        ours = op["methods"].get("rlcs_triton", {})
        if ours.get("status") != "ok":
            continue
        if ours.get("floor_fraction"):
            op["rlcs_x_matmul_floor"] = 1.0 / ours["floor_fraction"]
        for name, m in op["methods"].items():
            if name == "rlcs_triton" or m["status"] != "ok":
                continue
            m["time_ratio_vs_rlcs"] = m["median_ms"] / ours["median_ms"]
            if m["peak_mem_delta_gib"] and ours["peak_mem_delta_gib"]:
                m["memory_ratio_vs_rlcs"] = m["peak_mem_delta_gib"] / ours["peak_mem_delta_gib"]
    return {"ceilings": data.get("ceilings", {}), "ops": ops}


def plan_prediction(model: str, report: dict[str, Any]) -> dict[str, Any]:
    """``--plan``'s per-GPU memory for this device's size and the measured step's token count."""
    from rlcs_fast.profile import memory_budget

    gpu_mem = report["environment"].get("device_memory_gib") or 80.0
    budget = memory_budget(model, gpus=1, gpu_mem=float(gpu_mem), tokens=report["train"]["tokens"])
    sft = budget["stages"]["sft"]["gib"]
    predicted = sft["training peak (state + chosen activations)"]
    measured = report["train"]["memory"]["peak_gib"]
    return {
        "predicted_peak_gib": predicted,
        "measured_peak_gib": measured,
        "components_gib": sft,
        "measured_over_predicted": measured / predicted if measured and predicted else None,
    }


def summarize(step: str, out: Path) -> dict[str, Any]:
    if step == "tests":
        return summarize_tests(out)
    path = out / f"{step}.json"
    if step.startswith("kernels_"):
        return summarize_kernels(path)
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    if step == "train_3b":
        t = report["train"]
        result = {
            "model": report["model"],
            "layers": t["layers"],
            "tokens": t["tokens"],
            "time_s": t["time_s"],
            "tokens_per_s": t["tokens_per_s"],
            "mfu": t["mfu"],
            "memory": t["memory"],
            "peak_tflops": report["peak_tflops"],
            "peak_source": report["peak_source"],
        }
        result["plan"] = plan_prediction(report["model"], report)
        return result
    return report["grpo"]


# --- the report --------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def headline(step: str, result: dict[str, Any]) -> str:
    if not result:
        return "no result"
    if step == "tests":
        c = result["counts"]
        return f"{c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped"
    if step.startswith("kernels_"):
        parts = []
        for name, op in result["ops"].items():
            ours = op["methods"].get("rlcs_triton", {})
            ms, gib, floor = (
                ours.get("median_ms"),
                ours.get("peak_mem_delta_gib"),
                op.get("rlcs_x_matmul_floor"),
            )
            ratios = ", ".join(
                f"{m} {v['time_ratio_vs_rlcs']:.2f}x time / {_fmt(v.get('memory_ratio_vs_rlcs'), '.2f')}x mem"
                for m, v in op["methods"].items()
                if "time_ratio_vs_rlcs" in v
            )
            parts.append(
                f"{name}: {_fmt(ms, '.1f')} ms, {_fmt(gib, '.2f')} GiB, {_fmt(floor, '.2f')}x floor; "
                f"baselines vs ours: {ratios or '-'}"
            )
        return "<br>".join(parts)
    if step == "train_3b":
        plan = result["plan"]
        by_phase = result["memory"].get("peak_gib_by_phase") or {}
        phases = ", ".join(f"{k} {v:.1f}" for k, v in by_phase.items())
        return (
            f"{result['tokens_per_s']:,.0f} tok/s, MFU {result['mfu']:.1%}, peak "
            f"{_fmt(plan['measured_peak_gib'], '.1f')} GiB ({phases or 'per phase: GPU only'}) vs plan "
            f"{plan['predicted_peak_gib']:.1f} GiB"
        )
    t = result["time_s"]
    o = result.get("overhead") or {}
    waste = (f"; per update: {o['host_syncs_per_update']} host syncs, "
             f"{o['h2d_bytes_per_update'] / 1e6:,.1f} MB host→device, "
             f"{o['tower_patches_with_grad_per_response']:.1f} tower patches per response"
             if o else "")
    return (
        ", ".join(f"{k} {v:.2f} s" for k, v in t.items()) + f"; {result['generate_tokens_per_s']:,.0f} "
        f"generated tok/s; on-policy saves {result['saved_by_on_policy_s']:.2f} s" + waste
    )


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    v = env.get("versions", {})
    lines = [
        f"# gpu_check ({report['mode']}): {env.get('device')}",
        "",
        f"torch {v.get('torch')}, triton {v.get('triton')}, transformers {v.get('transformers')}, "
        f"git {env.get('git_revision')}, {report['started']}",
        "",
        "| step | status | time (s) / budget | result |",
        "|---|---|---|---|",
    ]
    for name, s in report["steps"].items():
        lines.append(
            f"| {name} | {s['status']} | {s['wall_s']:.0f} / {s['budget_s']} | "
            f"{headline(name, s.get('result') or {})} |"
        )
    return "\n".join(lines) + "\n"


def write(report: dict[str, Any], out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def run_with_limit(cmd: list[str], env: dict[str, str], log, budget: float) -> int | None:
    """The exit status, or None when ``budget`` seconds ran out: then its whole process group is killed
    (torch.compile's workers and torchrun's ranks too, or they would hold the GPU in the next step)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        return proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def run(out: Path, smoke: bool, only: list[str] | None = None) -> dict[str, Any]:
    import torch

    from rlcs_fast.profile import environment

    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    report: dict[str, Any] = {
        "kind": "gpu_check",
        "mode": "smoke" if smoke else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "environment": environment(device),
        "total_budget_s": TOTAL_BUDGET_S,
        "steps": {},
    }
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for step in STEPS:
        if only and step.name not in only:
            continue
        budget = SMOKE_BUDGET_S if smoke else step.budget_s
        entry = {"what": step.what, "budget_s": budget, "status": "running", "wall_s": 0.0}
        report["steps"][step.name] = entry
        write(report, out)
        cmd = command(step.name, out, smoke)
        t0 = time.perf_counter()
        log = out / f"{step.name}.log"
        with log.open("w") as fh:
            rc = run_with_limit(cmd, env, fh, budget)
        entry["status"] = "timeout" if rc is None else "ok" if rc == 0 else f"exit {rc}"
        entry["wall_s"] = time.perf_counter() - t0
        entry["command"] = " ".join(cmd[1:])
        try:
            entry["result"] = summarize(step.name, out)
        except Exception as e:  # a half-written file from a killed step: keep the rest of the report
            entry["result"] = {}
            entry["summary_error"] = f"{type(e).__name__}: {e}"
        if entry["status"] != "ok":
            entry["log_tail"] = log.read_text(errors="replace")[-2000:]
        print(
            f"[gpu_check] {step.name}: {entry['status']} in {entry['wall_s']:.0f} s: "
            f"{headline(step.name, entry['result'])}",
            flush=True,
        )
        write(report, out)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default=None, help="output folder (default: $OUT if set, else bench/results/gpu_check)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter): CI")
    p.add_argument("--only", default=None, help="comma-separated step names to run (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or REPO / "bench" / "results" / "gpu_check")
    report = run(out, args.smoke, args.only.split(",") if args.only else None)
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
