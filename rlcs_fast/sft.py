"""Stage "sft" (cold start): supervised fine-tuning on chain-of-thought answers, assistant tokens only.

One step: this rank's share of the global batch → micro-batches by token budget → packed forward to
hidden states → fused log-prob head → NLL summed and divided by the number of loss tokens of the whole
global batch (so the gradient does not depend on how tokens were split over micro-batches or ranks) →
clip → AdamW → schedule.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from . import dist
from .checkpointer import Checkpointer
from .data import Encoder, SkipCounter, encode_many, read_row
from .kernels import fused_linear_logprob
from .packing import pack
from .prefetch import prefetched, prefetched_steps
from .schedule import plan_step, rank_share
from .stage import StageContext
from .trainer_utils import clip_grad_norm, dummy_image_sample, peak_memory_gb
from .validation import Validator

log = logging.getLogger("rlcs_fast")


def sft_loss_fn(targets: torch.Tensor, scale: float, impl: str):
    """Head function: summed NLL of `targets` [N] times `scale` (1 / global loss tokens)."""

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logprobs = fused_linear_logprob(hidden, weight, targets, impl=impl)
        return -logprobs.sum() * scale

    return head


def run_step(ctx: StageContext, samples: list, max_tokens: int) -> dict[str, float]:
    """Forward/backward over this rank's samples; returns the global NLL sum and token counts."""
    filler = dummy_image_sample(ctx.model_config)
    micro, n_real = plan_step(samples, [s.input_ids.numel() for s in samples], max_tokens, filler)
    counts = dist.reduce_sums({"loss_tokens": sum(int(s.target_mask.sum()) for s in samples),  # host
                               "tokens": sum(s.input_ids.numel() for s in samples)})
    loss_tokens = counts["loss_tokens"]
    nll = torch.zeros((), dtype=torch.float64, device=ctx.device)  # read once, after the loop
    packed = prefetched(lambda mb: pack(mb, ctx.model_config.vision_config).pin_memory(), micro)
    for i, host in enumerate(packed):
        batch = host.to(ctx.device, non_blocking=True)
        weight = 1.0 if i < n_real else 0.0
        # FSDP2 averages gradients over ranks; the loss is a global sum, so undo the average
        scale = weight * ctx.world / max(loss_tokens, 1.0)
        targets = batch.targets.index_select(0, batch.loss_index)
        with ctx.autocast():
            loss = ctx.policy(batch, sft_loss_fn(targets, scale, ctx.kernels_impl))
        loss.backward()
        if weight:
            nll += loss.detach().double() * (loss_tokens / ctx.world)
    return {"nll_sum": dist.reduce_sums({"nll": float(nll.cpu())})["nll"], **counts}


@torch.no_grad()
def val_loss(ctx: StageContext, encoder: Encoder, table, max_tokens: int, skips: SkipCounter) -> float:
    ctx.policy.eval()
    idx = rank_share(list(range(len(table))), ctx.rank, ctx.world)
    samples = encode_many(lambda row, i: encoder.sft(row), ((read_row(table, i), i) for i in idx), skips,
                          "data.val")
    filler = dummy_image_sample(ctx.model_config)
    micro, n_real = plan_step(samples, [s.input_ids.numel() for s in samples], max_tokens, filler)
    nll_sum, tokens = 0.0, 0
    for i, mb in enumerate(micro):
        batch = pack(mb, ctx.model_config.vision_config).to(ctx.device)
        targets = batch.targets[batch.loss_mask]
        with ctx.autocast():
            nll = ctx.policy(batch, sft_loss_fn(targets, 1.0, ctx.kernels_impl))
        if i < n_real:
            nll_sum, tokens = nll_sum + float(nll), tokens + targets.numel()
    total = dist.reduce_sums({"nll": nll_sum, "tokens": tokens})
    ctx.policy.train()
    return total["nll"] / max(total["tokens"], 1.0)


def run_sft(ctx: StageContext) -> None:
    cfg, sft = ctx.cfg, ctx.cfg.sft
    train_table, val_table = ctx.load_tables(kind="sft")
    encoder = ctx.encoder(max_length=cfg.data.max_length)
    total_steps = sft.steps or max(1, math.ceil(sft.epochs * len(train_table) / sft.global_batch_size))
    opt, sched = ctx.optimizer(total_steps)
    skips = SkipCounter()
    guard = ctx.bad_step_guard()
    checkpointer = Checkpointer(ctx, opt, sched, skips, guard)
    # generation uses the GRPO stage's validation settings, so the two stages' val rows compare
    validator = Validator(ctx, val_table, every=sft.val_every, temperature=cfg.grpo.val_temperature,
                          n=cfg.grpo.val_n, generate=sft.val_generate,
                          loss=lambda: val_loss(ctx, encoder, val_table,
                                                sft.max_tokens_per_microbatch, skips))
    start = checkpointer.resume()
    log.info("sft: %d steps of %d sequences (%d train rows, %d val rows), lr %.3g, from step %d",
             total_steps, sft.global_batch_size, len(train_table), len(val_table), ctx.lr, start)
    ctx.metrics.start_bar("sft", total_steps, start)
    # step k+1's rows are decoded, resized and processed on a worker while step k trains
    def load(step: int, recorder) -> list:
        return ctx.step_batch(train_table, step, sft.global_batch_size, lambda row, i: encoder.sft(row),
                              recorder)

    batches = prefetched_steps(load, range(start + 1, total_steps + 1), skips)
    for step, samples in batches:
        last = step == total_steps
        t0 = time.perf_counter()
        out = run_step(ctx, samples, sft.max_tokens_per_microbatch)
        grad_norm = clip_grad_norm(ctx.policy, cfg.optim.grad_clip)
        lr = sched.get_last_lr()[0]
        if guard.check(step, "loss or gradient norm", out["nll_sum"], grad_norm):  # agreed by all ranks
            opt.step()
            sched.step()
            guard.good()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"train/loss": out["nll_sum"] / max(out["loss_tokens"], 1.0), "train/grad_norm": grad_norm,
               "train/lr": lr, "perf/tokens_per_s": out["tokens"] / dt, "time/train": dt,
               "mem/peak_gb": peak_memory_gb(ctx.device), "data/loss_tokens": out["loss_tokens"],
               "train/skipped_steps": guard.skipped, **skips.metrics()}
        if step % sft.log_every == 0 or last:
            ctx.metrics.log("sft", step, row)
        ctx.metrics.update_bar({"loss": row["train/loss"], "tok/s": row["perf/tokens_per_s"]})
        # save (and export, at the end) before validating: a failure in validation never costs training
        checkpointer.save(step, last_step=last)
        if last:
            ctx.metrics.close_bar()
            checkpointer.export()
        if validator.should_validate(step, last):
            validator.run(step)
    ctx.metrics.close_bar()
    if start >= total_steps:  # resumed from the last step's checkpoint: only the export was missing
        checkpointer.export()
    ctx.close()
