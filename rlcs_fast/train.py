"""Entry point: ``python -m rlcs_fast.train --cfg configs/tiny.toml [--section.key value ...]``, also
under ``torchrun``. Runs the stages of ``run.stages`` in order; GRPO starts from the SFT export.
``--dry-run`` validates the config and prints the run plan (model, data, batches, memory) instead."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from . import dist
from .config import ConfigError, dump_toml, parse_args, to_dict
from .metrics import MetricsLogger, setup_logging
from .model import resolve_model_path
from .stage import StageContext, close_engine, stage_dir, stage_done

log = logging.getLogger("rlcs_fast")


def main(argv: list[str] | None = None) -> int:
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
    rank, world, device = dist.init(cfg.run.device)
    setup_logging(rank)
    torch.manual_seed(cfg.run.seed)
    run_dir = Path(cfg.run.dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(dump_toml(cfg))
    log.info("run %s: stages %s, config written to %s", run_dir, cfg.run.stages, run_dir / "config.toml")
    metrics = MetricsLogger(run_dir, rank=rank, progress=cfg.log.progress, tensorboard=cfg.log.tensorboard,
                            wandb_project=cfg.log.wandb_project, config=to_dict(cfg))
    init_path = resolve_model_path(cfg.model.path, tiny_seed=cfg.model.tiny_seed)
    try:
        for stage in cfg.run.stages:
            if cfg.run.resume == "auto" and stage_done(run_dir, stage):
                log.info("%s: already done in %s, skipping", stage, stage_dir(run_dir, stage))
            else:
                ctx = StageContext.create(cfg, stage, init_path, rank=rank, world=world, device=device,
                                          metrics=metrics)
                if stage == "sft":
                    from .sft import run_sft

                    run_sft(ctx)
                else:
                    from .grpo import run_grpo

                    run_grpo(ctx)
                del ctx
            init_path = str(stage_dir(run_dir, stage) / "hf")
    except BaseException:
        close_engine()
        metrics.close()
        dist.shutdown(wait=False)
        raise
    close_engine()
    metrics.close()
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
