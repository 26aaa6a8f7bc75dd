"""Ahead-of-time compile of every Triton kernel and autotune config for Hopper (sm_90a) and Ampere (sm_80).

Runs on a CPU-only machine: ``triton.compile`` with an explicit ``GPUTarget`` needs no driver. Each kernel is
compiled as the JIT would compile it on a GPU: the signature, ``tt.divisibility`` hints and the constant-1
strides come from Triton's own argument specialisation applied to representative arguments (bf16
Qwen2.5-VL-7B shapes, H=3584, V=151936, a 1999-token chunk). Compiling without those hints (as an earlier
version of this report did) builds a different kernel: no 16-byte vector loads and a 64-bit address per
element, which spills thousands of bytes that the real kernel never does.

Per (kernel, config, arch) it records, from the cubin Triton produced: registers and stack frame
(``cuobjdump -res-usage``), spill stores / loads (the log of Triton's own ptxas run, same flags, same
cubin), shared memory (Triton's metadata) and, for sm_90a, the number of ``HGMMA`` (warpgroup tensor-core)
instructions in the SASS. When ptxas cannot avoid spilling it may drop to a 32-register allocation with a
large stack (an occupancy trade it makes itself; the cubin really has 32 registers), so a "32 registers"
row with spills is a spilling kernel, not a parsing error.

    python bench/aot_report.py [--arch 90 80] [--first-config-only]

Writes ``bench/results/aot_sm90a.json`` / ``aot_sm80.json`` and prints a table. Must run without
``TRITON_INTERPRET`` (the interpreter replaces the compiler).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # usable per block: H100 227 KB, A100 163 KB (of 164 KB)
# Representative shapes: a backward chunk of N tokens (not a multiple of 16, so no row mask is provably
# dead), Qwen2.5-VL-7B's hidden size and vocabulary, and the vocabulary split an H100 (132 SMs) gets.
N_TOKENS, HIDDEN, VOCAB, N_SM = 1999, 3584, 151936, 132


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _kernels() -> list[dict]:
    """Kernel variants: name, jit fn, representative arguments, constexprs, configs, uses tensor cores."""
    import importlib

    import torch
    import triton

    # The package re-exports functions under the module names, so import the modules themselves.
    _common = importlib.import_module("rlcs_fast.kernels._common")
    fll = importlib.import_module("rlcs_fast.kernels.fused_linear_logprob")
    gl = importlib.import_module("rlcs_fast.kernels.grpo_loss")

    def t(dtype):  # only dtype and alignment matter to the specialisation; meta tensors are 16-aligned
        return torch.empty(1, dtype=dtype, device="meta")

    bf, f32, i64, u8 = t(torch.bfloat16), t(torch.float32), t(torch.int64), t(torch.uint8)
    bucket = _common.token_bucket
    N, H, V = N_TOKENS, HIDDEN, VOCAB
    # triton_stats' vocabulary split on an H100 (a multiple of 256, as there).
    splits = max(1, min(triton.cdiv(V, 2048), triton.cdiv(2 * N_SM, triton.cdiv(N, 128))))
    v_per_split = triton.cdiv(triton.cdiv(V, splits), 256) * 256
    stats_args = dict(h_ptr=bf, w_ptr=bf, tgt_ptr=i64, m_ptr=f32, s_ptr=f32, t_ptr=f32, zt_ptr=f32,
                      logits_ptr=f32, m1_ptr=f32, s1_ptr=f32, N=N, V=V, H=H, v_per_split=v_per_split,
                      inv_temp=1.0, stride_hn=H, stride_wv=H, stride_ln=V)  # fmt: skip
    dl_args = dict(h_ptr=bf, w_ptr=bf, logits_ptr=f32, tgt_ptr=i64, lse_ptr=f32, ent_ptr=f32, g_lp_ptr=f32,
                   g_ent_ptr=f32, dl_ptr=bf, N=N, V=V, H=H, inv_temp=1.0,
                   stride_hn=H, stride_wv=H, stride_ln=V, stride_dn=V)  # fmt: skip
    # dh = dlogits @ W; dW (+)= dlogits^T @ h (the transposed view: unit stride along M).
    mm_dh = dict(a_ptr=bf, b_ptr=bf, c_ptr=bf, M=N, N=H, K=V, M_BUCKET=bucket(N), K_BUCKET=bucket(V),
                 stride_am=V, stride_ak=1, stride_bk=H, stride_bn=1, stride_cm=H, stride_cn=1)  # fmt: skip
    mm_dw = dict(a_ptr=bf, b_ptr=bf, c_ptr=f32, M=V, N=H, K=N, M_BUCKET=bucket(V), K_BUCKET=bucket(N),
                 stride_am=1, stride_ak=V, stride_bk=H, stride_bn=1, stride_cm=H, stride_cn=1)  # fmt: skip
    grpo_args = dict(lp_ptr=f32, old_ptr=f32, adv_ptr=f32, mask_ptr=u8, w_ptr=f32, ref_ptr=f32, grad_ptr=f32,
                     part_ptr=f32, slr_ptr=f32, N=N, num_programs=2, clip_low=0.2, clip_high=0.2,
                     clip_dual=3.0, kl_coef=0.01)  # fmt: skip
    dot = {"UPCAST": False, "INPUT_PRECISION": "tf32"}

    def cfgs(configs):
        return [{"kwargs": dict(c.kwargs), "num_warps": c.num_warps, "num_stages": c.num_stages}
                for c in configs]  # fmt: skip

    grpo_cfg = [{"kwargs": {"BLOCK_T": gl.GRPO_BLOCK_T}, "num_warps": gl.GRPO_NUM_WARPS, "num_stages": 3}]
    return [
        {"name": "stats(fwd, +entropy)", "fn": fll._stats_kernel, "args": stats_args, "dot": True,
         "const": {"STORE_LOGITS": False, "WITH_ENTROPY": True, "WITH_RAW": False, **dot},
         "configs": cfgs(fll.STATS_CONFIGS)},
        {"name": "stats(fused, store logits)", "fn": fll._stats_kernel, "args": stats_args, "dot": True,
         "const": {"STORE_LOGITS": True, "WITH_ENTROPY": False, "WITH_RAW": False, **dot},
         "configs": cfgs(fll.STATS_CONFIGS)},
        # T != 1: the old-policy pass and the on-policy update also fold the tiles at T = 1 (raw log-probs)
        {"name": "stats(fwd, +raw)", "fn": fll._stats_kernel, "args": stats_args, "dot": True,
         "const": {"STORE_LOGITS": False, "WITH_ENTROPY": False, "WITH_RAW": True, **dot},
         "configs": cfgs(fll.STATS_RAW_CONFIGS)},
        {"name": "stats(fused, +entropy, +raw)", "fn": fll._stats_kernel, "args": stats_args, "dot": True,
         "const": {"STORE_LOGITS": True, "WITH_ENTROPY": True, "WITH_RAW": True, **dot},
         "configs": cfgs(fll.STATS_RAW_CONFIGS)},
        {"name": "dlogits(recompute, +entropy)", "fn": fll._dlogits_kernel, "args": dl_args, "dot": True,
         "const": {"RECOMPUTE": True, "WITH_ENTROPY": True, **dot}, "configs": cfgs(fll.DLOGITS_CONFIGS)},
        {"name": "dlogits(stored logits)", "fn": fll._dlogits_kernel, "args": dl_args, "dot": False,
         "const": {"RECOMPUTE": False, "WITH_ENTROPY": False, **dot}, "configs": cfgs(fll.DLOGITS_CONFIGS)},
        {"name": "matmul(dh = dl @ W)", "fn": _common._matmul_kernel, "args": mm_dh, "dot": True,
         "const": {"ACCUMULATE": False, **dot}, "configs": cfgs(_common.matmul_configs(False))},
        {"name": "matmul(dW = dl^T @ h)", "fn": _common._matmul_kernel, "args": mm_dw, "dot": True,
         "const": {"ACCUMULATE": False, **dot}, "configs": cfgs(_common.matmul_configs(False))},
        {"name": "matmul(dW += dl^T @ h)", "fn": _common._matmul_kernel, "args": mm_dw, "dot": True,
         "const": {"ACCUMULATE": True, **dot}, "configs": cfgs(_common.matmul_configs(True))},
        {"name": "grpo(dual, low_var_kl)", "fn": gl._grpo_kernel, "args": grpo_args, "dot": False,
         "const": {"HAS_REF": True, "DUAL_CLIP": True, "KL_TYPE": 3, "GSPO": False}, "configs": grpo_cfg},
        {"name": "grpo(gspo, low_var_kl)", "fn": gl._grpo_kernel, "args": grpo_args, "dot": False,
         "const": {"HAS_REF": True, "DUAL_CLIP": False, "KL_TYPE": 3, "GSPO": True}, "configs": grpo_cfg},
    ]  # fmt: skip


def _specialize(fn, args: dict, const: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as ``JITFunction.run`` builds them for these argument values."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = const[p.name]
            continue
        specialize, align = not p.do_not_specialize, not p.do_not_specialize_on_alignment
        ty, key = native_specialize_impl(BaseBackend, args[p.name], p.is_const, specialize, align)
        signature[p.name] = ty
        if ty == "constexpr":  # an integer equal to 1 (a unit stride) becomes a compile-time constant
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _cubin_info(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        res = _run([_bin("cuobjdump"), "-res-usage", path])
        sass = _run([_bin("cuobjdump"), "-sass", path])
    return {
        "regs": int(re.search(r"REG:(\d+)", res).group(1)),
        "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "local_ops": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass)),
    }


def compile_one(kernel: dict, config: dict, arch: int) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel["fn"]
    signature, constexprs, attrs = _specialize(fn, kernel["args"], {**kernel["const"], **config["kwargs"]})
    log = io.StringIO()
    # Compile for real (no cache hit, so ptxas runs) and capture the log Triton prints of that ptxas run.
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]},
        )
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    assert spill, f"no ptxas report captured for {kernel['name']}: {log.getvalue()[-500:]}"
    info = _cubin_info(compiled.asm["cubin"])
    return {
        "kernel": kernel["name"],
        "config": {**config["kwargs"], "num_warps": config["num_warps"], "num_stages": config["num_stages"]},
        "arch": re.search(r"\.target (\S+)", compiled.asm["ptx"]).group(1),
        "smem": compiled.metadata.shared,
        "smem_limit": SMEM_LIMIT[arch],
        "uses_dot": kernel["dot"],
        "regs": info["regs"],
        "spill_stores": int(spill.group(1)),
        "spill_loads": int(spill.group(2)),
        "stack": info["stack"],
        "local_ops": info["local_ops"],
        "hgmma": info["hgmma"] if arch == 90 else None,
    }


def report(archs: list[int], first_config_only: bool = False) -> dict[int, list[dict]]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            "run the AOT report without TRITON_INTERPRET=1 (the interpreter replaces the compiler)"
        )
    out: dict[int, list[dict]] = {}
    for arch in archs:
        rows = []
        for kernel in _kernels():
            for config in kernel["configs"][:1] if first_config_only else kernel["configs"]:
                rows.append(compile_one(kernel, config, arch))
        out[arch] = rows
    return out


def _print(rows: list[dict]) -> None:
    print(f"{'kernel':28} {'config':48} {'arch':7} {'regs':>4} {'spill':>5} {'stack':>5} {'smem':>7} "
          f"{'hgmma':>5}")  # fmt: skip
    for r in rows:
        c = r["config"]
        blocks = "x".join(str(v) for k, v in c.items() if k.startswith("BLOCK"))
        group = f" g{c['GROUP_M']}" if "GROUP_M" in c else ""
        cfg = f"{blocks} w{c['num_warps']} s{c['num_stages']}{group}"
        hg = r["hgmma"] if r["hgmma"] is not None else "-"
        print(f"{r['kernel']:28} {cfg:48} {r['arch']:7} {r['regs']:>4} {r['spill_stores']:>5} "
              f"{r['stack']:>5} {r['smem']:>7} {hg:>5}")  # fmt: skip


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
