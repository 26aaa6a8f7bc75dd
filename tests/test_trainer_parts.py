"""The trainer's parts that decide *when* (checkpoints, validation) and the run's one shared engine,
checked without a model: the loops delegate these decisions, so a wrong rule here is a wrong run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from rlcs_fast import dist
from rlcs_fast.checkpointer import Checkpointer
from rlcs_fast.faults import Preempted
from rlcs_fast.rollout.build import SharedEngine
from rlcs_fast.validation import Validator


def _ctx(every: int, preempted: bool = False):
    cfg = SimpleNamespace(checkpoint=SimpleNamespace(every=every, keep=2))
    preemption = SimpleNamespace(requested=lambda: preempted)
    return SimpleNamespace(cfg=cfg, dir=Path("unused"), stage="sft", preemption=preemption)


@pytest.mark.parametrize("every, steps, due",
                         [(2, 5, [2, 4, 5]), (0, 3, [3]), (3, 6, [3, 6]), (1, 2, [1, 2])])
def test_checkpoint_and_validation_are_due_every_n_steps_and_at_the_last(every, steps, due):
    checkpointer = Checkpointer(_ctx(every), opt=None, sched=None, skips=None, guard=None)
    validator = Validator(ctx=None, table=None, every=every, temperature=1.0, n=1)
    for step in range(1, steps + 1):
        last = step == steps
        assert checkpointer.should_save(step, last) == (step in due), step
        assert validator.should_validate(step, last) == (step in due), step


def test_checkpointer_save_writes_nothing_when_not_due():
    checkpointer = Checkpointer(_ctx(4), opt=None, sched=None, skips=None, guard=None)  # a write would fail
    assert checkpointer.save(3) is None


@pytest.mark.parametrize("step", [3, 4])  # checkpoint.every = 4: step 3 is not due, step 4 is
def test_a_preempted_step_is_saved_once_then_the_stage_stops(step):
    checkpointer = Checkpointer(_ctx(4, preempted=True), opt=None, sched=None, skips=None, guard=None)
    written = []
    checkpointer._write = lambda s: written.append(s) or Path(f"step_{s}")
    with pytest.raises(Preempted, match=f"after step {step}"):
        checkpointer.save(step)
    assert written == [step]  # due or not, exactly one checkpoint of the step


class _Engine:
    def __init__(self):
        self.closed = 0

    def shutdown(self):
        self.closed += 1


def test_shared_engine_is_built_once_for_all_stages_and_shut_down_once():
    built = []

    def build(model_path, tokenizer):
        built.append(model_path)
        return _Engine()

    shared = SharedEngine(build)
    first = shared.get("sft-init", tokenizer=None)
    assert shared.get("grpo-init", tokenizer=None) is first  # the GRPO stage reuses SFT's engine
    assert built == ["sft-init"]
    shared.close()
    shared.close()
    assert first.closed == 1


def test_shared_engine_takes_a_given_engine_and_never_builds():
    given = _Engine()
    shared = SharedEngine(engine=given)
    assert shared.get("any", tokenizer=None) is given
    with pytest.raises(ValueError):
        SharedEngine()
    with pytest.raises(ValueError):
        SharedEngine(lambda path, tok: given, engine=given)


def test_reduce_sums_returns_each_value_under_its_name():
    values = {"loss": 1.5, "tokens": 7, "clip_frac": 0.25}
    assert dist.reduce_sums(values) == {"loss": 1.5, "tokens": 7.0, "clip_frac": 0.25}
    assert list(dist.reduce_sums(values)) == list(values)
    assert dist.reduce_sums({"length": 3.0}, "max") == {"length": 3.0}
