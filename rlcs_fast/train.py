"""Entry point: ``python -m rlcs_fast.train --cfg configs/tiny.toml [--section.key value ...]``, also
under ``torchrun``. Runs the stages of ``run.stages`` in order; GRPO starts from the SFT export.
``--dry-run`` validates the config and prints the run plan (model, data, batches, memory) instead.

Exit status: 0 done; 1 an error (a traceback; one line for too many non-finite steps in a row and for a
checkpoint that could not be written); 2 a config error; 75 (``faults.EXIT_PREEMPTED``) stopped by
SIGTERM / SIGUSR1 after writing a checkpoint, resumable with ``run.resume = "auto"``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from . import dist
from .checkpoint import CheckpointError
from .config import ConfigError, dump_toml, parse_args, to_dict
from .faults import EXIT_PREEMPTED, Preempted, Preemption, TooManyBadSteps
from .metrics import MetricsLogger, setup_logging
from .model import resolve_model_path
from .preflight import check_launch
from .rollout.build import SharedEngine, build_engine
from .rollout.engine import RolloutEngine
from .stage import StageContext, stage_dir, stage_done

log = logging.getLogger("rlcs_fast")


def main(argv: list[str] | None = None, *, engine: RolloutEngine | None = None) -> int:
    """``engine``: a rollout engine to use instead of building one from ``rollout`` (a test's)."""
    try:
        cfg, flags = parse_args(argv, extra_flags=("dry-run",))
    except ConfigError as e:
        print(f"rlcs_fast: config error: {e}", file=sys.stderr)
        return 2
    if flags["dry-run"]:  # validate and print the plan; no process group, no weights, no training
        from .plan import build_plan, format_plan

        plan = build_plan(cfg)
        print(format_plan(plan, cfg))
        return 0 if plan.ok else 1
    # handlers from the start: a signal during start-up (process group, model load) is acted on after the
    # first step instead of killing the process
    with Preemption() as preemption:
        return run(cfg, preemption, engine)


def run(cfg, preemption: Preemption, engine: RolloutEngine | None = None) -> int:
    rank, world, device = dist.init(cfg.run.device, timeout_s=cfg.run.collective_timeout_s)
    setup_logging(rank)
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(cfg))
    log.info("run %s: stages %s, config written to %s", run_dir, cfg.run.stages, run_dir / "config.toml")
    metrics = MetricsLogger(run_dir, rank=rank, progress=cfg.log.progress, tensorboard=cfg.log.tensorboard,
                            wandb_project=cfg.log.wandb_project, config=to_dict(cfg))
    try:  # before any weight: a hub id becomes one local snapshot that trainer, engine and eval share
        init_path = resolve_model_path(cfg.model.path, tiny_seed=cfg.model.tiny_seed)
        check_launch(cfg, init_path)
    except ConfigError as e:  # the same on every rank: all stop here
        print(f"rlcs_fast: config error: {e}", file=sys.stderr)
        metrics.close()
        dist.shutdown()
        return 2
    log.info("model %s: %s", cfg.model.path, init_path)

    def build(model_path: str, tokenizer) -> RolloutEngine:
        return build_engine(cfg.rollout, model_path, tokenizer=tokenizer, device=device,
                            max_model_len=cfg.grpo.max_prompt_length + cfg.grpo.max_response_length,
                            seed=cfg.run.seed + rank, min_pixels=cfg.data.min_pixels,
                            max_pixels=cfg.data.max_pixels)

    engines = SharedEngine(engine=engine) if engine is not None else SharedEngine(build)
    try:
        run_stages(cfg, init_path, rank=rank, world=world, device=device, metrics=metrics, engines=engines,
                   preemption=preemption)
    except Preempted as e:
        log.warning("%s; exiting with status %d (resume with run.resume = \"auto\")", e, EXIT_PREEMPTED)
        engines.close()
        metrics.close()
        dist.shutdown()  # every rank stopped after the same step: they leave together
        return EXIT_PREEMPTED
    except (TooManyBadSteps, CheckpointError) as e:  # agreed by all ranks; the message says what to do
        log.error("%s", e)
        engines.close(graceful=False)
        metrics.close()
        dist.shutdown(wait=False)
        return 1
    except BaseException:
        engines.close(graceful=False)
        metrics.close()
        dist.shutdown(wait=False)
        raise
    engines.close()
    metrics.close()
    dist.shutdown()
    return 0


def run_stages(cfg, init_path: str, *, rank: int, world: int, device: torch.device, metrics: MetricsLogger,
               engines: SharedEngine, preemption: Preemption) -> None:
    run_dir = Path(cfg.run.dir)
    for stage in cfg.run.stages:
        if cfg.run.resume == "auto" and stage_done(run_dir, stage):
            log.info("%s: already done in %s, skipping", stage, stage_dir(run_dir, stage))
        else:
            ctx = StageContext.create(cfg, stage, init_path, rank=rank, world=world, device=device,
                                      metrics=metrics, engines=engines, preemption=preemption)
            if stage == "sft":
                from .sft import run_sft

                run_sft(ctx)
            else:
                from .grpo import run_grpo

                run_grpo(ctx)
            del ctx
        init_path = str(stage_dir(run_dir, stage) / "hf")

if __name__ == "__main__":
    sys.exit(main())
