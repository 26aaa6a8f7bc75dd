"""Faults a long run meets on a cluster, each injected on the CPU (2 processes under torchrun with gloo where
ranks matter): non-finite steps, preemption (SIGTERM / SIGUSR1), a rank that dies or hangs, damaged
checkpoints, a full disk or an unwritable folder during a save. Hostile data rows: tests/test_hostile_data.py.

The faults come from `FAULT_TRAIN` below, the trainer with hooks driven by environment variables, so that
a fault fires at a chosen step on a chosen rank. Exact resume is checked against one uninterrupted
reference run (2 processes, 4 SFT steps, checkpoints at 2 and 4)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import _model_and_optimizer, _snapshot, _train_step
from test_distributed import CONFIG, SMALL, _env, _launcher, assert_same, metrics

from rlcs_fast import checkpoint
from rlcs_fast.faults import EXIT_PREEMPTED, BadStepGuard, TooManyBadSteps

STEPS = 4
ARGS = [*SMALL, "--sft.steps", str(STEPS), "--checkpoint.every", "2", "--checkpoint.keep", "10"]

# The trainer with fault hooks. FAULT_RANK picks the rank; the step is counted by calls of sft.run_step
# (or of the reward scorer for GRPO), from 1 in a fresh run.
FAULT_TRAIN = r'''
import os, signal, sys, time
import rlcs_fast.sft as sft
from rlcs_fast import dist
from rlcs_fast.train import main

rank = int(os.environ.get("RANK", "0"))
mine = rank == int(os.environ.get("FAULT_RANK", "0"))
steps = lambda name: {int(s) for s in os.environ.get(name, "").split(",") if s}
calls = {"step": 0, "score": 0}
real_step = sft.run_step

def run_step(ctx, samples, max_tokens):
    calls["step"] += 1
    step = calls["step"]
    if mine and step in steps("FAULT_SIGNAL_AT"):
        target = os.getppid() if os.environ.get("FAULT_SIGNAL_TARGET") == "parent" else os.getpid()
        os.kill(target, getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGTERM")))
    if mine and step in steps("FAULT_KILL_AT"):
        open(os.environ["FAULT_MARK"], "w").write(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    if mine and step in steps("FAULT_RAISE_AT"):
        open(os.environ["FAULT_MARK"], "w").write(str(time.time()))
        raise RuntimeError("injected failure on one rank")
    if mine and step in steps("FAULT_HANG_AT"):
        open(os.environ["FAULT_MARK"], "w").write(str(time.time()))
        time.sleep(3600)
    out = real_step(ctx, samples, max_tokens)
    if mine and step in steps("FAULT_NAN_AT"):  # one gradient entry of this rank's shard
        p = next(p for p in ctx.policy.parameters() if p.grad is not None)
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        g.view(-1)[0] = float("nan")
    return out

sft.run_step = run_step

if os.environ.get("FAULT_NAN_REWARD_AT"):
    from rlcs_fast.rewards import RewardScorer
    real_score = RewardScorer.score

    def score(self, responses, answers):
        calls["score"] += 1
        out = real_score(self, responses, answers)
        if mine and calls["score"] in steps("FAULT_NAN_REWARD_AT"):
            out = [dict(s, overall=float("nan")) for s in out]
        return out

    RewardScorer.score = score

sys.exit(main(sys.argv[1:]))
'''


def _faulty(tmp: Path, run: Path, *args: str, nproc: int, env: dict[str, str] | None = None,
            timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp / "fault_train.py"
    script.write_text(FAULT_TRAIN)
    launcher = _launcher(nproc) if nproc > 1 else [sys.executable]
    cmd = [*launcher, str(script), "--cfg", CONFIG, "--run.dir", str(run), *ARGS, *args]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tmp, env={**_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - t0


def _resume(run: Path, *args: str, nproc: int) -> str:
    cmd = _launcher(nproc) + ["-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir", str(run), *ARGS, *args]
    proc = subprocess.run(cmd, cwd=run.parent, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def _ckpts(run: Path) -> Path:
    return run / "sft" / "checkpoints"


def _state(path: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a DCP checkpoint, flat, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj
        elif isinstance(obj, (int, float)):
            flat[prefix] = torch.tensor(obj)

    walk("", torch.load(out, weights_only=False))
    out.unlink()
    return flat


def _same_state(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def _adam_steps(state: dict) -> set[float]:
    return {float(v) for k, v in state.items() if k.endswith(".step")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """4 uninterrupted SFT steps on 2 processes."""
    run = tmp_path_factory.mktemp("faults") / "reference"
    _resume(run, nproc=2)
    return run


# --- non-finite steps ----------------------------------------------------------------------------------

def test_bad_step_guard_counts_warns_and_stops(caplog):
    guard = BadStepGuard(max_bad_steps=2, stage="sft")
    with caplog.at_level(logging.WARNING, logger="rlcs_fast"):
        assert guard.check(1, "loss", 1.0, torch.ones(3))
        assert not guard.check(2, "loss", float("nan"), torch.ones(3))
        guard.good()  # a good step in between resets the run of bad ones, not the total
        assert not guard.check(3, "grad norm", 1.0, torch.tensor([1.0, float("inf")]))
    assert "sft step 2: non-finite loss" in caplog.text and "sft step 3" in caplog.text
    assert guard.state() == {"skipped": 2, "in_a_row": 1}
    with pytest.raises(TooManyBadSteps, match="2 non-finite steps in a row"):
        guard.check(4, "loss", float("-inf"))
    restored = BadStepGuard(max_bad_steps=2, stage="sft")
    restored.load_state(guard.state())
    assert restored.state() == {"skipped": 3, "in_a_row": 2}


def test_max_bad_steps_is_validated():
    from rlcs_fast.config import ConfigError, parse_args

    assert parse_args(["--cfg", CONFIG])[0].optim.max_bad_steps == 3
    with pytest.raises(ConfigError, match="optim.max_bad_steps"):
        parse_args(["--cfg", CONFIG, "--optim.max_bad_steps", "0"])


@pytest.mark.slow
def test_nonfinite_steps_change_nothing_and_too_many_stop_the_run(tmp_path):
    """NaN gradients at steps 2, 4 and 5, max_bad_steps = 2: steps 2 and 4 change no weight and no AdamW
    state (its step count included), step 3 trains, step 5 (the second bad one in a row) stops the run
    with exit status 1 and a one-line reason, before a checkpoint of step 5 is written."""
    run = tmp_path / "run"
    proc, _ = _faulty(tmp_path, run, "--sft.steps", "5", "--checkpoint.every", "1",
                      "--optim.max_bad_steps", "2", nproc=1, env={"FAULT_NAN_AT": "2,4,5"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "2 non-finite steps in a row (the last at step 5" in proc.stderr, proc.stderr[-3000:]
    assert "sft step 2: non-finite loss or gradient norm, step skipped" in proc.stderr
    assert "Traceback" not in proc.stderr
    names = [p.name for p in checkpoint.complete_checkpoints(_ckpts(run))]
    assert names == [f"step_0000000{i}" for i in range(1, 5)]  # nothing written for the fatal step 5
    assert checkpoint.latest_intact_checkpoint(_ckpts(run)).name == "step_00000004"
    s = {i: _state(_ckpts(run) / f"step_0000000{i}") for i in range(1, 5)}
    assert _same_state(s[1], s[2]) and _same_state(s[3], s[4])
    assert not _same_state(s[2], s[3])
    assert _adam_steps(s[1]) == _adam_steps(s[2]) == {1.0} and _adam_steps(s[3]) == _adam_steps(s[4]) == {2.0}
    skipped = metrics(run, "train/skipped_steps")
    assert [skipped[i] for i in range(1, 5)] == [0, 1, 1, 2]


@pytest.mark.slow
def test_nonfinite_rewards_on_one_rank_skip_the_grpo_step_on_all(tmp_path):
    """A reward function returning NaN on rank 1 at GRPO step 2: both ranks skip the step's updates
    (rank 0's rewards are finite: without the agreement its updates would wait for rank 1 forever)."""
    run = tmp_path / "run"
    grpo = ["--run.stages", '["grpo"]', "--grpo.steps", "3", "--grpo.rollout_batch_size", "4",
            "--grpo.mini_batch_size", "2", "--grpo.n", "2", "--grpo.epochs", "1",
            "--grpo.max_response_length",
            "8", "--data.val_size", "2", "--grpo.val_n", "1", "--checkpoint.every", "1",
            "--reward.num_workers", "1"]
    proc, _ = _faulty(tmp_path, run, *grpo, nproc=2, env={"FAULT_RANK": "1", "FAULT_NAN_REWARD_AT": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "grpo step 2: non-finite rewards or advantages, step skipped" in proc.stderr
    root = run / "grpo" / "checkpoints"
    s = {i: _state(root / f"step_0000000{i}") for i in (1, 2, 3)}
    assert _same_state(s[1], s[2]) and not _same_state(s[2], s[3])
    assert _adam_steps(s[1]) == _adam_steps(s[2]) == {2.0} and _adam_steps(s[3]) == {4.0}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r] == [0, 1, 1]


# --- preemption ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_resumes_exactly(reference, tmp_path):
    """SIGTERM to torchrun during step 3 (what SLURM and Kubernetes do): torchrun forwards it, both ranks
    finish step 3, write its checkpoint and exit with EXIT_PREEMPTED; auto-resume gives the reference."""
    run = tmp_path / "run"
    proc, _ = _faulty(tmp_path, run, nproc=2, env={"FAULT_SIGNAL_AT": "3", "FAULT_SIGNAL_TARGET": "parent"})
    assert proc.returncode != 0
    assert "preempted after step 3, checkpoint" in proc.stderr, proc.stderr[-4000:]
    assert f"exiting with status {EXIT_PREEMPTED}" in proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])  # torchrun's own, see README
    assert checkpoint.latest_intact_checkpoint(_ckpts(run)).name == "step_00000003"
    assert sorted(metrics(run, "train/loss")) == [1, 2, 3]
    err = _resume(run, nproc=2)
    assert "(step 3)" in err
    assert_same(metrics(run, "train/loss"), metrics(reference, "train/loss"), range(1, STEPS + 1), "loss")


@pytest.mark.slow
def test_sigusr1_to_a_single_process_exits_75_and_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    proc, _ = _faulty(tmp_path, run, nproc=1, env={"FAULT_SIGNAL_AT": "1", "FAULT_SIGNAL": "SIGUSR1"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-4000:]
    assert checkpoint.latest_intact_checkpoint(_ckpts(run)).name == "step_00000001"
    _resume(run, nproc=1)
    assert_same(metrics(run, "train/loss"), metrics(reference, "train/loss"), range(1, STEPS + 1), "loss")


# --- a rank dies or hangs ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("fault", ["FAULT_KILL_AT", "FAULT_RAISE_AT"])
def test_a_dead_rank_stops_the_job_quickly_and_resumes_exactly(reference, tmp_path, fault):
    """Rank 1 is SIGKILLed (or raises) at the start of step 3 while rank 0 waits in a collective."""
    run, mark = tmp_path / "run", tmp_path / "died"
    proc, _ = _faulty(tmp_path, run, nproc=2, env={"FAULT_RANK": "1", fault: "3", "FAULT_MARK": str(mark)})
    stopped_after = time.time() - float(mark.read_text())
    assert proc.returncode != 0
    assert stopped_after < 60, f"the job took {stopped_after:.0f} s to stop after the rank died"
    assert [p.name for p in checkpoint.complete_checkpoints(_ckpts(run))] == ["step_00000002"]
    assert checkpoint.damage(_ckpts(run) / "step_00000002") is None
    if fault == "FAULT_RAISE_AT":
        return  # the same state as after a SIGKILL: one resume check is enough
    _resume(run, nproc=2)
    assert_same(metrics(run, "train/loss"), metrics(reference, "train/loss"), range(1, STEPS + 1), "loss")


@pytest.mark.slow
def test_a_hung_rank_trips_the_collective_timeout(tmp_path):
    """Rank 1 stays alive but stuck at step 3: rank 0 gives up after run.collective_timeout_s, not 30 min."""
    run, mark = tmp_path / "run", tmp_path / "hung"
    proc, _ = _faulty(tmp_path, run, "--run.collective_timeout_s", "10", nproc=2, timeout=240,
                      env={"FAULT_RANK": "1", "FAULT_HANG_AT": "3", "FAULT_MARK": str(mark)})
    stopped_after = time.time() - float(mark.read_text())
    assert proc.returncode != 0
    assert 8 < stopped_after < 90, stopped_after
    assert checkpoint.damage(_ckpts(run) / "step_00000002") is None


# --- broken files --------------------------------------------------------------------------------------

def _two_checkpoints(root: Path):
    model, opt = _model_and_optimizer()
    for step in (1, 2):
        _train_step(model, opt, seed=step)
        checkpoint.save(root, step, model, opt, {"step": step}, keep=5)
    return model, opt


def _load_step(path: Path) -> int:
    model, opt = _model_and_optimizer(seed=1)
    return checkpoint.load(path, model, opt)["step"]


@pytest.mark.parametrize("damage", ["truncated_shard", "flipped_byte", "lost_extra"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    _two_checkpoints(tmp_path)
    newest = tmp_path / "step_00000002"
    shard = next(newest.glob("*.distcp"))
    if damage == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif damage == "flipped_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        (newest / "extra_rank0.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="rlcs_fast"):
        found = checkpoint.latest_intact_checkpoint(tmp_path)
    assert found == tmp_path / "step_00000001" and _load_step(found) == 1
    assert "is damaged" in caplog.text and "falling back" in caplog.text
    assert (tmp_path / "step_00000002.corrupt").is_dir()  # kept for inspection, never taken again
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000001"]
    with pytest.raises(checkpoint.CheckpointError, match="damaged"):
        checkpoint.check_intact(tmp_path / "step_00000002.corrupt")


def test_a_checkpoint_without_meta_json_is_not_taken(tmp_path, caplog):
    _two_checkpoints(tmp_path)
    (tmp_path / "step_00000002" / "meta.json").unlink()
    with caplog.at_level(logging.WARNING, logger="rlcs_fast"):
        checkpoint.clean_partial(tmp_path)
    assert "has no meta.json" in caplog.text
    assert checkpoint.latest_intact_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_the_manifest_covers_every_file(tmp_path):
    _two_checkpoints(tmp_path)
    path = tmp_path / "step_00000002"
    files = json.loads((path / "meta.json").read_text())["files"]
    assert set(files) == {p.name for p in path.iterdir()} - {"meta.json"}
    assert all(files[n][0] == (path / n).stat().st_size for n in files)
    assert checkpoint.damage(path) is None


def _full_disk_in_dcp(monkeypatch):
    import torch.distributed.checkpoint.filesystem as fs

    real = fs._write_item
    written = []

    def write_item(*a, **k):  # the first tensor lands, then the disk is full
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fs, "_write_item", write_item)


def _full_disk_in_extra(monkeypatch):
    def save(obj, f, *a, **k):
        Path(f).write_bytes(b"\0" * 100)  # a partial file, as a full disk leaves it
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", save)


def _unwritable(monkeypatch):
    real = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)


@pytest.mark.parametrize("inject", [_full_disk_in_dcp, _full_disk_in_extra, _unwritable])
def test_a_failed_save_is_loud_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch, inject):
    model, opt = _two_checkpoints(tmp_path)
    before = {p.name: sorted(q.name for q in p.iterdir()) for p in tmp_path.iterdir()}
    _train_step(model, opt, seed=3)
    inject(monkeypatch)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 could not be written.*step_00000002"):
        checkpoint.save(tmp_path, 3, model, opt, {"step": 3}, keep=5)
    monkeypatch.undo()
    after = {p.name: sorted(q.name for q in p.iterdir()) for p in tmp_path.iterdir()}
    assert after == before  # no step_3, no step_3.tmp, the previous ones untouched
    assert checkpoint.latest_intact_checkpoint(tmp_path).name == "step_00000002"
    restored, ropt = _model_and_optimizer(seed=5)
    checkpoint.load(tmp_path / "step_00000002", restored, ropt)
    model2, opt2 = _model_and_optimizer()
    for s in (1, 2):
        _train_step(model2, opt2, seed=s)
    assert _snapshot(restored, ropt)[0].keys() == _snapshot(model2, opt2)[0].keys()
    for k, v in _snapshot(model2, opt2)[0].items():
        assert torch.equal(_snapshot(restored, ropt)[0][k], v), k


@pytest.mark.slow
def test_the_trainer_resumes_past_a_damaged_checkpoint(reference, tmp_path):
    """A copy of the reference with its newest checkpoint's shard cut short and DONE removed: auto-resume
    warns, takes step 2 and redoes steps 3-4 exactly (on 1 process: DCP reshards)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "sft" / "hf")
    (run / "sft" / "DONE").unlink()
    shard = next((_ckpts(run) / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    err = _resume(run, nproc=1)
    assert "step_00000004 is damaged" in err and "(step 2)" in err
    assert_same(metrics(run, "train/loss"), metrics(reference, "train/loss"), range(1, STEPS + 1), "loss")


def test_preemption_flag_is_set_by_the_signal_and_restored(tmp_path):
    from rlcs_fast.faults import Preemption

    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert p.requested() and p.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) == before
