"""The rollout engine samples from the model the trainer optimises: for responses sampled with images, the
engine's log-probs equal the trainer's packed log-probs of the same tokens.

Regression: transformers 5 computes Qwen2.5-VL's 3-D mrope positions in ``generate`` only when it is
given ``mm_token_type_ids``. The HF engine once omitted them, so rollouts and validation ran the model with
1-D positions while the trainer used mrope: ``rollout/logprob_diff`` was 0.01-0.3 and GRPO optimised a
model other than the one it sampled from.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from rlcs_fast.data import Columns, Encoder, lazy_images
from rlcs_fast.grpo import build_rollouts, logprob_head
from rlcs_fast.model import Policy, load_model, load_processor
from rlcs_fast.packing import pack
from rlcs_fast.rollout.engine import SamplingParams
from rlcs_fast.rollout.hf_engine import HFEngine
from rlcs_fast.synthetic import synthetic_dataset
from rlcs_fast.tiny import tiny_path

PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)  # configs/tiny.toml


@pytest.mark.slow
def test_engine_logprobs_equal_trainer_logprobs_with_images():
    path = str(tiny_path(seed=0))
    processor = load_processor(path, **PIXELS)
    config = AutoConfig.from_pretrained(path)
    encoder = Encoder(processor, config, Columns(), template="{problem}", system_prompt="", max_length=1024,
                      **PIXELS)
    rows = lazy_images(synthetic_dataset("rl", "val", 3, seed=4), "images")
    prompts = [encoder.prompt(rows[i], i) for i in range(len(rows))]
    assert len({p.prompt_ids.numel() for p in prompts}) > 1  # left padding in the engine's batch too
    tok = processor.tokenizer
    engine = HFEngine(path, device=torch.device("cpu"), batch_size=8,
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
    n = 2
    sampling = SamplingParams(n=n, temperature=0.7, max_tokens=12, logprobs=True, seed=1)
    completions = engine.generate(prompts, sampling)
    rollouts = build_rollouts(prompts, completions, torch.zeros(len(completions)), n)
    assert len(rollouts) == len(prompts) * n

    model, _ = load_model(path, device="cpu")
    policy = Policy(model).eval()
    batch = pack([r.sample for r in rollouts], config.vision_config)
    with torch.no_grad():
        # sampled at 0.7, compared at T = 1: engines report raw log-probs (SamplingParams.logprobs)
        head = logprob_head(batch.targets[batch.loss_mask], 0.7, "torch", with_raw=True)
        trainer = policy(batch, head)[:, 1]
    engine_lp = torch.tensor([lp for r in rollouts for lp in r.engine_logprobs])
    assert engine_lp.shape == trainer.shape
    torch.testing.assert_close(engine_lp, trainer.float(), atol=1e-4, rtol=0)
