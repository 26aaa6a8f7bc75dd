"""Host syncs per GRPO update and per log-prob pass, counted on the CPU with the tiny model, at 1 and at
many micro-batches. Uses only APIs that the trainer had before issue 22 too, so that
``rlcs_fast.overhead`` can run it against the base revision (``PYTHONPATH=<old checkout>``) and the
current one in the same benchmark.

    python bench/sync_count.py OUT.json

Counted (calling thread): aten ``_local_scalar_dense`` / ``item`` (``float(t)``, ``.item()``), ``nonzero``
(also behind boolean-mask indexing), and device→host copies requested with ``.cpu()`` / ``.numpy()``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"


class _Syncs(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "item", "nonzero"):
            self.counts["syncs"] += 1
        return func(*args, **(kwargs or {}))


class _Copies(TorchFunctionMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("cpu", "numpy"):
            self.counts["syncs"] += 1
        return func(*args, **(kwargs or {}))


def _uncounted(step):
    """AdamW reads its per-parameter step counters with ``.item()``: CPU tensors (not device syncs) on a
    GPU too, and the same before and after; left out of the count."""
    from torch.utils._python_dispatch import _disable_current_modes

    def run(*args, **kwargs):
        with _disable_current_modes():
            return step(*args, **kwargs)

    return run


def count(fn) -> int:
    counts: Counter = Counter()
    with _Syncs(counts), _Copies(counts):
        fn()
    return counts["syncs"]


def measure(n_prompts: int = 4, n: int = 2) -> dict:
    from dataclasses import replace

    from rlcs_fast.config import OptimConfig, load_config
    from rlcs_fast.grpo import Rollout, compute_logprobs, update
    from rlcs_fast.metrics import MetricsLogger
    from rlcs_fast.model import resolve_model_path
    from rlcs_fast.packing import Sample, extend_positions
    from rlcs_fast.stage import StageContext
    from rlcs_fast.trainer_utils import build_optimizer

    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(TINY, {"run.dir": str(tmp), "log.progress": False, "data.synthetic_train_size": 16,
                             "data.synthetic_val_size": 4, "kernels.impl": "torch"})
    ctx = StageContext.create(cfg, "grpo", resolve_model_path("tiny"), rank=0, world=1,
                              device=torch.device("cpu"), metrics=MetricsLogger(tmp, progress=False))
    table, _ = ctx.load_tables(kind="rl")
    enc = ctx.encoder(max_length=256)
    g = torch.Generator().manual_seed(0)
    rollouts = []
    for j in range(n_prompts):
        p = enc.prompt(table[j], j)
        for k in range(n):
            resp = torch.randint(0, 1000, (8 + 3 * k + j,), generator=g)
            ids = torch.cat([p.prompt_ids, resp])
            target = torch.zeros(ids.numel(), dtype=torch.bool)
            target[p.prompt_ids.numel():] = True
            rollouts.append(Rollout(Sample(ids, target, extend_positions(p.position_ids, resp.numel()),
                                           p.pixel_values, p.image_grid_thw), 1.0 - k, None))
    out = {}
    for budget, label in ((100_000, "one"), (1, "many")):  # budget 1: one micro-batch per rollout
        ctx.cfg = replace(cfg, grpo=replace(cfg.grpo, max_tokens_per_microbatch=budget))
        opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=0.0, total_steps=2)
        opt.step = _uncounted(opt.step)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=budget, temperature=1.0)  # warm-up
            lp: list = []

            def logprob_pass(lp=lp, budget=budget):
                lp.extend(compute_logprobs(ctx.policy, rollouts, ctx=ctx, max_tokens=budget, temperature=1.0))

            out[f"logprob_pass_{label}"] = count(logprob_pass)
            for r, x in zip(rollouts, lp):
                r.old_logprobs = x
            out[f"update_{label}"] = count(lambda opt=opt, sched=sched: update(ctx, rollouts, opt, sched,
                                                                              with_ref=False))
    out["micro_batches"] = {"one": 1, "many": len(rollouts)}
    return out


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(measure()))
