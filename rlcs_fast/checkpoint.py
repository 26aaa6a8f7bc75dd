"""Resumable checkpoints through ``torch.distributed.checkpoint`` (DCP), sharded and written atomically.

Layout of one checkpoint, ``<root>/step_NNNNNNNN/``: DCP's ``.metadata`` and ``__R_0.distcp`` shards (model
and optimizer, keyed by parameter name, so they load on any number of processes: DCP reshards on load),
``extra_rank{r}.pt`` per rank (scheduler, data position, skip counters, RNG) and ``meta.json`` (step,
world size, and the manifest: size and SHA-256 of every other file), written last.

Atomic: every rank writes into ``step_N.tmp``; after a barrier rank 0 adds ``meta.json``, fsyncs and renames
the folder. Only a folder named ``step_N`` holding ``meta.json`` counts as complete, so a process killed
mid-write leaves the previous checkpoint as the newest complete one (``run.resume = "auto"`` picks it) and
the partial ``.tmp`` is removed on the next start. Old checkpoints lose ``meta.json`` before their files,
so an interrupted clean-up never leaves a half-deleted folder that looks complete.

Damage after the write (a shard cut short or overwritten, a file lost): ``latest_intact_checkpoint``
checks every file against the manifest (sizes and checksums, the files split over the ranks) and falls
back to the previous checkpoint with a warning; the damaged folder is renamed ``step_N.corrupt`` and kept
for inspection. A failed write (full disk, unwritable ``run.dir``, on any rank) raises
:class:`CheckpointError` on every rank together, removes the partial ``.tmp`` and publishes nothing: the
previous checkpoint stays the newest complete one.

Resuming on another world size (the rule for per-rank state):
- model and optimizer: resharded by DCP, exact;
- extra state: step, scheduler and stage state are the same on every rank, so every rank takes rank 0's;
  the skip counters are per rank (``SkipCounter``, keyed by global row), so the stage merges all saved
  ranks' counters into rank 0 (``saved_extras``) to keep the global count;
- RNG: a rank's stream cannot be split or merged, so each rank is reseeded with a seed drawn from rank 0's
  saved torch state plus its rank: deterministic, distinct per rank. The trainer's results do not depend
  on it: SFT draws no random numbers (data order is ``data.global_indices``, seeded by step), and GRPO
  seeds each step's generation with (run.seed, step, rank). So an SFT continuation on any world size equals
  the uninterrupted run; a GRPO continuation is deterministic but, as with any world-size change, its
  rollouts are those of the new rank layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import dist

log = logging.getLogger("rlcs_fast")

_STEP_DIR = re.compile(r"^step_(\d+)$")


def fsync_tree(path: str | Path, *, recursive: bool = True) -> None:
    """Flush `path` (a folder, and with `recursive` every file under it) to disk. A rename is atomic but
    does not make the data behind it durable: fsync before publishing, and the parent after renaming."""
    path = Path(path)
    for p in [*(path.rglob("*") if recursive else ()), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def reseed_rng(state: dict[str, Any], rank: int) -> int:
    """Seed python, torch and CUDA with a seed drawn from `state` (rank 0's saved RNG) plus `rank`."""
    g = torch.Generator()
    g.set_state(state["torch"])
    seed = int(torch.randint(0, 2**62, (1,), generator=g)) + rank
    random.seed(seed)
    torch.manual_seed(seed)  # also every CUDA device
    return seed


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


def saved_world_size(path: str | Path) -> int:
    return int(json.loads((Path(path) / "meta.json").read_text())["world_size"])


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore",
                                message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, `meta.json` first, so that it stops counting as complete at once."""
    (path / "meta.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


class CheckpointError(RuntimeError):
    pass


def _on_every_rank(what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` here and tell every rank whether it failed on any rank: a write that fails on one rank
    must stop all of them, not leave the others waiting in the next collective."""
    err: BaseException | None = None
    out = None
    try:
        out = fn()
    except (Exception, CheckpointException) as e:  # OSError (ENOSPC, EACCES); DCP's is a BaseException
        # DCP wraps each rank's error with its traceback: name the first one, the traceback stays chained
        err = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
    ok = dist.all_reduce(torch.tensor([0 if err else 1]), "min")
    if not int(ok.item()):
        raise CheckpointError(f"{what}: {type(err).__name__}: {err}" if err
                              else f"{what}: failed on another rank") \
            from err
    return out


def _digest(path: Path) -> list:
    """[size in bytes, SHA-256 hex] of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return [path.stat().st_size, h.hexdigest()]


def _manifest(folder: Path) -> dict[str, list]:
    """{file name: [size, sha256]} of every file in `folder` (collective: each rank hashes a share)."""
    names = dist.broadcast_object(sorted(p.name for p in folder.iterdir() if p.is_file()))
    mine = {n: _digest(folder / n) for n in names[dist.rank()::dist.world_size()]}
    return {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}


def save(root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         extra: dict[str, Any], *, keep: int) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). `extra` (scheduler state, data position,
    counters) is plain Python data saved with torch.save per rank, with that rank's RNG state. Keeps the
    newest `keep` complete checkpoints. A failed write raises `CheckpointError` on every rank and leaves
    the previous checkpoints as they were."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    try:
        _write(root, step, tmp, final, model, optimizer, extra)
    except CheckpointError as e:
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        raise CheckpointError(f"checkpoint step {step} could not be written under {str(root)!r} ({e}); "
                              "nothing "
                              f"was published, the newest complete checkpoint is still "
                              f"{str(previous) if previous else 'none'}. Free disk space or fix the "
                              "permissions of run.dir, then resume.") from e
    if dist.rank() == 0:
        for old in complete_checkpoints(root)[:-keep]:
            _remove(old)
    dist.barrier()
    return final


def _write(root: Path, step: int, tmp: Path, final: Path, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
    def create() -> None:
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    _on_every_rank("creating the folder", create)
    model_sd, optim_sd = get_state_dict(model, optimizer)

    def shards() -> None:
        with _single_process_ok():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))  # fsyncs its own files

    _on_every_rank("writing the model and optimizer shards", shards)

    def own_extra() -> None:
        own = tmp / f"extra_rank{dist.rank()}.pt"
        torch.save({"extra": extra, "rng": rng_state()}, own)
        fsync_tree(own, recursive=False)

    _on_every_rank("writing the per-rank state", own_extra)
    files = _manifest(tmp)

    def publish() -> None:
        if dist.rank() != 0:
            return
        meta = tmp / "meta.json"
        meta.write_text(json.dumps({"step": step, "world_size": dist.world_size(), "time": time.time(),
                                    "files": files}))
        fsync_tree(meta, recursive=False)
        fsync_tree(tmp, recursive=False)
        if final.exists():  # the same step written again (a resumed run re-saving it)
            _remove(final)
        tmp.rename(final)
        fsync_tree(root, recursive=False)

    _on_every_rank("publishing meta.json", publish)


def damage(path: str | Path) -> str | None:
    """What is wrong with complete checkpoint `path` against its manifest, or None when intact
    (collective: each rank checks a share of the files). Checkpoints written before manifests existed
    carry none and are taken as they are."""
    path = Path(path)
    try:
        files = json.loads((path / "meta.json").read_text()).get("files")
    except (OSError, ValueError) as e:
        files, problem = {}, f"meta.json unreadable ({type(e).__name__}: {e})"
    else:
        problem = None
    mine = []
    for name in sorted(files or {})[dist.rank()::dist.world_size()]:
        f = path / name
        if not f.is_file():
            mine.append(f"{name} is missing")
        elif f.stat().st_size != files[name][0]:
            mine.append(f"{name} has {f.stat().st_size} bytes, {files[name][0]} were written")
        elif _digest(f)[1] != files[name][1]:
            mine.append(f"{name} does not match its checksum")
    found = [p for part in dist.all_gather_object(mine) for p in part]
    if problem:
        found.insert(0, problem)
    return "; ".join(found) if found else None


def latest_intact_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest (collective). A damaged one is
    renamed ``step_N.corrupt`` (kept for inspection, never taken again) with a warning, and the previous
    one is tried."""
    for path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return path
        if dist.rank() == 0:
            log.warning("checkpoint %s is damaged (%s): falling back to the previous one; the folder is kept "
                        "as %s.corrupt", path, problem, path.name)
            path.rename(path.with_name(path.name + ".corrupt"))
        dist.barrier()
    return None


def check_intact(path: str | Path) -> None:
    """Fail with the problem when an explicitly chosen checkpoint (`run.resume = PATH`) is damaged."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"run.resume = {str(path)!r} is not a complete checkpoint (no meta.json).")
    problem = damage(path)
    if problem:
        raise CheckpointError(f"run.resume = {str(path)!r} is damaged: {problem}.")


def load(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer (resharded to this world size) and the RNG; returns this rank's `extra`.

    Same world size as the save: each rank gets its own extra state and RNG. Another world size: rank 0's
    extra state on every rank, and the RNG reseeded per rank (see the module docstring)."""
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved_world = saved_world_size(path)
    if saved_world == dist.world_size():
        saved = torch.load(path / f"extra_rank{dist.rank()}.pt", weights_only=True)
        set_rng_state(saved["rng"])
    else:
        saved = torch.load(path / "extra_rank0.pt", weights_only=True)
        reseed_rng(saved["rng"], dist.rank())
        if dist.rank() == 0:
            log.info("checkpoint %s was written by %d process(es), resuming on %d: model and optimizer "
                     "resharded, per-rank RNG reseeded", path, saved_world, dist.world_size())
    return saved["extra"]


def saved_extras(path: str | Path) -> list[dict[str, Any]]:
    """The `extra` state of every rank that wrote checkpoint `path`, by rank."""
    path = Path(path)
    return [torch.load(path / f"extra_rank{r}.pt", weights_only=True)["extra"]
            for r in range(saved_world_size(path))]


def check_shared(root: str | Path) -> None:
    """Fail early, with the fix, when the ranks do not all see rank 0's checkpoint folder (multi-node
    without a shared file system): DCP writes each rank's shard where that rank runs, and resuming needs
    every shard and the metadata in one place."""
    if not dist.is_dist():
        return
    root = Path(root)
    probe = root / f".shared_probe_{os.getpid()}_{time.time_ns()}"
    if dist.rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("shared")
    probe = Path(dist.broadcast_object(str(probe)))  # also orders the write before the reads below
    seen = torch.tensor([1 if probe.is_file() else 0])
    dist.all_reduce(seen, "min")
    dist.barrier()
    if dist.rank() == 0:
        probe.unlink(missing_ok=True)
    if not int(seen.item()):
        raise RuntimeError(f"checkpoint folder {str(root)!r} (under run.dir) is not visible from every "
                           "process: "
                           "put run.dir on a file system all nodes share (NFS, Lustre, a mounted bucket); "
                           "see the README's Multi-node section.")


def clean_partial(root: str | Path) -> None:
    """Remove what a crash during a write or a clean-up leaves (rank 0): `*.tmp` folders and step folders
    without `meta.json`."""
    root = Path(root)
    if dist.rank() == 0 and root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("step_") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
            elif _STEP_DIR.match(p.name) and not (p / "meta.json").is_file():
                log.warning("checkpoint %s has no meta.json (a write or a clean-up was interrupted, or the "
                            "file "
                            "was lost): removed, the previous complete checkpoint is used", p)
                shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
