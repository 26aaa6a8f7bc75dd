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
from pathlib import Path

import torch

from . import dist
from .data import Encoder, SkipCounter, encode_many, global_indices, rank_share
from .kernels import fused_linear_logprob
from .packing import pack
from .stage import StageContext, validate
from .trainer_utils import build_optimizer, clip_grad_norm, dummy_image_sample, peak_memory_gb, plan_step

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
    counts = torch.tensor([sum(int(s.target_mask.sum()) for s in samples),
                           sum(s.input_ids.numel() for s in samples)], dtype=torch.float64)
    dist.all_reduce(counts)
    loss_tokens, all_tokens = counts.tolist()
    nll = torch.zeros((), dtype=torch.float64)
    for i, mb in enumerate(micro):
        batch = pack(mb, ctx.model_config.vision_config).to(ctx.device)
        weight = 1.0 if i < n_real else 0.0
        # FSDP2 averages gradients over ranks; the loss is a global sum, so undo the average
        scale = weight * ctx.world / max(loss_tokens, 1.0)
        targets = batch.targets[batch.loss_mask]
        with ctx.autocast():
            loss = ctx.policy(batch, sft_loss_fn(targets, scale, ctx.kernels_impl))
        loss.backward()
        if weight:
            nll += loss.detach().double().cpu() * loss_tokens / ctx.world
    dist.all_reduce(nll)
    return {"nll_sum": float(nll), "loss_tokens": loss_tokens, "tokens": all_tokens}


@torch.no_grad()
def val_loss(ctx: StageContext, encoder: Encoder, table, max_tokens: int, skips: SkipCounter) -> float:
    ctx.policy.eval()
    idx = rank_share(list(range(len(table))), ctx.rank, ctx.world)
    samples = encode_many(lambda row, i: encoder.sft(row), ((table[i], i) for i in idx), skips, "data.val")
    filler = dummy_image_sample(ctx.model_config)
    micro, n_real = plan_step(samples, [s.input_ids.numel() for s in samples], max_tokens, filler)
    total = torch.zeros(2, dtype=torch.float64)
    for i, mb in enumerate(micro):
        batch = pack(mb, ctx.model_config.vision_config).to(ctx.device)
        targets = batch.targets[batch.loss_mask]
        with ctx.autocast():
            nll = ctx.policy(batch, sft_loss_fn(targets, 1.0, ctx.kernels_impl))
        if i < n_real:
            total += torch.tensor([float(nll), float(targets.numel())], dtype=torch.float64)
    dist.all_reduce(total)
    ctx.policy.train()
    return float(total[0] / max(total[1], 1.0))


def run_sft(ctx: StageContext) -> None:
    cfg = ctx.cfg
    scfg = cfg.sft
    train_table, val_table = ctx.load_tables(kind="sft")
    encoder = ctx.encoder(max_length=cfg.data.max_length)
    total_steps = scfg.steps or max(1, math.ceil(scfg.epochs * len(train_table) / scfg.global_batch_size))
    opt, sched = build_optimizer(ctx.policy, lr=ctx.lr, weight_decay=cfg.optim.weight_decay,
                                 betas=cfg.optim.betas, eps=cfg.optim.eps, warmup_ratio=cfg.optim.warmup_ratio,
                                 schedule=cfg.optim.schedule, min_lr_ratio=cfg.optim.min_lr_ratio,
                                 total_steps=total_steps)
    skips = SkipCounter()
    guard = ctx.bad_step_guard()
    start = ctx.resume(opt, sched, skips, guard)
    log.info("sft: %d steps of %d sequences (%d train rows, %d val rows), lr %.3g, from step %d",
             total_steps, scfg.global_batch_size, len(train_table), len(val_table), ctx.lr, start)
    ctx.metrics.start_bar("sft", total_steps, start)
    for step in range(start + 1, total_steps + 1):
        t0 = time.perf_counter()
        idx = global_indices(len(train_table), (step - 1) * scfg.global_batch_size, scfg.global_batch_size,
                             cfg.run.seed)
        mine = rank_share(idx, ctx.rank, ctx.world)
        samples = encode_many(lambda row, i: encoder.sft(row), ((train_table[i], i) for i in mine), skips,
                              "data.train")
        out = run_step(ctx, samples, scfg.max_tokens_per_microbatch)
        grad_norm = clip_grad_norm(ctx.policy, cfg.optim.grad_clip)
        lr = sched.get_last_lr()[0]
        if guard.check(step, "loss or gradient norm", out["nll_sum"], grad_norm):
            opt.step()
            sched.step()
            guard.good()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        row = {"train/loss": out["nll_sum"] / max(out["loss_tokens"], 1.0), "train/grad_norm": grad_norm,
               "train/lr": lr, "perf/tokens_per_s": out["tokens"] / dt, "time/train": dt,
               "mem/peak_gb": peak_memory_gb(ctx.device), "data/loss_tokens": out["loss_tokens"],
               "train/skipped_steps": guard.skipped, **skips.metrics()}
        if step % scfg.log_every == 0 or step == total_steps:
            ctx.metrics.log("sft", step, row)
        ctx.metrics.update_bar({"loss": row["train/loss"], "tok/s": row["perf/tokens_per_s"]})
        last = step == total_steps
        if (scfg.val_every and step % scfg.val_every == 0) or last:
            if last:
                ctx.metrics.close_bar()
            vrow = {"val/loss": val_loss(ctx, encoder, val_table, scfg.max_tokens_per_microbatch, skips)}
            if scfg.val_generate:  # the GRPO stage's validation settings, so the two stages compare
                vrow.update(validate(ctx, val_table, temperature=cfg.grpo.val_temperature, n=cfg.grpo.val_n))
            ctx.metrics.log("sft", step, vrow)
            log.info("sft step %d: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in vrow.items()))
        ctx.end_step(step, opt, sched, skips, guard,
                     save=bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or last)
    ctx.metrics.close_bar()
    ctx.finish()


def sft_export_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "sft" / "hf"
