"""Resumable checkpoints through ``torch.distributed.checkpoint`` (sharded, resumable on another number
of processes), written atomically: every rank writes into ``step_N.tmp``, then rank 0 adds ``meta.json``
and renames the folder. A crash mid-write leaves the previous checkpoint as the newest complete one."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import dist

_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def save(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], *, keep: int) -> Path:
    """Write checkpoint `step`. `extra` (scheduler state, data position, counters) is JSON-free Python
    data saved with torch.save per rank together with that rank's RNG state."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"extra": extra, "rng": rng_state()}, tmp / f"extra_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": dist.world_size()}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer (resharded to this world size) and this rank's RNG; returns `extra`.

    A run resumed on a different number of processes takes rank 0's extra state and RNG for new ranks."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = path / f"extra_rank{dist.rank()}.pt"
    saved = torch.load(own if own.exists() else path / "extra_rank0.pt", weights_only=True)
    set_rng_state(saved["rng"])
    return saved["extra"]


def clean_partial(root: str | Path) -> None:
    """Remove `*.tmp` folders left by a crash during a write (rank 0)."""
    root = Path(root)
    if dist.rank() == 0 and root.is_dir():
        for p in root.glob("step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
