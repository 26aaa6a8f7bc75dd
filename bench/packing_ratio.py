"""Packed vs padded micro-batching: how many token positions one epoch computes.

Padded (the baseline a fixed micro-batch size gives): each rank's share of a step is cut, in data order,
into micro-batches of ``b`` sequences, and each micro-batch is padded to its longest sequence, so it costs
``b × max length`` positions. Also reported: the same with the step's sequences sorted by length first (a
length-grouped sampler, padding's best case). Packed (this trainer): the micro-batches that
``rlcs_fast.schedule.plan_step`` plans under ``max_tokens_per_microbatch``, which cost exactly their
tokens, plus the 3-token filler micro-batches ``plan_step`` adds so that every rank runs as many as the
busiest.
``b`` is either fixed (the recipe's per-device micro-batch size) or "matched": the smallest ``b`` that gives
no more micro-batches than the packed plan, i.e. as many forward passes as packing.

Positions of the language model only: the vision tower sees the same patches either way. Attention's
quadratic term is not counted (packing only lowers it further: no cross-sequence pairs).

Sets:
- ``synthetic_sft``: the shipped task (``data.train = "synthetic"``) encoded with the tiny processor
  exactly as the SFT stage encodes it, with ``configs/tiny.toml``'s batch settings.
- ``public_sft_simulated`` / ``public_grpo_simulated``: lengths drawn from a documented model of
  Multimodal-Cold-Start / Multimodal-RL-Data (no token statistics of these sets are published: the dataset
  cards give row counts and byte sizes only, the paper and repository give none), with the recipe's
  image-token bounds and caps read from ``configs/sft_7b.toml`` / ``configs/grpo_7b.toml``.

``python bench/packing_ratio.py [--out bench/results/packing_ratio_cpu.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlcs_fast.config import load_config
from rlcs_fast.data import global_indices, smart_resize
from rlcs_fast.schedule import plan_step, rank_share

REPO = Path(__file__).resolve().parent.parent

# The model of the public sets' lengths (assumptions, written into the JSON). Log-normal draws are given
# by their median and the sigma of log(x).
PUBLIC_MODEL = {
    "image_width_px": {"median": 800, "sigma": 0.5},  # native width before smart_resize
    "image_aspect_w_over_h": {"median": 1.33, "sigma": 0.3},
    "question_tokens": {"median": 80, "sigma": 0.6},  # problem text (math word problems, choices)
    "response_tokens": {"median": 450, "sigma": 0.7},  # chain of thought + boxed answer
    "chat_overhead_tokens": 60,  # system prompt, role markers, vision start/end tokens
    "images_per_sample": 1,
}


@dataclass(frozen=True)
class Setting:
    global_batch_size: int  # sequences per step (SFT) or per update mini-batch (GRPO), all ranks
    world: int
    max_tokens: int  # max_tokens_per_microbatch
    fixed_batch_sizes: tuple[int, ...]  # padded baselines with a fixed per-rank micro-batch size


def padded_positions(lengths: list[int], batch_size: int) -> int:
    """Positions of consecutive micro-batches of ``batch_size`` sequences, each padded to its longest."""
    return sum(len(lengths[i:i + batch_size]) * max(lengths[i:i + batch_size])
               for i in range(0, len(lengths), batch_size))


def packed_step(rank_lengths: list[list[int]], max_tokens: int) -> tuple[int, int]:
    """(positions, micro-batches per rank) of one step as the trainer plans it on each rank."""
    plans = [plan_step(lengths, lengths, max_tokens, filler=None) for lengths in rank_lengths]
    count = max(len(micro) for micro, _ in plans)
    positions = 0
    for micro, _ in plans:
        positions += sum(sum(mb) for mb in micro)
        # plan_step evens out the count over ranks with 3-token filler micro-batches (weight 0), computed
        # all the same. Without a process group each plan is a rank's own.
        positions += (count - len(micro)) * 3
    return positions, count


def compare(lengths: list[int], setting: Setting, seed: int = 0) -> dict:
    """One epoch over ``lengths`` in the trainer's data order: packed vs padded positions."""
    n = len(lengths)
    steps = math.ceil(n / setting.global_batch_size)
    totals = {"packed": 0, "padded_matched": 0, "padded_matched_sorted": 0}
    totals.update({f"padded_b{b}": 0 for b in setting.fixed_batch_sizes})
    micro_packed = micro_matched = 0
    for step in range(steps):
        idx = global_indices(n, step * setting.global_batch_size, setting.global_batch_size, seed)
        ranks = [[lengths[i] for i in rank_share(idx, r, setting.world)] for r in range(setting.world)]
        ranks = [r for r in ranks if r]
        positions, count = packed_step(ranks, setting.max_tokens)
        totals["packed"] += positions
        micro_packed += count * len(ranks)
        for r in ranks:
            b = math.ceil(len(r) / count)  # as many forward passes as packing needs
            totals["padded_matched"] += padded_positions(r, b)
            totals["padded_matched_sorted"] += padded_positions(sorted(r), b)
            micro_matched += math.ceil(len(r) / b)
            for fixed in setting.fixed_batch_sizes:
                totals[f"padded_b{fixed}"] += padded_positions(r, fixed)
    tokens = sum(lengths)
    out = {
        "sequences": n, "tokens": tokens, "steps": steps,
        "length": {"min": min(lengths), "mean": tokens / n, "max": max(lengths),
                   "p50": float(np.percentile(lengths, 50)), "p90": float(np.percentile(lengths, 90))},
        "setting": {"global_batch_size": setting.global_batch_size, "world": setting.world,
                    "max_tokens_per_microbatch": setting.max_tokens},
        "micro_batches": {"packed": micro_packed, "padded_matched": micro_matched},
        "positions": totals,
        "packed_saving_vs": {k: 1.0 - totals["packed"] / v for k, v in totals.items() if k != "packed"},
    }
    return out


def synthetic_lengths(n: int, cfg_path: Path = REPO / "configs" / "tiny.toml") -> tuple[list[int], Setting]:
    """Token lengths of the first ``n`` synthetic SFT rows as the SFT stage encodes them, and the tiny
    config's batch settings (one rank)."""
    from transformers import AutoConfig

    from rlcs_fast.data import Columns, Encoder, load_table
    from rlcs_fast.model import load_processor
    from rlcs_fast.tiny import tiny_path

    cfg = load_config(str(cfg_path), {"data.synthetic_train_size": n})
    d = cfg.data
    path = str(tiny_path(seed=cfg.model.tiny_seed))
    processor = load_processor(path, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    encoder = Encoder(processor, AutoConfig.from_pretrained(path), Columns(d.image_column, d.problem_column,
                      d.answer_column), template=d.prompt_template, system_prompt=d.system_prompt,
                      min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_length=d.max_length)
    table = load_table(d.train, d.train_split, kind="sft", seed=cfg.run.seed, synthetic_size=n)
    lengths = [encoder.sft(table[i]).input_ids.numel() for i in range(len(table))]
    return lengths, Setting(cfg.sft.global_batch_size, 1, cfg.sft.max_tokens_per_microbatch, (4, 8))


def _lognormal(rng: np.random.Generator, spec: dict, size: int) -> np.ndarray:
    return spec["median"] * np.exp(spec["sigma"] * rng.standard_normal(size))


def simulated_public_lengths(n: int, *, min_pixels: int, max_pixels: int, response_cap: int,
                             max_length: int, group_size: int = 1, seed: int = 0) -> tuple[list[int], int]:
    """(lengths, sequences dropped as too long) of ``n`` simulated sequences under ``PUBLIC_MODEL``: image
    tokens through the real smart_resize bounds, responses capped at ``response_cap``, sequences longer
    than ``max_length`` dropped as the trainer skips them. ``group_size`` consecutive sequences share one
    prompt (GRPO's responses to one prompt), each with its own response."""
    rng = np.random.default_rng(seed)
    m = PUBLIC_MODEL
    prompts = math.ceil(n / group_size)
    width = _lognormal(rng, m["image_width_px"], prompts)
    height = width / _lognormal(rng, m["image_aspect_w_over_h"], prompts)
    question = np.rint(_lognormal(rng, m["question_tokens"], prompts)).astype(int)
    response = np.minimum(np.rint(_lognormal(rng, m["response_tokens"], n)).astype(int), response_cap)
    lengths = []
    for j, r in enumerate(response):
        p = j // group_size
        rh, rw = smart_resize(max(int(height[p]), 28), max(int(width[p]), 28), min_pixels, max_pixels)
        lengths.append(m["chat_overhead_tokens"] + rh * rw // (28 * 28) + int(question[p]) + int(r))
    kept = [x for x in lengths if x <= max_length]
    return kept, n - len(kept)


def run(synthetic_rows: int = 512, public_rows: int = 8192, seed: int = 0) -> dict:
    result: dict = {
        "device": "cpu", "machine": platform.machine(), "generated_by": "bench/packing_ratio.py",
        "metric": ("language-model token positions computed in one epoch: sum over micro-batches of their "
                   "tokens, padding included; vision patches excluded (equal in both)"),
        "baselines": {
            "padded_bN": "fixed N sequences per rank micro-batch, data order, padded to the longest",
            "padded_matched": "as many micro-batches as the packed plan, data order, padded to the longest",
            "padded_matched_sorted": ("as padded_matched with each rank's step sorted by length "
                                      "(length-grouped)"),
        },
        "sets": {},
    }
    lengths, setting = synthetic_lengths(synthetic_rows)
    result["sets"]["synthetic_sft"] = {"source": "configs/tiny.toml, data.train = synthetic, tiny processor",
                                       **compare(lengths, setting, seed)}

    sft = load_config(str(REPO / "configs" / "sft_7b.toml"), {})
    grpo = load_config(str(REPO / "configs" / "grpo_7b.toml"), {})
    assumptions = {
        "statistics": ("no token-length statistics of WaltonFuture/Multimodal-Cold-Start or "
                       "Multimodal-RL-Data are published (dataset cards: rows and bytes only; paper and "
                       "RL-with-Cold-Start repository: none); lengths are simulated from the model below"),
        "model": PUBLIC_MODEL,
        "seed": seed,
    }
    lengths, dropped = simulated_public_lengths(
        public_rows, min_pixels=sft.data.min_pixels, max_pixels=sft.data.max_pixels,
        response_cap=sft.grpo.max_response_length, max_length=sft.data.max_length, seed=seed)
    # 4 ranks: the recipe's SFT ran on 4 GPUs (SFT/qwen2.5vl_sft.sh NPROC_PER_NODE=4)
    sft_setting = Setting(sft.sft.global_batch_size, 4, sft.sft.max_tokens_per_microbatch, (1, 4, 8))
    result["sets"]["public_sft_simulated"] = {
        "source": "configs/sft_7b.toml (pixels, max_length, batch, budget), 4 ranks",
        "assumptions": assumptions, "dropped_too_long": dropped, **compare(lengths, sft_setting, seed)}
    # GRPO update: mini_batch_size prompts x n responses per update, 8 ranks (EasyR1 config.yaml
    # n_gpus_per_node 8), padded baseline b = 4 (micro_batch_size_per_device_for_update)
    g = grpo.grpo
    lengths, dropped = simulated_public_lengths(
        public_rows, min_pixels=grpo.data.min_pixels, max_pixels=grpo.data.max_pixels,
        response_cap=g.max_response_length, max_length=g.max_prompt_length + g.max_response_length,
        group_size=g.n, seed=seed + 1)
    result["sets"]["public_grpo_simulated"] = {
        "source": "configs/grpo_7b.toml (pixels, caps, mini-batch x n, budget), 8 ranks",
        "assumptions": assumptions, "dropped_too_long": dropped,
        **compare(lengths, Setting(g.mini_batch_size * g.n, 8, g.max_tokens_per_microbatch, (4, 8)), seed)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "packing_ratio_cpu.json"))
    parser.add_argument("--synthetic-rows", type=int, default=512)
    parser.add_argument("--public-rows", type=int, default=8192)
    args = parser.parse_args()
    result = run(args.synthetic_rows, args.public_rows)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["sets"].items():
        print(f"{name}: " + ", ".join(f"saving vs {k} {v:.1%}" for k, v in s["packed_saving_vs"].items()))


if __name__ == "__main__":
    main()
