"""SFT's data preparation overlaps compute: step k+1's rows are encoded on a worker while step k trains,
with the rows, order and skip counts of the plain loop (the checkpoint of step k holds step k's skips)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from rlcs_fast.data import SkipCounter, SkipSample
from rlcs_fast.prefetch import prefetched, prefetched_steps
from rlcs_fast.stage import StageContext

ENCODE_S, COMPUTE_S, ROWS, STEPS = 0.05, 0.2, 4, 3


def _ctx(rank: int = 0, world: int = 1):
    return SimpleNamespace(cfg=SimpleNamespace(run=SimpleNamespace(seed=0)), rank=rank, world=world)


def _encode(row, i):
    time.sleep(ENCODE_S)  # decode + resize + process of one image row
    if row % 7 == 3:
        raise SkipSample("broken_image", f"row {row}")
    return row


def _load(ctx, table):
    return lambda step, recorder: StageContext.step_batch(ctx, table, step, ROWS, _encode, recorder)


def test_sft_steps_overlap_encoding_with_compute():
    ctx, table = _ctx(), list(range(100))
    plain_skips, plain = SkipCounter(), []
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        plain.append(StageContext.step_batch(ctx, table, step, ROWS, _encode, plain_skips))
        time.sleep(COMPUTE_S)
    sequential = time.perf_counter() - t0
    assert sequential >= STEPS * (ROWS * ENCODE_S + COMPUTE_S)

    skips, got = SkipCounter(), []
    t0 = time.perf_counter()
    for step, samples in prefetched_steps(_load(ctx, table), range(1, STEPS + 1), skips):
        got.append((step, samples))
        time.sleep(COMPUTE_S)
    overlapped = time.perf_counter() - t0
    # the first step's encoding is exposed, the others hide behind compute
    assert overlapped < STEPS * (ROWS * ENCODE_S + COMPUTE_S) * 0.85, (overlapped, sequential)
    assert got == list(zip(range(1, STEPS + 1), plain))  # same rows, same order
    assert skips.state() == plain_skips.state()


def test_skips_are_counted_when_their_step_is_consumed():
    ctx, table = _ctx(), [3] * 50  # every row is skipped
    skips = SkipCounter()
    batches = prefetched_steps(_load(ctx, table), range(1, 4), skips)
    step, samples = next(batches)
    time.sleep(2 * ROWS * ENCODE_S)  # step 2 is encoded by now, but not consumed
    assert step == 1 and samples == []
    # a checkpoint written now (after step 1) holds step 1's skipped rows only
    assert skips.total == ROWS
    next(batches)
    assert skips.total == 2 * ROWS
    batches.close()


def test_prefetched_keeps_order_and_raises_in_the_caller():
    assert list(prefetched(lambda x: x * x, range(6))) == [0, 1, 4, 9, 16, 25]

    def boom(x):
        if x == 2:
            raise ValueError("bad item")
        return x

    out = []
    try:
        for x in prefetched(boom, range(5)):
            out.append(x)
    except ValueError as e:
        assert "bad item" in str(e)
    assert out == [0, 1]
