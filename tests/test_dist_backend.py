"""The process group of a GPU run can reduce every tensor the trainer hands to `rlcs_fast.dist`.

On the CPU everything runs on gloo, which reduces any tensor: the checks here (and the
``RLCS_DIST_CHECK=cuda`` mode that conftest sets for every test and torchrun worker) hold the code to
the group that a CUDA run starts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed

from rlcs_fast import dist

PACKAGE = Path(__file__).parent.parent / "rlcs_fast"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "send",
               "recv"}


def test_a_cuda_run_starts_a_group_with_a_cpu_backend(monkeypatch):
    """NCCL alone fails at the first CPU reduction (resume's probe, micro-batch counts, statistics)."""
    started = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: started.update(backend=backend, **kw))
    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    _, _, device = dist.init("cuda")
    assert device == torch.device("cuda", 0)
    assert {"cpu", "cuda"} <= dist.backend_devices(started["backend"]), started["backend"]


def test_check_mode_refuses_what_an_nccl_only_group_could_not_reduce(monkeypatch):
    monkeypatch.setenv(dist.CHECK_ENV, "cuda")
    dist.all_reduce(torch.ones(2))  # the rule: host tensors go through the group's gloo backend
    monkeypatch.setattr(dist, "group_backend", lambda use_cuda: "nccl" if use_cuda else "gloo")
    with pytest.raises(RuntimeError, match="no backend for cpu tensors"):
        dist.all_reduce(torch.ones(2))
    monkeypatch.setenv(dist.CHECK_ENV, "")
    dist.all_reduce(torch.ones(2))


def test_collectives_go_through_rlcs_fast_dist():
    """A tensor collective called on torch.distributed directly would escape the check above. Allowed: the
    vLLM engine's object gather on vLLM's own CPU group."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "dist.py" and path.parent == PACKAGE:
            continue
        tree = ast.parse(path.read_text())
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for a in node.names if a.name == "torch.distributed"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in aliases):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.func.attr}")
    assert not offenders, offenders
