"""What a stage needs around its loop: the model and processor it starts from, its data tables, the
rollout engine and reward scorer (built on first use), resume / save / export, and validation.

On disk, per stage: ``<run.dir>/<stage>/checkpoints/step_N`` (resumable), ``<run.dir>/<stage>/hf`` (the
exported Hugging Face directory the next stage starts from) and ``<run.dir>/<stage>/DONE``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint, dist
from .config import Config, stage_lr
from .data import (
    Columns,
    Encoder,
    SkipCounter,
    check_columns,
    encode_many,
    lazy_images,
    load_table,
    rank_share,
)
from .faults import BadStepGuard, Preempted, Preemption
from .metrics import MetricsLogger
from .model import (
    Policy,
    apply_activation_checkpointing,
    apply_fsdp,
    check_cpu_offload,
    export_hf,
    load_model,
    load_processor,
)
from .rollout import engine as rollout_engine
from .trainer_utils import iter_full_weights, release_cached_memory

log = logging.getLogger("rlcs_fast")


# One rollout engine per process for the whole run, reused by every stage: vLLM allows one sleep-mode
# instance per process, and the SFT stage's validation engine would otherwise still hold its memory
# pools (and its claim on the process) when the GRPO stage builds its own. Weights are pushed before
# every generation, so the stage that built it does not matter.
_process_engine: dict[str, Any] = {}


def close_engine() -> None:
    """End of the run: shut the process's engine down (engines without `shutdown` are just dropped)."""
    engine = _process_engine.pop("engine", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()


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
    processor: Any = None
    model_config: Any = None
    policy: Policy | None = None
    attention: str = ""
    step: int = 0
    _engine: Any = None
    _scorer: Any = None
    extra_state: dict[str, Any] = field(default_factory=dict)
    preemption: Preemption | None = None  # set by the entry point around all stages

    @classmethod
    def create(cls, cfg: Config, stage: str, init_path: str, *, rank: int, world: int, device: torch.device,
               metrics: MetricsLogger) -> StageContext:
        ctx = cls(cfg, stage, init_path, rank, world, device, metrics)
        check_cpu_offload(cfg.model.cpu_offload, device)
        ctx.processor = load_processor(init_path, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
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
        d = self.cfg.data
        return Encoder(self.processor, self.model_config, self.columns, template=d.prompt_template,
                       system_prompt=d.system_prompt, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                       max_length=max_length)

    @property
    def columns(self) -> Columns:
        d = self.cfg.data
        return Columns(d.image_column, d.problem_column, d.answer_column)

    def load_tables(self, kind: str):
        d = self.cfg.data
        train = load_table(d.train, d.train_split, kind=kind, seed=self.cfg.run.seed,
                           synthetic_size=d.synthetic_train_size, key="data.train")
        val = load_table(d.val, d.val_split, kind=kind, seed=self.cfg.run.seed,
                         synthetic_size=d.synthetic_val_size, key="data.val")
        if d.val_size:
            val = val.select(range(min(d.val_size, len(val))))
        for table, src in ((train, d.train), (val, d.val)):
            check_columns(table, self.columns, source=src)
        return lazy_images(train, d.image_column), lazy_images(val, d.image_column)

    # --- engine and rewards -----------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None and "engine" in _process_engine:
            self._engine = _process_engine["engine"]
        if self._engine is None:
            tok = self.processor.tokenizer
            r = self.cfg.rollout
            # make_engine is looked up at call time: tests inject engines
            self._engine = _process_engine["engine"] = rollout_engine.make_engine(
                r.engine, self.init_path, device=self.device, batch_size=r.batch_size,
                eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
                max_num_batched_tokens=r.max_num_batched_tokens, enforce_eager=r.enforce_eager,
                enable_prefix_caching=r.enable_prefix_caching,
                max_model_len=self.cfg.grpo.max_prompt_length + self.cfg.grpo.max_response_length,
                seed=self.cfg.run.seed + self.rank, min_pixels=self.cfg.data.min_pixels,
                max_pixels=self.cfg.data.max_pixels)
        return self._engine

    @property
    def scorer(self):
        if self._scorer is None:
            from .rewards import RewardScorer

            r = self.cfg.reward
            self._scorer = RewardScorer(fn=r.function or None, format_weight=r.format_weight,
                                        timeout_s=r.timeout_s, num_workers=r.num_workers)
        return self._scorer

    @property
    def banned_token_ids(self) -> tuple[int, ...]:
        """Vision placeholders: a response holding one would break the image-token count of the forward."""
        c = self.model_config
        return (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id)

    def sync_engine(self) -> float:
        """Release the trainer's cached memory, wake the engine, stream the current policy weights into it;
        returns seconds spent."""
        import time

        t0 = time.perf_counter()
        dtype = torch.bfloat16 if self.device.type == "cuda" else None
        engine = self.engine
        release_cached_memory()
        engine.wake_up()
        self.engine.load_weights(iter_full_weights(self.policy.model, dtype))
        return time.perf_counter() - t0

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

    # --- checkpoints ------------------------------------------------------------------------------
    def bad_step_guard(self) -> BadStepGuard:
        return BadStepGuard(self.cfg.optim.max_bad_steps, self.stage)

    def resume(self, opt, sched, skips: SkipCounter, guard: BadStepGuard | None = None) -> int:
        """Continue from the newest complete, intact checkpoint of this stage when `run.resume` says so."""
        root = self.dir / "checkpoints"
        checkpoint.check_shared(root)
        checkpoint.clean_partial(root)
        resume = self.cfg.run.resume
        if resume == "never":
            path = None
        elif resume == "auto":
            path = checkpoint.latest_intact_checkpoint(root)
        else:
            path = Path(resume)
            checkpoint.check_intact(path)
        if path is None:
            self.metrics.truncate_after(self.stage, 0)
            return 0
        extra = checkpoint.load(path, self.policy, opt)
        sched.load_state_dict(extra["scheduler"])
        if checkpoint.saved_world_size(path) == self.world:
            skips.load_state(extra.get("skips", {}))
        elif self.rank == 0:  # another world size: all saved ranks' skipped rows on rank 0, the sum is kept
            for saved in checkpoint.saved_extras(path):
                skips.load_state(saved.get("skips", {}))
        self.extra_state = extra.get("stage_state", {})
        if guard is not None:
            guard.load_state(self.extra_state.get("bad_steps", {}))
        self.step = int(extra["step"])
        self.metrics.truncate_after(self.stage, self.step)
        log.info("%s: resumed from %s (step %d)", self.stage, path, self.step)
        return self.step

    def save(self, step: int, opt, sched, skips: SkipCounter, guard: BadStepGuard | None = None) -> Path:
        stage_state = {"bad_steps": guard.state()} if guard is not None else {}
        extra = {"step": step, "scheduler": sched.state_dict(), "skips": skips.state(), "stage_state": stage_state}
        return checkpoint.save(self.dir / "checkpoints", step, self.policy, opt, extra, keep=self.cfg.checkpoint.keep)

    def end_step(self, step: int, opt, sched, skips: SkipCounter, guard: BadStepGuard, *, save: bool) -> None:
        """After a step's update, validation and metrics: the periodic checkpoint (`save`), then the
        preemption check, collective and every step. Preempted: the step's checkpoint is written (once)
        and `Preempted` raised on every rank."""
        path = self.save(step, opt, sched, skips, guard) if save else None
        if self.preemption is not None and self.preemption.requested():
            path = path or self.save(step, opt, sched, skips, guard)
            log.warning("%s: preemption signal received, stopping after step %d with checkpoint %s",
                        self.stage, step, path)
            raise Preempted(self.stage, step, path)

    def finish(self) -> Path:
        """Export the stage's model as a Hugging Face directory and mark the stage done."""
        out = export_hf(self.policy, self.processor, self.dir / "hf")
        if self.rank == 0:
            (self.dir / "DONE").write_text(json.dumps({"export": str(out)}))
        dist.barrier()
        if self._scorer is not None:
            self._scorer.close()
        log.info("%s: done, model exported to %s", self.stage, out)
        return out


def ground_truth(answer: str) -> str:
    """The reference answer of a row: its last \\boxed{} content when it holds a full solution (the
    cold-start schema), else the answer itself (the RL schema)."""
    from .rewards import extract_boxed

    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer.strip()


@torch.no_grad()
def validate(ctx: StageContext, table, *, temperature: float, n: int) -> dict[str, float]:
    """Generate on the validation rows (this rank's share), score with the reward, average over ranks.
    The generate-and-score core is `eval.generate_and_score`, so `python -m rlcs_fast.eval` on the
    exported checkpoint reproduces these numbers."""
    from .eval import generate_and_score, val_sampling

    g = ctx.cfg.grpo
    encoder = ctx.encoder(max_length=g.max_prompt_length)
    skips = SkipCounter()
    idx = rank_share(list(range(len(table))), ctx.rank, ctx.world)
    prompts = encode_many(lambda row, i: encoder.prompt(row, i), ((table[i], i) for i in idx), skips, "data.val")
    ctx.sync_engine()
    sampling = val_sampling(n=n, temperature=temperature, top_p=g.top_p, max_tokens=g.max_response_length,
                            seed=ctx.cfg.run.seed, rank=ctx.rank, banned_token_ids=ctx.banned_token_ids)
    records = generate_and_score(ctx.engine, ctx.processor.tokenizer, prompts, sampling, ctx.scorer)
    ctx.engine.sleep()
    sums = torch.tensor([sum(r["accuracy"] for r in records), sum(r["format"] for r in records),
                         sum(r["overall"] for r in records), len(records)], dtype=torch.float64)
    dist.all_reduce(sums)
    count = max(float(sums[3]), 1.0)
    return {"val/accuracy": float(sums[0]) / count, "val/format": float(sums[1]) / count,
            "val/reward": float(sums[2]) / count}
