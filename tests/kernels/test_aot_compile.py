"""Ahead-of-time compile of the Triton kernels for Hopper (sm_90a) and Ampere (sm_80), on the CPU.

Runs ``bench/aot_report.py`` in a subprocess without TRITON_INTERPRET (this process has it set, and the
interpreter replaces the compiler). The default run compiles the first autotune config of every kernel;
``-m slow`` sweeps every config.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _report(tmp_path, archs, first_only):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "bench" / "aot_report.py"), "--arch", *map(str, archs), "--out", str(tmp_path)]
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
    assert rows
    for r in rows:
        where = f"{r['kernel']} {r['config']} {r['arch']}"
        assert r["smem"] <= r["smem_limit"], f"shared memory {r['smem']} B over {r['smem_limit']} B in {where}"
        if r["arch"] == "sm_90a" and r["uses_dot"]:
            assert r["hgmma"] > 0, f"no HGMMA (wgmma) in the sm_90a SASS of {where}"


@pytest.fixture(scope="module")
def first_config_rows(tmp_path_factory):
    return _report(tmp_path_factory.mktemp("aot"), [90, 80], first_only=True)


def test_aot_first_config_every_kernel(first_config_rows):
    _check(first_config_rows)


# Known gap: ptxas reports spills for the tensor-core kernels at these tile sizes (see
# bench/results/aot_sm90a.json). strict=True turns this into a failure once the spills are gone, so the
# marker cannot outlive the problem.
@pytest.mark.xfail(strict=True, reason="register spills in the tl.dot kernels; tiles to be retuned")
def test_aot_no_register_spills(first_config_rows):
    spilled = [(r["kernel"], r["arch"], r["spill_stores"]) for r in first_config_rows if r["spill_stores"]]
    assert not spilled, f"register spills: {spilled}"


@pytest.mark.slow
def test_aot_every_config(tmp_path):
    _check(_report(tmp_path, [90, 80], first_only=False))
