"""Shared plumbing for the Triton kernels: backend choice, launch configs, and one tiled matmul.

Under ``TRITON_INTERPRET=1`` (CPU CI) every kernel runs through Triton's numpy interpreter, which costs
about a millisecond per program and multiplies bf16 ``tl.dot`` operands as raw integer bits. Kernels
therefore take an ``UPCAST`` constexpr (operands go to float32 before ``tl.dot`` when interpreting) and
launch with one fixed, large-block config (``INTERPRET_BLOCKS``, which tests may shrink to reach several
blocks per dimension). On a GPU the kernels are autotuned over a short list of Hopper-friendly configs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
import triton.language as tl

# Read once, at import: Triton binds kernels to the interpreter when they are decorated, so the variable
# must already be set (tests/conftest.py sets it before any kernel module is imported).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Block sizes used under the interpreter (and by AOT reports as "the interpreter config"). Large blocks
# keep the number of interpreted programs small; tests shrink them to exercise block boundaries.
INTERPRET_BLOCKS: dict[str, int] = {
    "BLOCK_N": 16,
    "BLOCK_V": 32,
    "BLOCK_H": 16,
    "BLOCK_M": 16,
    "BLOCK_K": 32,
    "BLOCK_T": 64,
}

IMPLS = ("auto", "triton", "torch")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """True when ``impl`` asks for the Triton path (``"auto"``: CUDA tensors or the interpreter is on)."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLS}")
    if impl == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "triton":
        if not (on_cuda or INTERPRET):
            raise RuntimeError(
                "impl='triton' needs CUDA tensors or TRITON_INTERPRET=1 set before rlcs_fast.kernels is "
                "imported; use impl='torch' (or 'auto') on CPU"
            )
        return True
    return on_cuda or INTERPRET


def autotuned(kernel, configs: list[triton.Config], key: list[str], **kwargs):
    """The autotuned wrapper of ``kernel`` on a GPU; ``None`` under the interpreter (one fixed config)."""
    if INTERPRET:
        return None
    return triton.autotune(configs=configs, key=key, **kwargs)(kernel)


def launch(kernel, tuned, grid: Callable[[dict], tuple], *args, names: tuple[str, ...], **kwargs) -> None:
    """Launch ``tuned`` (autotuner picks blocks) or, under the interpreter, ``kernel`` with fixed blocks."""
    if tuned is not None:
        tuned[grid](*args, **kwargs)
        return
    meta = {name: INTERPRET_BLOCKS[name] for name in names}
    kernel[grid(meta)](*args, **kwargs, **meta, num_warps=4)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (10-bit mantissa) on Ampere/Hopper tensor cores; for 16-bit
    # inputs the setting is ignored.
    return "ieee" if dtype == torch.float32 or INTERPRET else "tf32"


# ----------------------------------------------------------------------------------------------------------
# The linear head (hidden @ weight.T) shared by the fused log-prob and the fused GRPO loss.
# ----------------------------------------------------------------------------------------------------------
def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    assert hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1], (
        f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N, H] and [V, H]"
    )
    N = hidden.shape[0]
    assert targets.shape == (N,), f"targets {tuple(targets.shape)} must be [N={N}]"
    assert hidden.dtype == weight.dtype, f"hidden {hidden.dtype} and weight {weight.dtype} must share a dtype"


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Tokens per chunk: chunk·V ≈ 2^29 elements (a 1 GiB bf16 dlogits buffer), a power of two."""
    target = max(128, (1 << 29) // max(vocab, 1))
    return min(max(n_tokens, 1), 1 << (target.bit_length() - 1))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch path's logits and the dW accumulator: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dlogits_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16 has fp32's range; fp16 dlogits (≈ p / n_tokens) would flush to zero, so fp16 inputs keep fp32.
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


# ----------------------------------------------------------------------------------------------------------
# C (+)= A @ B with float32 accumulation; any strides, so transposed views cost nothing. It computes
# dh = dlogits @ W and dW += dlogits^T @ h: both are plain GEMMs once dlogits of a token chunk exist, and a
# GEMM tiled over the output owns each output tile, so dW needs no atomics (the usual fused-CE kernels
# scatter dW with atomic adds from every token block).
# ----------------------------------------------------------------------------------------------------------

# Every config here compiles without register spills for sm_90a (with HGMMA) and sm_80 at the shapes the
# JIT specialises for (16-byte aligned operands, unit inner strides; see bench/aot_report.py, which sweeps
# them). A [BM, BN] fp32 accumulator costs BM·BN / (32·num_warps) registers per thread: 128 for 128×256 on
# 8 warps, which fits alone, but the ``ACCUMULATE`` epilogue (C += acc, used for dW) loads a second fp32 tile
# of the same size and spills; so the accumulating variant only runs configs with ≤ 64 accumulator
# registers per thread (``matmul_configs``).
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=5),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_ACCUMULATE_MAX_ACC_REGS = 64

# The autotune key. The token count of a micro-batch (M of dh = dlogits @ W, K of dW = dlogitsᵀ @ h) changes
# with nearly every micro-batch; keyed on exact M and K the autotuner re-benchmarked every config each time
# (≈ 0.75 s per micro-batch at 7B). What moves the best config is the order of magnitude of the token count
# (how many tile rows fill the SMs, how long the K loop runs), so M and K enter the key as their next power
# of two (``token_bucket``): at most log2(chunk / 16) + 1 tunings per GEMM shape over a whole run.
MATMUL_TUNE_KEY = ["M_BUCKET", "N", "K_BUCKET"]


def token_bucket(n: int) -> int:
    """The autotune key of a token-count dimension: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def matmul_configs(accumulate: bool) -> list[triton.Config]:
    """The spill-free ``MATMUL_CONFIGS`` of the plain (C = A·B) or accumulating (C += A·B) kernel."""
    if not accumulate:
        return list(MATMUL_CONFIGS)
    return [
        c for c in MATMUL_CONFIGS
        if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _ACCUMULATE_MAX_ACC_REGS * 32 * c.num_warps
    ]  # fmt: skip


# C += A·B is never autotuned: a trial run reads and writes C, so tuning it needs a copy of C restored
# after every trial (``restore_value``), and C is the fp32 dW (2.3 GiB at 7B), cloned at the memory peak.
# The spill-free configs it may run differ only in pipeline depth, so it runs the first of them; the
# non-accumulating variant, which overwrites C and can be re-run freely, is the one that is tuned.
ACCUMULATE_CONFIG: triton.Config = matmul_configs(True)[0]


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr,
    M, N, K,
    M_BUCKET, K_BUCKET,  # autotune key only (token_bucket of M and K)
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_M row-tiles share each column tile while it is hot in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_m64 = offs_m.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_k64 = offs_k.to(tl.int64)
        a = tl.load(
            a_ptr + offs_m64[:, None] * stride_am + offs_k64[None, :] * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k64[:, None] * stride_bk + offs_n64[None, :] * stride_bn,
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    c_ptrs = c_ptr + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def matmul_autotuner(do_bench: Callable | None = None):
    """The autotuned C = A·B kernel (keyed by ``MATMUL_TUNE_KEY``); ``do_bench`` replaces Triton's timer."""
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs=MATMUL_CONFIGS, key=MATMUL_TUNE_KEY, **extra)(_matmul_kernel)


_matmul_tuned = None if INTERPRET else matmul_autotuner()


def matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, accumulate: bool) -> torch.Tensor:
    """``c = a @ b`` (or ``c += a @ b``) with float32 accumulation, written into ``c`` (any dtype)."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and c.shape == (M, N), (
        f"matmul shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(c.shape)}"
    )
    # Mixed operand dtypes (fp32 dlogits with fp16 weights) and fp32 run as exact fp32 dots.
    upcast = INTERPRET or a.dtype != b.dtype or a.dtype == torch.float32

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, c, M, N, K, token_bucket(M), token_bucket(K),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    precision = "ieee" if upcast else "tf32"
    if _matmul_tuned is not None and not accumulate:
        _matmul_tuned[grid](*args, ACCUMULATE=False, UPCAST=upcast, INPUT_PRECISION=precision)
        return c
    if INTERPRET:
        meta = {"BLOCK_M": INTERPRET_BLOCKS["BLOCK_M"], "BLOCK_N": INTERPRET_BLOCKS["BLOCK_V"],
                "BLOCK_K": INTERPRET_BLOCKS["BLOCK_K"], "GROUP_M": 4}  # fmt: skip
        launch_opts = {"num_warps": 4}
    else:
        meta = dict(ACCUMULATE_CONFIG.kwargs)
        launch_opts = {"num_warps": ACCUMULATE_CONFIG.num_warps, "num_stages": ACCUMULATE_CONFIG.num_stages}
    _matmul_kernel[grid(meta)](
        *args, ACCUMULATE=accumulate, UPCAST=upcast, INPUT_PRECISION=precision, **meta, **launch_opts
    )
    return c


def linear_backward_chunk(
    dlogits: torch.Tensor,
    h_chunk: torch.Tensor,
    weight: torch.Tensor,
    dh_chunk: torch.Tensor | None,
    dw_acc: torch.Tensor | None,
    *,
    first: bool,
    via_triton: bool,
) -> None:
    """dh_chunk = dlogits @ W and dw_acc (+)= dlogitsᵀ @ h_chunk (either may be None; ``first`` overwrites
    dw_acc), with the Triton GEMM or torch's."""
    if via_triton:
        if dh_chunk is not None:
            matmul_into(dlogits, weight, dh_chunk, accumulate=False)
        if dw_acc is not None:
            matmul_into(dlogits.t(), h_chunk, dw_acc, accumulate=not first)
        return
    if dh_chunk is not None:
        dh_chunk.copy_(dlogits @ weight.to(dlogits.dtype))
    if dw_acc is not None and first:
        torch.mm(dlogits.t(), h_chunk.to(dlogits.dtype), out=dw_acc)
    elif dw_acc is not None:
        dw_acc.addmm_(dlogits.t(), h_chunk.to(dlogits.dtype))
