"""The vision tower runs once per distinct image of a micro-batch: a prompt's responses share its pixels,
and the packed forward scatters the tower's output to each of them. Results equal the per-response path
(every response its own copy of the pixels) to float64 round-off; the tower sees n× fewer patches."""

from __future__ import annotations

import copy

import pytest
import torch
from test_packing import CFG, make_sample, packed_logprobs

from rlcs_fast.attention import apply_attention
from rlcs_fast.packing import Sample, pack
from rlcs_fast.schedule import plan_microbatches


def _group(gen: torch.Generator, grids, n: int) -> list[Sample]:
    """``n`` responses to one prompt: the prompt's pixel tensor shared, different response tokens."""
    prompt = make_sample(gen, grids, n_text=4)
    out = []
    for k in range(n):
        resp = torch.randint(0, 1000, (3 + 2 * k,), generator=gen)
        ids = torch.cat([prompt.input_ids, resp])
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[prompt.input_ids.numel():] = True
        last = prompt.position_ids.max() + 1
        pos = torch.cat([prompt.position_ids, (last + torch.arange(resp.numel())).expand(3, -1)], 1)
        out.append(Sample(ids, target, pos, prompt.pixel_values, prompt.image_grid_thw))
    return out


def _copied(samples: list[Sample]) -> list[Sample]:
    """Today's per-response path: every response holds its own copy of the pixels."""
    return [Sample(s.input_ids, s.target_mask, s.position_ids,
                   None if s.pixel_values is None else s.pixel_values.clone(), s.image_grid_thw)
            for s in samples]


def _model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(CFG).double()
    apply_attention(model, "sdpa_packed")
    return model


def _rms_norm_in_input_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _rotary_in_input_dtype(q, k, cos, sin):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half

    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def test_shared_image_equals_per_response_copies_in_float64(monkeypatch):
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    # transformers' RMSNorm and vision rotary compute in float32 whatever the input: a gradient summed
    # before or after such a cast differs by float32 round-off; keep float64 for a float64 check
    monkeypatch.setattr(qwen.Qwen2_5_VLRMSNorm, "forward", _rms_norm_in_input_dtype)
    monkeypatch.setattr(qwen, "apply_rotary_pos_emb_vision", _rotary_in_input_dtype)
    gen = torch.Generator().manual_seed(0)
    # two prompts (one with two images), 3 and 2 responses, and a text-only sequence, interleaved
    samples = _group(gen, [[1, 4, 6]], 3) + _group(gen, [[1, 8, 4], [1, 4, 4]], 2) + [make_sample(gen, [])]
    samples = [samples[i] for i in (0, 3, 5, 1, 4, 2)]
    for s in samples:
        if s.pixel_values is not None and s.pixel_values.dtype != torch.float64:
            s.pixel_values.data = s.pixel_values.double()
    shared = pack(samples, CFG.vision_config)
    copied = pack(_copied(samples), CFG.vision_config)
    assert shared.pixel_values.shape[0] == 4 * 6 + 8 * 4 + 4 * 4  # each distinct image once
    assert copied.pixel_values.shape[0] == 3 * 4 * 6 + 2 * (8 * 4 + 4 * 4)

    base = _model()
    results = []
    for batch in (copied, shared):
        model = copy.deepcopy(base)
        lp = packed_logprobs(model, batch)
        loss = -(lp * batch.loss_mask).sum() / batch.num_loss_tokens
        loss.backward()
        results.append((loss.detach(), lp.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_c, lp_c, g_c), (loss_s, lp_s, g_s) = results
    torch.testing.assert_close(loss_s, loss_c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp_s, lp_c, rtol=1e-12, atol=1e-12)
    assert g_s["model.visual.patch_embed.proj.weight"] is not None
    for name, g in g_c.items():
        if g is not None:  # float64 round-off: the tower's gradients are summed in another order
            err = float((g_s[name] - g).abs().max())
            assert err <= 1e-12 * max(float(g.abs().max()), 1e-3), (name, err, float(g.abs().max()))


def test_plan_keeps_a_group_in_one_microbatch_where_the_budget_allows():
    # 4 groups of 8 responses, lengths interleaved so that length-sorted packing would mix the groups
    lengths = [40 + 7 * (i % 8) + (i // 8) for i in range(32)]
    groups = [i // 8 for i in range(32)]
    per_group = sum(lengths[:8])
    plan = plan_microbatches(lengths, 2 * per_group + 20, groups)
    for mb in plan:
        assert sum(lengths[i] for i in mb) <= 2 * per_group + 20
    for g in range(4):
        holders = [k for k, mb in enumerate(plan) if any(groups[i] == g for i in mb)]
        assert len(holders) == 1, (g, plan)
    # a group over the budget is cut into as few parts as the budget needs
    plan = plan_microbatches(lengths[:8], per_group // 2 + 60, groups[:8])
    assert len(plan) == 2 and sorted(i for mb in plan for i in mb) == list(range(8))


@pytest.mark.slow
def test_tower_patches_per_response_in_a_tiny_grpo_update(tmp_path):
    """configs/tiny.toml's update of 16 prompts x 8 responses (one 36-patch image each): the tower
    processed 36 patches with gradients per response (one copy each); now at most 36 / 8 + fillers."""
    from test_host_syncs import _ctx

    from rlcs_fast.config import OptimConfig
    from rlcs_fast.grpo import Rollout, build_rollouts, update
    from rlcs_fast.rollout.engine import Completion
    from rlcs_fast.trainer_utils import build_optimizer

    ctx = _ctx(tmp_path, 8192)  # tiny.toml's grpo.max_tokens_per_microbatch
    table, _ = ctx.load_tables(kind="rl")
    enc = ctx.encoder(max_length=256)
    prompts = [enc.prompt(table[j], j) for j in range(16)]
    assert all(int(p.image_grid_thw.prod(-1).sum()) == 36 for p in prompts)
    gen = torch.Generator().manual_seed(0)
    completions = [Completion(prompt_ids=[], response_ids=torch.randint(0, 1000, (int(torch.randint(
        8, 64, (1,), generator=gen)),), generator=gen).tolist(), logprobs=None, finish_reason="stop")
                   for _ in range(16 * 8)]
    advantages = torch.randn(16 * 8, generator=gen)
    rollouts: list[Rollout] = build_rollouts(prompts, completions, advantages, 8)
    patches = []

    def count(module, args, kwargs):
        if torch.is_grad_enabled():
            patches.append(args[0].shape[0])

    ctx.policy.model.model.visual.register_forward_pre_hook(count, with_kwargs=True)
    opt, sched = build_optimizer(ctx.policy, OptimConfig(schedule="constant"), lr=1e-4, total_steps=1)
    update(ctx, rollouts, opt, sched, with_ref=False, on_policy=True)
    assert sum(patches) / len(rollouts) <= 9, patches
