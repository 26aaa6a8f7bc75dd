"""pytest-benchmark setup for ``pytest bench/``.

- On a GPU: every benchmark at the 3B/7B shapes (``--bench-models qwen3vl_8b``: Qwen3-VL-8B's); the run's
  JSON goes to ``bench/results/kernels_<gpu>.json`` (or ``--bench-out``).
- Without a GPU: everything is skipped with one reason, in seconds.
- ``--bench-ci``: every benchmark body once at tiny shapes on the CPU (Triton interpreter, torch), so the
  suite never rots; use with ``--benchmark-disable``. Writes JSON only with ``--bench-out``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton binds kernels to the interpreter when they are defined: set it before rlcs_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchlib  # noqa: E402  (after TRITON_INTERPRET)

NO_GPU_REASON = ("no CUDA GPU: the kernel benchmarks time bf16 kernels on a GPU; run "
                 "`pytest bench/ --bench-ci --benchmark-disable` for the CPU smoke variant")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("rlcs_fast bench")
    g.addoption("--bench-ci", action="store_true", help="run every benchmark body once at tiny CPU shapes")
    g.addoption("--bench-out", default=None,
                help="results JSON path (default: bench/results/kernels_<device>.json)")
    g.addoption("--bench-tokens", default=None, help="comma-separated N values (default 2048,...,32768)")
    g.addoption("--bench-models", default="3b,7b", help="comma-separated shapes among 3b,7b,qwen3vl_8b")
    g.addoption("--bench-rounds", type=int, default=10, help="timed rounds per benchmark")
    g.addoption("--bench-warmup", type=int, default=2,
                help="untimed rounds per benchmark (autotune, compile)")


def _ci(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-ci"))


def pytest_configure(config: pytest.Config) -> None:
    # --bench-ci runs on CPU tensors even where a GPU is present: the Triton kernels then need the
    # interpreter too (set here, before collection imports rlcs_fast.kernels; the import above only covers
    # machines without a GPU)
    if _ci(config):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def shapes(config: pytest.Config) -> list[dict[str, int | str]]:
    """The (model, N, H, V) grid this run benchmarks."""
    if _ci(config):
        return [dict(benchlib.CI_SHAPE)]
    tokens = config.getoption("--bench-tokens")
    ns = [int(x) for x in tokens.split(",")] if tokens else list(benchlib.TOKENS)
    models = [m.strip() for m in config.getoption("--bench-models").split(",") if m.strip()]
    return [{"model": m, "N": n, "H": benchlib.HIDDEN[m], "V": benchlib.VOCAB} for m in models for n in ns]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "shape" in metafunc.fixturenames:
        grid = shapes(metafunc.config)
        metafunc.parametrize("shape", grid, ids=[f"{s['model']}-N{s['N']}" for s in grid])
    if "n_tokens" in metafunc.fixturenames:  # ops without H and V: one axis, N
        ns = sorted({int(s["N"]) for s in shapes(metafunc.config)})
        metafunc.parametrize("n_tokens", ns, ids=[f"N{n}" for n in ns])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _ci(config) and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_GPU_REASON)
        for item in items:
            item.add_marker(skip)


class BenchRun:
    """Per-session state: device, dtype, ceilings and the records the run writes."""

    def __init__(self, config: pytest.Config):
        self.ci = _ci(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() and not self.ci else "cpu")
        self.dtype = torch.bfloat16
        self.rounds = 1 if self.ci else config.getoption("--bench-rounds")
        self.warmup = 0 if self.ci else config.getoption("--bench-warmup")
        self.ceilings = benchlib.Ceilings(self.device, self.dtype, self.ci)
        self.records: list[benchlib.Record] = []
        # torch.compile: inductor on a GPU; under --bench-ci the "eager" backend, which still traces the
        # function with dynamo (the part that breaks when code changes) but skips the C++ build (~20 s on CPU)
        self.compile_backend = "eager" if self.ci else "inductor"
        self.impl = "triton"  # the interpreter under --bench-ci

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)


@pytest.fixture(scope="session")
def bench_run(request: pytest.FixtureRequest) -> BenchRun:
    run = BenchRun(request.config)
    request.config._rlcs_bench_run = run
    return run


def pytest_runtest_teardown(item: pytest.Item) -> None:
    # Rewritten after every benchmark, so a run killed at a time limit (bench/gpu_check.py) keeps its records.
    pytest_sessionfinish(item.session, 0)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    run: BenchRun | None = getattr(session.config, "_rlcs_bench_run", None)
    if run is None or not run.records:
        return
    out = session.config.getoption("--bench-out")
    if out is None and run.ci:
        return  # the CI variant leaves bench/results alone unless asked
    path = Path(out) if out else benchlib.default_results_path("kernels", run.device)
    settings = {"ci": run.ci, "rounds": run.rounds, "warmup": run.warmup, "dtype": "bfloat16",
                "compile_backend": run.compile_backend}
    benchlib.write_results(path, "kernels", run.records, device=run.device, ceilings=run.ceilings.as_dict(),
                           settings=settings)
