"""What a stage's loop works with: the policy (loaded, sharded) and processor it starts from, its data
tables and encoder, the run's rollout engine (passed in) and the reward scorer, the reference policy.
Checkpoints are :mod:`rlcs_fast.checkpointer`'s, validation :mod:`rlcs_fast.validation`'s.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, stage_lr
from .data import (
    Columns,
    Encoder,
    SkipCounter,
    check_columns,
    encode_many,
    global_indices,
    lazy_images,
    load_table,
    read_row,
)
from .faults import BadStepGuard, Preemption
from .metrics import MetricsLogger
from .model import (
    Policy,
    apply_activation_checkpointing,
    apply_fsdp,
    check_cpu_offload,
    load_model,
    load_processor,
)
from .rollout.build import SharedEngine, banned_token_ids
from .rollout.engine import RolloutEngine
from .schedule import rank_share
from .trainer_utils import build_optimizer, iter_full_weights, release_cached_memory

log = logging.getLogger("rlcs_fast")


def stage_dir(run_dir: str | Path, stage: str) -> Path:
    return Path(run_dir) / stage


def stage_done(run_dir: str | Path, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / "DONE").is_file()


@dataclass
class StageContext:
    cfg: Config
    stage: str
    init_path: str  # HF directory the stage starts from
    rank: int
    world: int
    device: torch.device
    metrics: MetricsLogger
    engines: SharedEngine | None = None  # the run's rollout engine (the entry point's, or a test's)
    preemption: Preemption | None = None  # the run's signal flag, checked after every step
    processor: Any = None
    model_config: Any = None
    policy: Policy | None = None
    attention: str = ""
    _scorer: Any = None

    @classmethod
    def create(cls, cfg: Config, stage: str, init_path: str, *, rank: int, world: int, device: torch.device,
               metrics: MetricsLogger, engines: SharedEngine | None = None,
               preemption: Preemption | None = None) -> StageContext:
        ctx = cls(cfg, stage, init_path, rank, world, device, metrics, engines, preemption)
        check_cpu_offload(cfg.model.cpu_offload, device)
        ctx.processor = load_processor(init_path, min_pixels=cfg.data.min_pixels,
                                       max_pixels=cfg.data.max_pixels)
        # offloaded: fully_shard moves one layer at a time through the GPU, the whole model never is there
        model, ctx.attention = load_model(init_path, attention=cfg.model.attention,
                                          device="cpu" if cfg.model.cpu_offload else device,
                                          freeze_vision=cfg.model.freeze_vision)
        ctx.model_config = model.config
        if cfg.model.gradient_checkpointing:
            apply_activation_checkpointing(model)
        ctx.policy = Policy(model)
        if world > 1 or cfg.model.cpu_offload:
            apply_fsdp(ctx.policy, mixed_precision=ctx.mixed_precision, cpu_offload=cfg.model.cpu_offload)
        ctx.policy.train()
        log.info("%s: model %s (%.1fM parameters), attention %s, kernels %s, %d process(es) on %s",
                 stage, init_path, sum(p.numel() for p in model.parameters()) / 1e6, ctx.attention,
                 cfg.kernels.impl, world, device)
        return ctx

    # --- settings derived once --------------------------------------------------------------------
    @property
    def mixed_precision(self) -> bool:
        return self.device.type == "cuda" and self.cfg.model.dtype != "float32"

    @property
    def kernels_impl(self) -> str:
        return self.cfg.kernels.impl

    @property
    def lr(self) -> float:
        return stage_lr(self.cfg, self.stage)

    @property
    def dir(self) -> Path:
        return stage_dir(self.cfg.run.dir, self.stage)

    def autocast(self):
        if self.mixed_precision and self.world == 1:  # under FSDP2 the MixedPrecisionPolicy casts
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- data -------------------------------------------------------------------------------------
    def encoder(self, max_length: int) -> Encoder:
        data = self.cfg.data
        return Encoder(self.processor, self.model_config, self.columns, template=data.prompt_template,
                       system_prompt=data.system_prompt, min_pixels=data.min_pixels,
                       max_pixels=data.max_pixels, max_length=max_length,
                       max_images=self.cfg.rollout.max_images_per_prompt)

    @property
    def columns(self) -> Columns:
        data = self.cfg.data
        return Columns(data.image_column, data.problem_column, data.answer_column)

    def load_tables(self, kind: str):
        data = self.cfg.data
        train = load_table(data.train, data.train_split, kind=kind, seed=self.cfg.run.seed,
                           synthetic_size=data.synthetic_train_size, key="data.train")
        val = load_table(data.val, data.val_split, kind=kind, seed=self.cfg.run.seed,
                         synthetic_size=data.synthetic_val_size, key="data.val")
        if data.val_size:
            val = val.select(range(min(data.val_size, len(val))))
        for table, source in ((train, data.train), (val, data.val)):
            check_columns(table, self.columns, source=source)
        return lazy_images(train, data.image_column), lazy_images(val, data.image_column)

    def step_batch(self, table, step: int, size: int, encode, skips: SkipCounter) -> list:
        """This rank's share of step `step`'s global batch of `size` rows, encoded by `encode(row, index)`
        (rows that fail are skipped and counted in `skips`). The same rows for any world size."""
        rows = global_indices(len(table), (step - 1) * size, size, self.cfg.run.seed)
        mine = rank_share(rows, self.rank, self.world)
        return encode_many(encode, ((read_row(table, i), i) for i in mine), skips, "data.train")

    def bad_step_guard(self) -> BadStepGuard:
        """Skips non-finite steps; `optim.max_bad_steps` in a row stop the run."""
        return BadStepGuard(self.cfg.optim.max_bad_steps, self.stage)

    def optimizer(self, total_steps: int):
        """AdamW and its schedule over `total_steps` optimizer steps, at this stage's learning rate."""
        return build_optimizer(self.policy, self.cfg.optim, lr=self.lr, total_steps=total_steps)

    # --- engine and rewards -----------------------------------------------------------------------
    @property
    def engine(self) -> RolloutEngine:
        return self.engines.get(self.init_path, self.processor.tokenizer)

    @property
    def scorer(self):
        if self._scorer is None:
            from .rewards import RewardScorer

            reward = self.cfg.reward
            self._scorer = RewardScorer(fn=reward.function or None, format_weight=reward.format_weight,
                                        timeout_s=reward.timeout_s, num_workers=reward.num_workers)
        return self._scorer

    @property
    def banned_token_ids(self) -> tuple[int, ...]:
        return banned_token_ids(self.model_config)

    def sync_engine(self) -> RolloutEngine:
        """Release the trainer's cached memory, wake the engine, stream the current policy weights into it;
        returns the engine, awake and current."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        engine = self.engine
        release_cached_memory()
        engine.wake_up()
        engine.load_weights(iter_full_weights(self.policy.model, dtype))
        return engine

    def reference_policy(self) -> Policy:
        """The frozen initial policy for the KL term, sharded like the policy, held in the compute dtype
        (it has no optimizer, so no fp32 master copy) and resharded after every forward (no backward
        follows): about 4 GiB less per rank than an fp32 copy whose root stays gathered at 3B."""
        offload = self.cfg.model.cpu_offload
        model, _ = load_model(self.init_path, attention=self.cfg.model.attention,
                              device="cpu" if offload else self.device,
                              dtype=torch.bfloat16 if self.mixed_precision else torch.float32)
        model.requires_grad_(False)
        ref = Policy(model).eval()
        if self.world > 1 or offload:
            apply_fsdp(ref, mixed_precision=self.mixed_precision, cpu_offload=offload, reshard_root=True)
        return ref

    def close(self) -> None:
        """End of the stage: stop the reward workers (the engine is the run's, it lives on)."""
        if self._scorer is not None:
            self._scorer.close()
