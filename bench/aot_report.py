"""Ahead-of-time compile of every Triton kernel and autotune config for Hopper (sm_90a) and Ampere (sm_80).

Runs on a CPU-only machine: ``triton.compile`` with an explicit ``GPUTarget`` needs no driver. For each
(kernel, config, arch) it records registers, spill bytes (ptxas ``-v``), stack frame, shared memory
(Triton's metadata) and, for sm_90a, the number of ``HGMMA`` (warpgroup tensor-core) instructions in the
SASS (``cuobjdump -sass``). Writes ``bench/results/aot_<arch>.json`` and prints a table.

    python bench/aot_report.py [--arch 90 80] [--first-config-only]

Must run without ``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # usable per block: H100 227 KB, A100 163 KB (of 164 KB)


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _kernels(dtype: str = "bf16") -> list[dict]:
    """(name, jit fn, pointer/float arg types, constexprs, configs, uses tensor cores) per kernel variant."""
    import importlib

    # The package re-exports functions under the module names, so import the modules themselves.
    _common = importlib.import_module("rlcs_fast.kernels._common")
    fll = importlib.import_module("rlcs_fast.kernels.fused_linear_logprob")
    gl = importlib.import_module("rlcs_fast.kernels.grpo_loss")

    fp = f"*{dtype}"
    stats_types = {"h_ptr": fp, "w_ptr": fp, "tgt_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                   "t_ptr": "*fp32", "zt_ptr": "*fp32", "logits_ptr": "*fp32", "inv_temp": "fp32"}  # fmt: skip
    dl_types = {"h_ptr": fp, "w_ptr": fp, "logits_ptr": "*fp32", "tgt_ptr": "*i64", "lse_ptr": "*fp32",
                "ent_ptr": "*fp32", "g_lp_ptr": "*fp32", "g_ent_ptr": "*fp32", "dl_ptr": fp, "inv_temp": "fp32"}  # fmt: skip
    mm_types = {"a_ptr": fp, "b_ptr": fp, "c_ptr": "*fp32"}
    grpo_types = {"lp_ptr": "*fp32", "old_ptr": "*fp32", "adv_ptr": "*fp32", "mask_ptr": "*u8", "w_ptr": "*fp32",
                  "ref_ptr": "*fp32", "grad_ptr": "*fp32", "part_ptr": "*fp32", "clip_low": "fp32",
                  "clip_high": "fp32", "clip_dual": "fp32", "kl_coef": "fp32"}  # fmt: skip
    dot = {"UPCAST": False, "INPUT_PRECISION": "tf32"}
    grpo_cfg = [{"kwargs": {"BLOCK_T": gl.GRPO_BLOCK_T}, "num_warps": gl.GRPO_NUM_WARPS, "num_stages": 3}]

    def cfgs(configs):
        return [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]

    return [
        {"name": "stats(fwd, +entropy)", "fn": fll._stats_kernel, "types": stats_types, "dot": True,
         "const": {"STORE_LOGITS": False, "WITH_ENTROPY": True, **dot}, "configs": cfgs(fll.STATS_CONFIGS)},
        {"name": "stats(fused, store logits)", "fn": fll._stats_kernel, "types": stats_types, "dot": True,
         "const": {"STORE_LOGITS": True, "WITH_ENTROPY": False, **dot}, "configs": cfgs(fll.STATS_CONFIGS)},
        {"name": "dlogits(recompute, +entropy)", "fn": fll._dlogits_kernel, "types": dl_types, "dot": True,
         "const": {"RECOMPUTE": True, "WITH_ENTROPY": True, **dot}, "configs": cfgs(fll.DLOGITS_CONFIGS)},
        {"name": "dlogits(stored logits)", "fn": fll._dlogits_kernel, "types": dl_types, "dot": False,
         "const": {"RECOMPUTE": False, "WITH_ENTROPY": False, **dot}, "configs": cfgs(fll.DLOGITS_CONFIGS)[:1]},
        {"name": "matmul(dh / dW +=)", "fn": _common._matmul_kernel, "types": mm_types, "dot": True,
         "const": {"ACCUMULATE": True, **dot}, "configs": cfgs(_common.MATMUL_CONFIGS)},
        {"name": "grpo(dual, low_var_kl)", "fn": gl._grpo_kernel, "types": grpo_types, "dot": False,
         "const": {"HAS_REF": True, "DUAL_CLIP": True, "KL_TYPE": 3}, "configs": grpo_cfg},
    ]  # fmt: skip


def _ptxas_info(ptx: str, arch: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        out = subprocess.run(
            [_bin("ptxas"), f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_stores": int(spill.group(1)) if spill else None,
        "spill_loads": int(spill.group(2)) if spill else None,
        "stack": int(stack.group(1)) if stack else None,
    }


def _hgmma_count(cubin: bytes) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        sass = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\bHGMMA\b", sass))


def compile_one(kernel: dict, config: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel["fn"]
    const = {**kernel["const"], **config["kwargs"]}
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        else:
            signature[p.name] = kernel["types"].get(p.name, "i32")
    compiled = triton.compile(
        ASTSource(fn, signature, const),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
    )
    arch_name = re.search(r"\.target (\S+)", compiled.asm["ptx"]).group(1)
    row = {
        "kernel": kernel["name"],
        "config": {**config["kwargs"], "num_warps": config["num_warps"], "num_stages": config["num_stages"]},
        "arch": arch_name,
        "smem": compiled.metadata.shared,
        "smem_limit": SMEM_LIMIT[arch],
        "uses_dot": kernel["dot"],
        **_ptxas_info(compiled.asm["ptx"], arch_name),
    }
    row["hgmma"] = _hgmma_count(compiled.asm["cubin"]) if arch == 90 else None
    return row


def report(archs: list[int], first_config_only: bool = False) -> dict[int, list[dict]]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the AOT report without TRITON_INTERPRET=1 (the interpreter replaces the compiler)")
    out: dict[int, list[dict]] = {}
    for arch in archs:
        rows = []
        for kernel in _kernels():
            for config in kernel["configs"][:1] if first_config_only else kernel["configs"]:
                rows.append(compile_one(kernel, config, arch))
        out[arch] = rows
    return out


def _print(rows: list[dict]) -> None:
    print(f"{'kernel':32} {'config':62} {'arch':7} {'regs':>4} {'spill':>5} {'smem':>7} {'hgmma':>5}")
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"{r['kernel']:32} {cfg:62} {r['arch']:7} {r['regs']:>4} {r['spill_stores']:>5} {r['smem']:>7} "
              f"{r['hgmma'] if r['hgmma'] is not None else '-':>5}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--first-config-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = report(args.arch, args.first_config_only)
    args.out.mkdir(parents=True, exist_ok=True)
    for arch, rows in results.items():
        _print(rows)
        name = "aot_sm90a.json" if arch == 90 else f"aot_sm{arch}.json"
        (args.out / name).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
