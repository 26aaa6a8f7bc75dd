"""Packing computes fewer token positions than padded micro-batching, planned as the trainer plans it.

The numbers come from ``bench/packing_ratio.py`` (which also writes ``bench/results/packing_ratio_cpu.json``),
so the test and the published result count the same way: packed = the micro-batches of
``rlcs_fast.schedule.plan_step``; padded = the same sequences cut into micro-batches of a fixed size,
each padded to its longest. The comparison that matters is "matched": as many micro-batches (forward
passes) as packing uses.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from rlcs_fast.config import load_config

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("packing_ratio", REPO / "bench" / "packing_ratio.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["packing_ratio"] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("packing_ratio", None)


def test_padded_positions_pad_each_micro_batch_to_its_longest(bench):
    lengths = [3, 5, 2, 7, 1]
    assert bench.padded_positions(lengths, 2) == 2 * 5 + 2 * 7 + 1 * 1
    assert bench.padded_positions(lengths, 1) == sum(lengths)
    assert bench.padded_positions(lengths, 5) == 5 * 7


def test_packed_step_counts_tokens_and_the_fillers_that_even_out_ranks(bench):
    # rank 0 needs two micro-batches under a budget of 10, rank 1 one: rank 1 pads with a 3-token filler
    positions, count = bench.packed_step([[6, 6, 3], [4, 2]], max_tokens=10)
    assert count == 2
    assert positions == (6 + 6 + 3) + (4 + 2) + 3


def test_tiny_sft_epoch_packs_without_padding(bench):
    lengths, setting = bench.synthetic_lengths(64)
    out = bench.compare(lengths, setting)
    assert out["steps"] == 2 and setting.world == 1
    # one rank: the plan computes exactly the sequences' tokens, no padding and no repeats
    assert out["positions"]["packed"] == sum(lengths)
    for name, padded in out["positions"].items():
        if name != "packed":
            assert out["positions"]["packed"] < padded, (name, out["positions"])
    assert out["packed_saving_vs"]["padded_matched"] == pytest.approx(
        1 - sum(lengths) / out["positions"]["padded_matched"])


@pytest.mark.slow
def test_tiny_sft_epoch_saves_at_least_30_percent(bench):
    # one epoch of the default run's first 512 rows (16 steps of 32): the problems' long-tailed context
    # makes padding to the longest sequence of each micro-batch cost >= 30% more positions than packing
    lengths, setting = bench.synthetic_lengths(512)
    out = bench.compare(lengths, setting)
    assert max(lengths) / (sum(lengths) / len(lengths)) > 1.5, (min(lengths), max(lengths))
    assert out["micro_batches"]["padded_matched"] == out["micro_batches"]["packed"]
    assert out["packed_saving_vs"]["padded_matched"] >= 0.30, out["packed_saving_vs"]


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_public_like_lengths_packed_saves_at_least_30_percent(bench, stage):
    cfg = load_config(str(REPO / "configs" / f"{stage}_7b.toml"), {})
    if stage == "sft":
        setting = bench.Setting(cfg.sft.global_batch_size, 4, cfg.sft.max_tokens_per_microbatch, (4,))
        cap, max_length, group = cfg.grpo.max_response_length, cfg.data.max_length, 1
    else:
        g = cfg.grpo
        setting = bench.Setting(g.mini_batch_size * g.n, 8, g.max_tokens_per_microbatch, (4,))
        cap, max_length, group = g.max_response_length, g.max_prompt_length + g.max_response_length, g.n
    lengths, _ = bench.simulated_public_lengths(2560, min_pixels=cfg.data.min_pixels,
                                                max_pixels=cfg.data.max_pixels, response_cap=cap,
                                                max_length=max_length, group_size=group, seed=3)
    out = bench.compare(lengths, setting, seed=3)
    # as many forward passes as packing, each padded to its longest: packing computes >= 30% fewer positions
    assert out["micro_batches"]["padded_matched"] <= out["micro_batches"]["packed"]
    assert out["packed_saving_vs"]["padded_matched"] >= 0.30, out["packed_saving_vs"]
    assert out["positions"]["packed"] >= sum(lengths)
