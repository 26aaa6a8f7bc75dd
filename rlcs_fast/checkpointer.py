"""A stage's checkpoints: resume from the newest complete, intact one, save (and decide when: every
``checkpoint.every`` steps, at the last, and after the step a preemption signal arrived in), export the
final model. The file format, manifests and atomic writes are :mod:`rlcs_fast.checkpoint`'s.

On disk, per stage: ``<run.dir>/<stage>/checkpoints/step_N`` (resumable), ``<run.dir>/<stage>/hf`` (the
exported Hugging Face directory the next stage starts from) and ``<run.dir>/<stage>/DONE``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from . import checkpoint, dist
from .data import SkipCounter
from .faults import BadStepGuard, Preempted
from .model import export_hf

log = logging.getLogger("rlcs_fast")


class Checkpointer:
    """Everything a resumed stage needs back: the policy, the optimizer, the schedule, the skipped rows
    (summed on rank 0 when the world size changed) and the count of skipped non-finite steps."""

    def __init__(self, ctx, opt, sched, skips: SkipCounter, guard: BadStepGuard):
        self.ctx, self.opt, self.sched, self.skips, self.guard = ctx, opt, sched, skips, guard
        self.every, self.keep = ctx.cfg.checkpoint.every, ctx.cfg.checkpoint.keep
        self.root = ctx.dir / "checkpoints"

    def resume(self) -> int:
        """The step to continue after: that of the newest complete checkpoint when `run.resume` says so,
        else 0. Metrics logged after it (by the run that stopped) are dropped."""
        ctx = self.ctx
        checkpoint.check_shared(self.root)
        checkpoint.clean_partial(self.root)
        resume = ctx.cfg.run.resume
        if resume == "never":
            path = None
        elif resume == "auto":
            path = checkpoint.latest_intact_checkpoint(self.root)
        else:
            path = Path(resume)
            checkpoint.check_intact(path)
        if path is None:
            ctx.metrics.truncate_after(ctx.stage, 0)
            return 0
        extra = checkpoint.load(path, ctx.policy, self.opt)
        self.sched.load_state_dict(extra["scheduler"])
        if checkpoint.saved_world_size(path) == ctx.world:
            self.skips.load_state(extra.get("skips", {}))
        elif ctx.rank == 0:  # another world size: all saved ranks' skipped rows on rank 0, the sum is kept
            for saved in checkpoint.saved_extras(path):
                self.skips.load_state(saved.get("skips", {}))
        self.guard.load_state(extra.get("stage_state", {}).get("bad_steps", {}))
        step = int(extra["step"])
        ctx.metrics.truncate_after(ctx.stage, step)
        log.info("%s: resumed from %s (step %d)", ctx.stage, path, step)
        return step

    def should_save(self, step: int, last_step: bool) -> bool:
        return last_step or bool(self.every and step % self.every == 0)

    def save(self, step: int, *, last_step: bool = False) -> Path | None:
        """After `step`'s update and metrics, before its validation: write a checkpoint when one is due;
        returns its path, or None. Then the preemption check (collective, every step): preempted, the
        step's checkpoint is written (once) and `Preempted` raised on every rank."""
        path = self._write(step) if self.should_save(step, last_step) else None
        preemption = self.ctx.preemption
        if preemption is not None and preemption.requested():
            path = path or self._write(step)
            log.warning("%s: preemption signal received, stopping after step %d with checkpoint %s",
                        self.ctx.stage, step, path)
            raise Preempted(self.ctx.stage, step, path)
        return path

    def _write(self, step: int) -> Path:
        extra = {"step": step, "scheduler": self.sched.state_dict(), "skips": self.skips.state(),
                 "stage_state": {"bad_steps": self.guard.state()}}
        return checkpoint.save(self.root, step, self.ctx.policy, self.opt, extra, keep=self.keep)

    def export(self) -> Path:
        """Export the stage's model as a Hugging Face directory and mark the stage done."""
        ctx = self.ctx
        out = export_hf(ctx.policy, ctx.processor, ctx.dir / "hf")
        if ctx.rank == 0:
            (ctx.dir / "DONE").write_text(json.dumps({"export": str(out)}))
        dist.barrier()
        log.info("%s: done, model exported to %s", ctx.stage, out)
        return out
