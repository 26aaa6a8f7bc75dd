"""``bench/gpu_check.sh``, the one command a lent GPU runs, cannot rot without a GPU: its ``--smoke`` mode
runs every step (gpu tests, kernel figures, train step vs the plan, GRPO step) at tiny sizes on the CPU, and
a step that runs past its budget is recorded while the steps after it still run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_mode_runs_every_step(tmp_path):
    gc = _load_gpu_check()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # python3 = this interpreter
    )
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert list(steps) == [s.name for s in gc.STEPS]
    failed = {
        k: (s["status"], s.get("log_tail", "")[-1500:]) for k, s in steps.items() if s["status"] != "ok"
    }
    assert not failed and proc.returncode == 0, failed or proc.stdout[-2000:]
    env_ = report["environment"]
    assert report["mode"] == "smoke" and env_["versions"]["torch"] and env_["versions"]["transformers"]
    assert "git_revision" in env_
    # 1. the gpu-marked tests were collected and ran (skipped on the CPU), with a per-test record
    counts = steps["tests"]["result"]["counts"]
    assert sum(counts.values()) >= 4 and counts["failed"] == counts["error"] == 0
    # 2. both ops, ours against eager and torch.compile, with the floor multiple and same-run ratios
    for name in ("kernels_7b", "kernels_3b"):
        ops = steps[name]["result"]["ops"]
        for op in ("fused_linear_logprob", "fused_linear_grpo_loss"):
            methods = ops[op]["methods"]
            assert methods["rlcs_triton"]["status"] == "ok" and ops[op]["rlcs_x_matmul_floor"] > 0
            for base in ("eager_naive", "compile_naive"):
                assert methods[base]["time_ratio_vs_rlcs"] > 0, (name, op, base)
    # 3. a measured training step against the plan's prediction
    train = steps["train_3b"]["result"]
    assert train["tokens_per_s"] > 0 and train["plan"]["predicted_peak_gib"] > 0
    # 4. a GRPO step with every phase timed, and the forward that on-policy saves
    grpo = steps["grpo_3b"]["result"]
    assert set(grpo["time_s"]) == {"sync", "rollout", "reward", "old_logprobs_forward", "train"}
    assert grpo["generated_tokens"] > 0 and grpo["saved_by_on_policy_s"] > 0
    assert grpo["train_stats"]["actor/ratio_mean"] == 1.0
    # issue 22's figures of one more update: the tower once per image, stats read once per update
    o = grpo["overhead"]
    assert o["h2d_bytes_per_update"] >= 0 and o["host_syncs_per_update"] <= 16
    assert 0 < o["tower_patches_with_grad_per_response"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert env_["versions"]["torch"] in md and all(f"| {s.name} | ok |" in md for s in gc.STEPS)


@pytest.mark.slow
def test_a_step_past_its_budget_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    gc = _load_gpu_check()
    monkeypatch.setattr(gc, "SMOKE_BUDGET_S", 5)

    def command(step, out, smoke):
        if step == "kernels_7b":
            return [sys.executable, "-c", "import time; time.sleep(60)"]
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(gc, "command", command)
    report = gc.run(tmp_path, smoke=True)
    status = {k: s["status"] for k, s in report["steps"].items()}
    # every step ran, in order; only the one past its budget timed out
    assert list(status) == [step.name for step in gc.STEPS]
    assert status == {step.name: "timeout" if step.name == "kernels_7b" else "ok" for step in gc.STEPS}
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: s["status"] for k, s in written["steps"].items()} == status
    assert "| kernels_7b | timeout |" in (tmp_path / "gpu_check.md").read_text()
