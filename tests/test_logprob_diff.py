"""`rollout/logprob_diff` compares the engine's and the trainer's log-probs of the sampled tokens on the
same distribution. Engines report raw log-probs (log_softmax(logits), before temperature, top-p and the
vision-token ban); the trainer's old log-probs are at the rollout temperature, so at T != 1 the metric
takes the trainer's log-probs at T = 1 from the same pass. A GRPO run with the transformers engine at
T = 0.7 and top-p 0.9 (the recipe's shape): the gap is numerical noise, not the temperature's effect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlcs_fast import train

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
ARGS = ["--log.progress", "false", "--run.stages", '["grpo"]', "--data.synthetic_train_size", "16",
        "--data.synthetic_val_size", "2", "--grpo.rollout_batch_size", "2",
        "--grpo.n", "2", "--grpo.max_response_length", "6", "--reward.num_workers", "1", "--grpo.steps", "2",
        "--kernels.impl", "torch", "--grpo.temperature", "0.7", "--grpo.top_p", "0.9",
        "--grpo.epochs", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("mini_batch", ["1", "2"])
def test_logprob_diff_compares_the_same_distribution(tmp_path, mini_batch):
    # mini-batch 1: two updates per step, the trainer's log-probs come from the separate old pass;
    # 2: on-policy, from the update's own forward
    args = [*ARGS, "--grpo.mini_batch_size", mini_batch]
    assert train.main(["--cfg", CONFIG, "--run.dir", str(tmp_path / "run"), *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    diffs = [r["rollout/logprob_diff"] for r in rows if r["stage"] == "grpo" and "rollout/logprob_diff" in r]
    assert len(diffs) == 2
    assert all(0 <= d < 1e-4 for d in diffs), diffs
