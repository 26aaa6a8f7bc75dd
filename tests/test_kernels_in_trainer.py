"""The trainer's SFT and GRPO losses do not depend on the kernels switch (``kernels.impl``).

Both stages hand the packed policy a head function (``rlcs_fast.sft.sft_loss_fn``,
``rlcs_fast.grpo.grpo_head``) that calls the fused ops with ``impl="triton"`` (GPU, or the Triton
interpreter that ``tests/conftest.py`` turns on here) or ``impl="torch"`` (the chunked reference, the CPU
path). The tiny Qwen2.5-VL runs both on the same packed synthetic samples, built the way the stages
build them (``Encoder`` rows → ``Sample``s → ``pack``; GRPO rollouts through ``build_rollouts``): the
loss, the stats and every parameter gradient (vision tower included, reached through the hidden
states) must agree to float32 accuracy, and the loss must also match a float64 evaluation of the head on
the same hidden states.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rlcs_fast.kernels import _common, fused_linear_grpo_loss_reference, fused_linear_logprob_reference

from rlcs_fast.config import GRPOConfig
from rlcs_fast.data import Columns, Encoder
from rlcs_fast.grpo import build_rollouts, grpo_head
from rlcs_fast.model import Policy, load_model, load_processor
from rlcs_fast.packing import pack
from rlcs_fast.rollout.engine import Completion
from rlcs_fast.sft import sft_loss_fn
from rlcs_fast.synthetic import synthetic_dataset
from rlcs_fast.tiny import tiny_path

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16  # configs/tiny.toml
TEMPLATE = "{problem} Think in <think> </think>, then answer in \\boxed{}."
AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
RTOL = 1e-4


# Under the interpreter each Triton program costs about a millisecond: launch with larger blocks than the
# default interpreter config (still several tiles over the 1024-row vocabulary); block boundaries and
# tails are the kernel tests' concern (tests/kernels/).
LARGE_INTERPRET_BLOCKS = {"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_H": 64, "BLOCK_M": 64, "BLOCK_K": 64,
                          "BLOCK_T": 256}


@pytest.fixture(scope="module", autouse=True)
def large_interpret_blocks():
    saved = dict(_common.INTERPRET_BLOCKS)
    _common.INTERPRET_BLOCKS.update(LARGE_INTERPRET_BLOCKS)
    yield
    _common.INTERPRET_BLOCKS.clear()
    _common.INTERPRET_BLOCKS.update(saved)


@pytest.fixture(scope="module")
def setup():
    path = str(tiny_path())
    torch.manual_seed(0)
    model, _ = load_model(path)
    policy = Policy(model).train()
    processor = load_processor(path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    encoder = Encoder(processor, model.config, Columns(), template=TEMPLATE, system_prompt="",
                      min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_length=256)
    return policy, encoder


def _hidden_states(policy: Policy, batch, index: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return policy(batch, lambda hidden, weight: hidden.clone(), index)


def _loss_and_grads(policy: Policy, batch, head, index=None):
    policy.zero_grad(set_to_none=True)
    out = policy(batch, head, index)
    loss, stats = out if isinstance(out, tuple) else (out, {})
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return loss.detach(), {k: v.detach() for k, v in stats.items()}, grads


def _assert_grads_equal(triton_grads: dict, torch_grads: dict) -> None:
    assert triton_grads.keys() == torch_grads.keys()
    assert any(n.startswith("model.model.visual") for n in torch_grads), "the vision tower got no gradient"
    for name, want in torch_grads.items():
        scale = float(want.abs().max())
        assert scale > 0, f"{name}: zero gradient, the comparison would be vacuous"
        torch.testing.assert_close(triton_grads[name], want, rtol=RTOL, atol=RTOL * scale, msg=name)


@pytest.mark.slow
def test_sft_loss_and_gradients_equal_with_kernels_on_and_off(setup):
    policy, encoder = setup
    rows = synthetic_dataset("sft", "train", 3, seed=11)
    samples = [encoder.sft(rows[i]) for i in range(len(rows))]
    batch = pack(samples, policy.model.config.vision_config)
    targets = batch.targets[batch.loss_mask]
    scale = 1.0 / targets.numel()  # the stage divides the NLL sum by the global loss-token count

    loss_triton, _, grads_triton = _loss_and_grads(policy, batch, sft_loss_fn(targets, scale, "triton"))
    loss_torch, _, grads_torch = _loss_and_grads(policy, batch, sft_loss_fn(targets, scale, "torch"))

    hidden = _hidden_states(policy, batch).double()
    weight = policy.model.lm_head.weight.detach().double()
    want = -fused_linear_logprob_reference(hidden, weight, targets).sum() * scale  # float64
    assert float(loss_torch) == pytest.approx(float(want), rel=1e-5)
    assert float(loss_triton) == pytest.approx(float(want), rel=1e-5)
    _assert_grads_equal(grads_triton, grads_torch)


@pytest.fixture(scope="module")
def grpo_batch(setup):
    """Two prompts × two sampled responses, packed as `update` packs them, with old / reference
    log-probs near the policy's own (so some ratios clip and some do not) and ± advantages."""
    policy, encoder = setup
    rows = synthetic_dataset("rl", "train", 2, seed=5)
    prompts = [encoder.prompt(rows[i], i) for i in range(len(rows))]
    g = torch.Generator().manual_seed(1)
    vocab = encoder.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # ordinary text ids below it
    n = 2
    completions = [Completion(p.prompt_ids.tolist(), torch.randint(0, vocab, (int(k),), generator=g).tolist(),
                              None, "length")
                   for p in prompts for k in torch.randint(6, 14, (n,), generator=g)]
    advantages = torch.tensor([1.0, -1.0, -0.5, 0.7])
    rollouts = build_rollouts(prompts, completions, advantages, n)
    batch = pack([r.sample for r in rollouts], policy.model.config.vision_config)
    index = batch.loss_mask.nonzero().squeeze(-1)
    targets, seq_ids = batch.targets[index], batch.seq_ids[index]
    assert targets.numel() == sum(r.response_len for r in rollouts)

    hidden = _hidden_states(policy, batch, index)
    own = fused_linear_logprob_reference(hidden, policy.model.lm_head.weight.detach(), targets)
    old = own + 0.3 * torch.randn(own.shape, generator=g)
    ref = own + 0.3 * torch.randn(own.shape, generator=g)
    adv = torch.cat([torch.full((r.response_len,), r.advantage) for r in rollouts])
    mask = torch.ones_like(targets, dtype=torch.bool)
    return batch, index, targets, seq_ids, old, adv, mask, ref, hidden, len(rollouts)


@pytest.mark.slow
@pytest.mark.parametrize("agg", AGGS)
def test_grpo_loss_and_gradients_equal_with_kernels_on_and_off(setup, grpo_batch, agg):
    policy, _ = setup
    batch, index, targets, seq_ids, old, adv, mask, ref, hidden, num_seqs = grpo_batch
    g = dataclasses.replace(GRPOConfig(), agg=agg, kl_coef=0.05, kl_type="low_var_kl", temperature=0.9,
                            clip_dual=3.0, max_response_length=16)
    norm_len = g.max_response_length * num_seqs if agg == "seq_mean_token_sum_norm" else None

    def head(impl: str):
        return grpo_head(g, targets, old, adv, mask, ref, seq_ids, norm_len, num_seqs, impl)

    loss_triton, stats_triton, grads_triton = _loss_and_grads(policy, batch, head("triton"), index)
    loss_torch, stats_torch, grads_torch = _loss_and_grads(policy, batch, head("torch"), index)

    want, want_stats = fused_linear_grpo_loss_reference(
        hidden.double(), policy.model.lm_head.weight.detach().double(), targets, old.double(),
        adv.double(), mask,
        ref_logprobs=ref.double(), temperature=g.temperature, clip_low=g.clip_low, clip_high=g.clip_high,
        clip_dual=g.clip_dual, kl_coef=g.kl_coef, kl_type=g.kl_type, agg=agg, norm_len=norm_len,
        seq_ids=seq_ids, num_seqs=num_seqs, with_entropy=True)
    # a test where nothing clips (or everything does) would not exercise the clipped branch of the gradient
    assert 0.0 < float(want_stats["clip_frac"]) < 1.0, want_stats
    assert float(loss_torch) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert float(loss_triton) == pytest.approx(float(want), rel=1e-5, abs=1e-7)
    assert stats_triton.keys() == stats_torch.keys() and "entropy" in stats_torch
    for key, value in stats_torch.items():
        assert float(stats_triton[key]) == pytest.approx(float(value), rel=RTOL, abs=1e-6), key
        assert float(value) == pytest.approx(float(want_stats[key]), rel=RTOL, abs=1e-6), key
    _assert_grads_equal(grads_triton, grads_torch)
