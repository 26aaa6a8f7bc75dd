"""What every kernel benchmark shares: shapes, the measurement (time, peak memory, TFLOP/s, fraction of the
matmul floor), the ceilings measured in the same run, and the result files.

Timing: each benchmark body synchronises the device before it returns, so pytest-benchmark's host clock
measures device time (the bodies take ≥ 1 ms at the benchmarked shapes; the ~10 µs of a synchronisation is
in the noise, except for the elementwise GRPO loss, whose numbers are therefore an upper bound). The
median of the timed rounds is reported; warm-up rounds (autotuning, ``torch.compile``) are not counted.

Floor: the matmul work of the op (2·N·H·V for a forward, 6·N·H·V for forward+backward: logits, dh, dW) at
the bf16 rate a plain ``torch.mm`` of the same [N, H] × [H, V] shape reaches in the same run.
``floor_fraction`` = floor time / measured time (1.0 = as fast as the matmuls alone). The elementwise GRPO
loss is bounded by bytes instead: ``bytes / copy bandwidth`` (a device-to-device copy measured in the same
run).

Results: one JSON per run (``write_results``), holding :func:`rlcs_fast.profile.environment` (device,
versions, git revision) and one record per benchmark; ``bench/render.py`` turns them into README tables.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlcs_fast.profile import environment

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 151936  # Qwen2.5-VL-3B's and every Qwen3-VL's vocabulary (7B pads its embedding to 152064; same math)
# the head's widths: Qwen2.5-VL-3B/7B, and Qwen3-VL-8B (hidden 4096, untied head; released config.json)
HIDDEN = {"3b": 2048, "7b": 3584, "qwen3vl_8b": 4096}
TOKENS = (2048, 4096, 8192, 16384, 32768)
# The CI variant: tiny shapes that run every benchmark body once on the CPU (Triton interpreter, torch).
CI_SHAPE = {"model": "ci", "N": 64, "H": 32, "V": 256}
SEQ_LEN = 1024  # tokens per sequence where a method needs [B, T] (Liger's GRPO loss); CI: N // 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Ceilings:
    """The device's bf16 matmul rate per shape and its copy bandwidth, each measured once per run."""

    def __init__(self, device: torch.device, dtype: torch.dtype, ci: bool):
        self.device, self.dtype, self.ci = device, dtype, ci
        self._mm: dict[tuple[int, int, int], float] = {}
        self._bw: float | None = None

    def matmul_tflops(self, n: int, h: int, v: int) -> float:
        """TFLOP/s of ``torch.mm([n, h], [h, v])``: the logits GEMM of the op, random operands."""
        key = (n, h, v)
        if key not in self._mm:
            g = torch.Generator(device=self.device).manual_seed(1)
            a = torch.randn(n, h, device=self.device, dtype=self.dtype, generator=g)
            b = torch.randn(v, h, device=self.device, dtype=self.dtype, generator=g)
            t = _median_time(lambda: torch.mm(a, b.t()), self.device, reps=1 if self.ci else 10)
            self._mm[key] = 2 * n * h * v / t / 1e12
        return self._mm[key]

    def copy_gbps(self) -> float:
        """GB/s of a device-to-device copy, counting bytes read plus bytes written."""
        if self._bw is None:
            numel = 2**16 if self.ci else 2**28  # 1 GiB of float32 on a GPU
            src = torch.randn(numel, device=self.device)
            dst = torch.empty_like(src)
            t = _median_time(lambda: dst.copy_(src), self.device, reps=1 if self.ci else 20)
            self._bw = 2 * numel * 4 / t / 1e9
        return self._bw

    def as_dict(self) -> dict[str, Any]:
        return {"matmul_tflops": {f"{n}x{h}x{v}": r for (n, h, v), r in self._mm.items()},
                "copy_gbps": self._bw, "dtype": str(self.dtype).removeprefix("torch.")}


@dataclass
class Record:
    """One benchmark: an op, a mode ("fwd" / "fwd+bwd"), a method, a shape, and what was measured."""

    op: str
    mode: str
    method: str
    model: str
    N: int
    H: int
    V: int
    variant: str = ""  # e.g. "+entropy"
    status: str = "ok"  # ok | skipped | oom
    reason: str = ""
    median_ms: float | None = None
    rounds: int = 0
    peak_mem_delta_gib: float | None = None
    flops: float | None = None
    tflops: float | None = None
    floor_ms: float | None = None
    floor_fraction: float | None = None
    floor_kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def peak_memory_delta(fn: Callable[[], Any], device: torch.device,
                      setup: Callable[[], Any] | None = None) -> float | None:
    """GiB that one call adds on top of what was allocated before it (``max_memory_allocated`` delta).
    ``setup`` runs before the baseline is taken (e.g. freeing the previous call's gradients, which the
    call itself would free: left allocated, they would be in the baseline and hide the new ones)."""
    if device.type != "cuda":
        return None
    if setup is not None:
        setup()
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**30


def measure(benchmark, fn: Callable[[], Any], record: Record, *, device: torch.device, rounds: int,
            warmup: int, matmul_flops: float | None = None, matmul_tflops: float | None = None,
            bytes_moved: float | None = None, copy_gbps: float | None = None,
            setup: Callable[[], Any] | None = None) -> Record:
    """``warmup`` untimed calls (at least one on a GPU), the peak memory of one warm call, then ``rounds``
    timed calls through pytest-benchmark (one call when it is disabled); fills ``record`` and the
    benchmark's ``extra_info``. The warm-up comes first so that neither the peak nor the timings include
    ``torch.compile`` or Triton autotuning (whose benchmarking allocates its own buffers). ``setup`` runs
    before the memory baseline (see :func:`peak_memory_delta`). A CUDA out-of-memory error marks the
    record ``oom`` (a result: eager torch does not fit) instead of failing the run."""
    times: list[float] = []

    def timed() -> None:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)

    oom = None
    try:
        for _ in range(max(warmup, 1) if device.type == "cuda" else warmup):
            fn()
        record.peak_mem_delta_gib = peak_memory_delta(fn, device, setup)
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=0, iterations=1)
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0][:200]
    if oom is not None:  # outside the except block: its traceback (and the tensors it holds) is gone
        record.status, record.reason = "oom", oom
        if setup is not None:
            setup()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        benchmark.extra_info.update(asdict(record))
        return record
    counted = times[-rounds:] if len(times) > rounds else times
    record.rounds = len(counted)
    record.median_ms = statistics.median(counted) * 1e3
    if matmul_flops is not None:
        record.flops = matmul_flops
        record.tflops = matmul_flops / (record.median_ms / 1e3) / 1e12
        if matmul_tflops:
            record.floor_ms = matmul_flops / (matmul_tflops * 1e12) * 1e3
            record.floor_kind = f"matmul at {matmul_tflops:.1f} TFLOP/s (torch.mm, same run)"
    elif bytes_moved is not None and copy_gbps:
        record.floor_ms = bytes_moved / (copy_gbps * 1e9) * 1e3
        record.floor_kind = f"{bytes_moved / 1e6:.2f} MB at {copy_gbps:.0f} GB/s (copy, same run)"
        record.extra["achieved_gbps"] = bytes_moved / (record.median_ms / 1e3) / 1e9
    if record.floor_ms is not None:
        record.floor_fraction = record.floor_ms / record.median_ms
    benchmark.extra_info.update(asdict(record))
    return record


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_results(path: Path, kind: str, records: list[Record], *, device: torch.device,
                  ceilings: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Path:
    """The run's JSON: environment (device, versions, git revision), settings, ceilings, records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": kind, "environment": environment(device), "settings": settings or {},
               "ceilings": ceilings or {}, "records": [asdict(r) for r in records]}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def default_results_path(kind: str, device: torch.device) -> Path:
    """``bench/results/<kind>_<device>.json``, e.g. ``kernels_nvidia_h100_80gb_hbm3.json``."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return RESULTS / f"{kind}_{slug(name)}.json"


# --- shared by the bench files ---------------------------------------------------------------------------

def liger_or_skip(record: Record, records: list[Record], what: str):
    """``liger_kernel.<what>`` (module path), or a recorded skip when Liger-Kernel is missing."""
    import importlib

    import pytest

    try:
        return importlib.import_module(what)
    except ImportError:
        skip(record, records, "liger-kernel is not installed (pip install 'rlcs-fast[bench]')")
        pytest.skip(record.reason)


def skip(record: Record, records: list[Record], reason: str) -> None:
    record.status, record.reason = "skipped", reason
    records.append(record)


def compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile(fn)`` with room for one graph per benchmarked shape (dynamo's default limit of 8
    recompiles would silently fall back to eager across the 10 shapes)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    return torch.compile(fn, backend=backend, dynamic=False)


def run_case(benchmark, run, record: Record, forward: Callable[[], Any], leaves: list[torch.Tensor], *,
             matmul_flops: float | None = None, bytes_moved: float | None = None) -> Record:
    """Benchmark ``forward`` (mode "fwd": under ``no_grad``) or ``forward().backward()`` (mode "fwd+bwd";
    ``forward`` returns a scalar; the ``leaves``' gradients are cleared before each call so that no
    accumulation is timed) and append the record to the run."""
    def clear_grads() -> None:
        for t in leaves:
            t.grad = None

    if record.mode == "fwd":
        def fn() -> None:
            with torch.no_grad():
                forward()
    else:
        def fn() -> None:
            clear_grads()
            forward().backward()

    mm = run.ceilings.matmul_tflops(record.N, record.H, record.V) if matmul_flops is not None else None
    bw = run.ceilings.copy_gbps() if bytes_moved is not None else None
    measure(benchmark, fn, record, device=run.device, rounds=run.rounds, warmup=run.warmup,
            matmul_flops=matmul_flops, matmul_tflops=mm, bytes_moved=bytes_moved, copy_gbps=bw,
            setup=clear_grads)
    run.records.append(record)
    return record


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """‖actual − expected‖ / ‖expected‖ ≤ tol (float64), and no NaN."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = float((a - e).norm() / e.norm().clamp(min=1e-30))
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
