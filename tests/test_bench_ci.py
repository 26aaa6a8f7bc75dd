"""The benchmark suite and the profiler stay runnable without a GPU: the CPU variant of ``pytest bench/``
passes (every benchmark body once, each method equal to float64 math), its JSON renders into README tables
and plots, ``python -m rlcs_fast.profile`` measures a real tiny step, and ``--plan`` prints plan.py's
budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlcs_fast import profile
from rlcs_fast.plan import count_params, memory_plan, model_arch

REPO = Path(__file__).resolve().parent.parent


def _load_render():
    spec = importlib.util.spec_from_file_location("bench_render", REPO / "bench" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "kernels_ci.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    # `pytest`, not `python -m pytest`: the latter puts the repo root (and its `kernels/`) on sys.path
    pytest_bin = Path(sys.executable).parent / "pytest"
    proc = subprocess.run([str(pytest_bin), "bench/", "--bench-ci", "-q", "--benchmark-disable", "-p",
                           "no:cacheprovider", "--bench-out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_ci_variant_covers_every_op_and_mode(ci_results):
    env = ci_results["environment"]
    assert env["device_type"] == "cpu" and env["versions"]["torch"] and "git_revision" in env
    assert ci_results["settings"]["ci"] is True
    ran = {(r["op"], r["mode"], r["method"]) for r in ci_results["records"] if r["status"] == "ok"}
    for op in ("fused_linear_logprob", "grpo_loss", "fused_linear_grpo_loss"):
        for mode in ("fwd", "fwd+bwd"):
            assert (op, mode, "rlcs_triton") in ran, (op, mode)
    assert ("fused_linear_grpo_loss", "fwd+bwd", "compile_naive") in ran
    for r in ci_results["records"]:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and (r["tflops"] or r["extra"].get("achieved_gbps")), r
        else:  # only the optional Liger columns may be left out, with a reason
            assert r["method"] == "liger" and r["status"] == "skipped" and r["reason"], r


@pytest.mark.slow
def test_render_writes_tables_between_markers_and_plots(ci_results, tmp_path):
    render = _load_render()
    results = tmp_path / "results"
    results.mkdir()
    for name in ("aot_sm90a.json", "packing_ratio_cpu.json"):
        (results / name).write_text((REPO / "bench" / "results" / name).read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Benchmarks\n\n{render.BEGIN}\nstale\n{render.END}\n\n## After\n")
    render.main(["--results", str(results), "--readme", str(readme)])
    text = readme.read_text()
    assert "No GPU benchmark results yet" in text and "stale" not in text and text.endswith("## After\n")
    assert "| stats(fwd, +entropy) |" in text and "| public_grpo_simulated |" in text

    # a GPU run renders as per-op tables (the CI records stand in for one here)
    gpu = dict(ci_results, settings=dict(ci_results["settings"], ci=False))
    (results / "kernels_fake_gpu.json").write_text(json.dumps(gpu))
    render.main(["--results", str(results), "--readme", str(readme), "--plots", str(tmp_path / "plots")])
    text = readme.read_text()
    assert "No GPU benchmark results yet" not in text
    assert text.count(render.BEGIN) == 1 and text.count(render.END) == 1
    for op in ("`fused_linear_logprob`+entropy fwd+bwd", "`grpo_loss` fwd",
               "`fused_linear_grpo_loss` fwd+bwd"):
        assert op in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(list((tmp_path / "plots").glob("*.png"))) >= 6


@pytest.mark.slow
def test_profile_tiny_step_reports_phases_and_scales_to_full_depth(tmp_path, capsys):
    out = tmp_path / "profile.json"
    profile.main(["--model", "tiny", "--layers", "2", "--tokens", "256", "--seq-len", "64", "--steps", "1",
                  "--warmup", "1", "--kernels", "torch", "--device", "cpu", "--out", str(out)])
    report = json.loads(out.read_text())
    assert "tok/s" in capsys.readouterr().out
    train = report["train"]
    assert set(train["time_s"]) == {"forward", "backward", "optimizer", "step"}
    assert all(t > 0 for t in train["time_s"].values())
    assert train["tokens"] == 256 and train["tokens_per_s"] > 0 and 0 < train["mfu"]
    assert train["parameters"] == sum(count_params(profile.released_config("tiny", layers=2)))
    scaled = report["scaled_to_full_depth"]
    # parameters are exactly linear in depth, so the two-depth fit must recover the full model's count
    assert scaled["layers"] == 4
    assert scaled["parameters"] == sum(count_params(profile.released_config("tiny")))
    assert "estimate" in scaled["method"]
    assert report["rollout"]["skipped"] and report["environment"]["versions"]["torch"]


def test_plan_prints_the_planner_budget_for_the_released_7b(capsys):
    profile.main(["--plan", "--model", "7b", "--gpus", "8", "--gpu-mem", "80"])
    text = capsys.readouterr().out
    arch = model_arch(profile.released_config("7b"))
    assert abs(arch.total_params - 8.29e9) < 0.01e9  # Qwen2.5-VL-7B-Instruct: 8.29B parameters
    assert abs(model_arch(profile.released_config("3b")).total_params - 3.75e9) < 0.01e9
    budget = profile.memory_budget("7b", gpus=8, gpu_mem=80.0)
    grpo = budget["stages"]["grpo"]["gib"]
    from rlcs_fast.config import load_config

    cfg = load_config(REPO / "configs" / "grpo_7b.toml", {"run.stages": ["grpo"]})
    assert grpo == memory_plan(arch, cfg, "grpo", 8, 80.0)
    assert f"{grpo['vLLM KV cache']:12.2f}" in text and "AdamW states" in text and "=> grpo: peak" in text
