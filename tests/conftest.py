"""Test setup shared by every test file.

Triton kernels run under the interpreter on machines without a GPU: ``TRITON_INTERPRET`` must be set
before any module that defines ``@triton.jit`` kernels is imported, so it is set here, first.

Tiers (markers declared in pyproject.toml): ``pytest -m "not slow"`` is the edit loop (unit tests, in
process, well under two minutes on 2 CPU cores); ``pytest -m slow`` the integration tier (subprocesses:
training runs, torchrun, pip installs, AOT compiles); ``pytest`` runs both. A test marked ``sweep`` (an
exhaustive sweep) runs only when ``-m`` names it: ``pytest -m sweep``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every collective of rlcs_fast.dist (here and in the torchrun workers, which inherit it) is checked
# against the process group a CUDA run has: gloo alone would accept tensors that NCCL cannot reduce
os.environ.setdefault("RLCS_DIST_CHECK", "cuda")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "sweep" in (config.getoption("markexpr") or ""):
        return
    opt_in = pytest.mark.skip(reason="exhaustive sweep: opt in with -m sweep")
    for item in items:
        if item.get_closest_marker("sweep") is not None:
            item.add_marker(opt_in)
