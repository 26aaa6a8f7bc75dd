"""Ahead-of-time compile of the Triton kernels for Hopper (sm_90a) and Ampere (sm_80), on the CPU.

Runs ``bench/aot_report.py`` in a subprocess without TRITON_INTERPRET (this process has it set, and the
interpreter replaces the compiler). Kernels are compiled with the JIT's own argument specialisation at
Qwen2.5-VL-7B shapes. The integration tier compiles the first autotune config of every kernel variant;
``pytest -m sweep`` compiles every config (the table in ``bench/results/aot_*.json``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton
from rlcs_fast.kernels import _common

ROOT = Path(__file__).resolve().parents[2]


def _report(tmp_path, archs, first_only):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "aot_report.py"), "--arch", *map(str, archs), "--out",
           str(tmp_path)]
    if first_only:
        cmd.append("--first-config-only")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = []
    for arch in archs:
        name = "aot_sm90a.json" if arch == 90 else f"aot_sm{arch}.json"
        rows += json.loads((tmp_path / name).read_text())
    return rows


def _check(rows):
    """Every row: shared memory within the block limit, no spills or stack, HGMMA in sm_90a matmul kernels."""
    assert rows
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['arch']}"
        assert r["smem"] <= r["smem_limit"], (f"shared memory {r['smem']} B over {r['smem_limit']} B "
                                              f"in {where}")
        assert r["regs"] <= 255, f"{r['regs']} registers in {where}"
        assert (r["spill_stores"], r["spill_loads"], r["stack"], r["local_ops"]) == (0, 0, 0, 0), (
            f"register spills in {where}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded, "
            f"{r['stack']} B stack, {r['local_ops']} LDL/STL in SASS"
        )
        if r["arch"] == "sm_90a" and r["uses_dot"]:
            assert r["hgmma"] > 0, f"no HGMMA (wgmma) in the sm_90a SASS of {where}"


@pytest.fixture(scope="module")
def first_config_rows(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("aot"), [90, 80], first_only=True)


@pytest.mark.slow
def test_aot_first_config_every_kernel(first_config_rows):
    kernels = {r["kernel"] for r in first_config_rows}
    assert {"stats(fwd, +entropy)", "dlogits(recompute, +entropy)", "matmul(dW += dl^T @ h)",
            "stats(fwd, +raw)", "stats(fused, +entropy, +raw)"} <= kernels
    assert {r["arch"] for r in first_config_rows} == {"sm_90a", "sm_80"}
    _check(first_config_rows)


def test_accumulating_matmul_runs_only_configs_that_fit():
    # C += A·B holds the fp32 accumulator and the loaded C tile at once: only ≤ 64 accumulator registers
    # per thread fit beside it; the one config the accumulating launch runs is among those (the sweep
    # above compiles every one of them spill-free).
    plain, acc = _common.matmul_configs(False), _common.matmul_configs(True)
    assert acc and len(acc) < len(plain)
    for c in acc:
        assert c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps) <= 64, c
    assert str(_common.ACCUMULATE_CONFIG) in {str(c) for c in acc}
    assert all(isinstance(c, triton.Config) for c in plain)


@pytest.mark.slow
@pytest.mark.sweep
def test_aot_every_config(tmp_path):
    # About 45 s on 2 cores, so opt-in; the integration tier keeps to the first configs.
    rows = _report(tmp_path, [90, 80], first_only=False)
    _check(rows)
    # Every shipped config of every kernel appears in the sweep.
    sweep = {(r["kernel"], r["arch"], json.dumps(r["config"], sort_keys=True)) for r in rows}
    assert len(sweep) == len(rows)
