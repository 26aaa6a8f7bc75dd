"""Token balance across data-parallel ranks after generation (2 processes, gloo, FSDP2): moving whole
groups between ranks changes where the work runs, not what the update computes: the same loss and
gradients as without balancing, and a lower max/mean token load.

This file is also the 2-process worker (`python -m torch.distributed.run ... tests/test_rebalance.py OUT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIG = Path(__file__).parent.parent / "configs" / "tiny.toml"


def _rollouts(ctx, rank: int):
    """Rank 0 generated 3 long groups, rank 1 one short group: 2 responses each, grouped."""
    from rlcs_fast.grpo import Rollout
    from rlcs_fast.packing import Sample, extend_positions

    table, _ = ctx.load_tables(kind="rl")
    enc = ctx.encoder(max_length=256)
    g = torch.Generator().manual_seed(0)
    plan = {0: [(0, 60), (1, 50), (2, 40)], 1: [(3, 6)]}[rank]
    out = []
    for local, (row, length) in enumerate(plan):
        p = enc.prompt(table[row], row)
        for k in range(2):
            resp = torch.randint(0, 1000, (length + 3 * k,), generator=g)
            ids = torch.cat([p.prompt_ids, resp])
            target = torch.zeros(ids.numel(), dtype=torch.bool)
            target[p.prompt_ids.numel():] = True
            s = Sample(ids, target, extend_positions(p.position_ids, resp.numel()), p.pixel_values,
                       p.image_grid_thw)
            out.append(Rollout(s, 1.0 if k == 0 else -1.0, None, group=local))
    return out


def _worker(out: Path) -> None:
    from rlcs_fast import dist
    from rlcs_fast.config import OptimConfig, load_config
    from rlcs_fast.grpo import update
    from rlcs_fast.metrics import MetricsLogger
    from rlcs_fast.model import resolve_model_path
    from rlcs_fast.rebalance import balance_minibatches
    from rlcs_fast.stage import StageContext
    from rlcs_fast.trainer_utils import build_optimizer, full_tensor

    rank, world, device = dist.init("cpu")
    path = resolve_model_path("tiny")
    results = {}
    for balanced in (False, True):
        cfg = load_config(CONFIG, {"run.dir": str(out / str(balanced)), "log.progress": False,
                                   "data.synthetic_train_size": 16, "data.synthetic_val_size": 4,
                                   "kernels.impl": "torch"})
        ctx = StageContext.create(cfg, "grpo", path, rank=rank, world=world, device=device,
                                  metrics=MetricsLogger(out / str(balanced), rank=rank, progress=False))
        rollouts = _rollouts(ctx, rank)
        metrics = {}
        if balanced:
            parts, metrics = balance_minibatches(rollouts, 1, rank, world)
            rollouts = parts[0]
        opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=0.0, total_steps=1)
        grads = {}
        orig_step = opt.step

        def capture(*a, _grads=grads, _policy=ctx.policy, _step=orig_step, **k):
            for n, p in _policy.named_parameters():
                if p.grad is not None:
                    _grads[n] = full_tensor(p.grad).clone()
            return _step(*a, **k)

        opt.step = capture
        stats = update(ctx, rollouts, opt, sched, with_ref=False, on_policy=True)
        tokens = dist.all_gather_object(sum(r.sample.input_ids.numel() for r in rollouts))
        results[balanced] = {"loss": stats["train/loss"], "grad_norm": stats["train/grad_norm"],
                             "tokens": tokens, **metrics}
        if rank == 0:
            torch.save(grads, out / f"grads_{balanced}.pt")
    if rank == 0:
        (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}))
    dist.shutdown()


@pytest.mark.slow
def test_balancing_ranks_keeps_losses_and_gradients(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    plain, balanced = res["False"], res["True"]
    assert max(balanced["tokens"]) < max(plain["tokens"])  # the long groups were spread
    assert balanced["perf/rank_imbalance"] < balanced["perf/rank_imbalance_before"]
    assert balanced["perf/rank_imbalance"] == pytest.approx(
        max(balanced["tokens"]) / (sum(balanced["tokens"]) / 2))
    assert balanced["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
    assert balanced["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5)
    g0, g1 = torch.load(tmp_path / "grads_False.pt"), torch.load(tmp_path / "grads_True.pt")
    assert g0.keys() == g1.keys() and g0
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-7, msg=name)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
