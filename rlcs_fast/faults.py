"""What a long run does when the cluster or the numbers misbehave: preemption signals and non-finite steps.

- :class:`Preemption`: SIGTERM (what SLURM and Kubernetes send before a kill) or SIGUSR1 (SLURM's
  ``--signal=USR1@<seconds>`` early warning) only sets a flag; the stage loop asks
  :meth:`Preemption.requested` once per step (a 1-element all-reduce, so every rank stops after the same
  step even when the signal reached one rank only), writes a checkpoint and raises :class:`Preempted`; the
  entry point exits with :data:`EXIT_PREEMPTED`.
- :class:`BadStepGuard`: a step whose loss, gradient norm, rewards or advantages are NaN/inf is skipped
  (no optimizer step, no scheduler step, gradients dropped) on every rank together; ``max_bad_steps`` in a
  row stop the run with :class:`TooManyBadSteps` before anything is saved, so the newest checkpoint is the
  last good one.
"""

from __future__ import annotations

import logging
import math
import signal
from typing import Any

import torch

from . import dist

log = logging.getLogger("rlcs_fast")

# sysexits.h EX_TEMPFAIL, "try again later": the run is healthy and resumable. Not 0 (the work is not
# done), not 1 (a crash), not 2 (a config error), not 128 + 15 = 143 (what a process killed by SIGTERM
# *without* a checkpoint reports), so a scheduler's requeue rule can tell "preempted, saved" apart.
EXIT_PREEMPTED = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by a stage after writing its preemption checkpoint."""

    def __init__(self, stage: str, step: int, path: Any):
        super().__init__(f"{stage}: preempted after step {step}, checkpoint {path}")
        self.stage, self.step, self.path = stage, step, path


class TooManyBadSteps(RuntimeError):
    pass


class Preemption:
    """Signal flag shared by the stages of one run. Use as a context manager around the stages: the
    previous handlers come back on exit (tests and notebooks call `train.main` in-process)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            # a log call here could re-enter the logging lock held by the interrupted frame: only set the flag
            self.received = signum

    def __enter__(self) -> Preemption:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def requested(self) -> bool:
        """True on every rank once any rank got a signal (collective: every rank calls it each step)."""
        flag = torch.tensor([0 if self.received is None else 1])
        return bool(dist.all_reduce(flag, "max").item())


def all_finite(*values: float | torch.Tensor) -> bool:
    """True on every rank when every value on every rank is finite (collective)."""
    ok = all(bool(torch.isfinite(v).all()) if isinstance(v,
                                                         torch.Tensor) else math.isfinite(v) for v in values)
    return bool(dist.all_reduce(torch.tensor([1 if ok else 0]), "min").item())


class BadStepGuard:
    """Counts skipped (non-finite) steps, in total and in a row; the state goes into checkpoints."""

    def __init__(self, max_bad_steps: int, stage: str):
        self.max_bad_steps = max_bad_steps
        self.stage = stage
        self.skipped = 0
        self.in_a_row = 0

    def check(self, step: int, what: str, *values: float | torch.Tensor) -> bool:
        """True when the step may be applied. False: the caller drops the update; raises after
        `max_bad_steps` bad steps in a row."""
        if all_finite(*values):
            return True
        self.bad(step, what)
        return False

    def bad(self, step: int, what: str) -> None:
        self.skipped += 1
        self.in_a_row += 1
        log.warning("%s step %d: non-finite %s, step skipped (weights and optimizer unchanged); %d in a row, "
                    "the run stops at optim.max_bad_steps = %d", self.stage, step, what, self.in_a_row,
                    self.max_bad_steps)
        if self.in_a_row >= self.max_bad_steps:
            raise TooManyBadSteps(
                f"{self.stage}: {self.in_a_row} non-finite steps in a row (the last at step {step}: {what}); "
                f"stopping (optim.max_bad_steps = {self.max_bad_steps}). The newest checkpoint holds the "
                "last "
                "good weights; lower the learning rate, check the data or the reward function, and resume.")

    def good(self) -> None:
        self.in_a_row = 0

    def state(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


def skip_update(opt: torch.optim.Optimizer) -> None:
    """Drop a non-finite step: no `opt.step()` (AdamW's moments and step count stay), no scheduler step,
    gradients freed."""
    opt.zero_grad(set_to_none=True)
