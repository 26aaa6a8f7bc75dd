"""The memory planner counts what a micro-step allocates: peak bytes of live tensors, measured on the CPU
with a TorchDispatchMode at Qwen2.5-VL-3B's width (hidden 2048, 16 heads, vocabulary 151,936, tied
embeddings; 2 decoder layers, 1 vision block, one 448x448 image), against `plan.micro_step_bytes` for
the same shapes (world 1, fp32 as the CPU trainer runs): within 20%, for SFT and for GRPO."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of storages made inside the mode that are still alive, and their peak. Storages that
    existed before (`known`: parameters, inputs) are not counted, nor views of them."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()
        for t in known:
            self.seen[t.untyped_storage()] = 0

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self.seen:
                    self.seen[storage] = storage.nbytes()
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._freed, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


def _micro_step(policy, batch, head, index=None) -> int:
    """Peak bytes of one forward + backward: parameters plus the peak of what the step allocates."""
    inputs = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
    known = [*policy.parameters(), *policy.buffers(), *inputs]
    params = sum(p.numel() * p.element_size() for p in policy.parameters())
    mode = LiveTensorBytes(known)
    with mode:
        loss = policy(batch, head, index)
        if isinstance(loss, tuple):
            loss = loss[0]
        loss.backward()
        del loss
    policy.zero_grad(set_to_none=True)
    return params + mode.peak


@pytest.mark.slow
def test_planner_matches_measured_micro_step_peak_at_3b_width():
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rlcs_fast.attention import apply_attention, select_attention
    from rlcs_fast.config import GRPOConfig
    from rlcs_fast.grpo import grpo_head
    from rlcs_fast.model import Policy
    from rlcs_fast.plan import micro_step_bytes, model_arch
    from rlcs_fast.profile import released_config, synthetic_batch
    from rlcs_fast.sft import sft_loss_fn

    config = released_config("3b", layers=2)
    config.vision_config.depth = 1
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float().train()
    apply_attention(model, select_attention("auto"))
    policy = Policy(model)
    arch = model_arch(config)
    assert (arch.hidden, arch.heads, arch.vocab, arch.tied) == (2048, 16, 151936, True)
    batch = synthetic_batch(config, tokens=400, seq_len=400, image_tokens=256)  # 448x448: 16x16 merged tokens
    patches = batch.pixel_values.shape[0]
    assert patches == 1024

    index = batch.loss_mask.nonzero().squeeze(-1)
    targets = batch.targets[index]
    n = targets.numel()
    g = GRPOConfig(kl_coef=0.0)
    gen = torch.Generator().manual_seed(0)
    old = -torch.rand(n, generator=gen) * 5
    adv = torch.randn(n, generator=gen)
    heads = {"sft": (sft_loss_fn(targets, 1.0 / n, "torch"), None),
             "grpo": (grpo_head(g, targets, old, adv, torch.ones(n, dtype=torch.bool), None,
                                torch.zeros(n, dtype=torch.long), None, 1, "torch"), index)}
    for stage, (head, idx) in heads.items():
        measured = _micro_step(policy, batch, head, idx)
        planned = micro_step_bytes(arch, stage=stage, world=1, tokens=batch.num_tokens, patches=patches,
                                   loss_tokens=n, compute_bytes=4, grad_ckpt=False,
                                   trainable=arch.total_params)["micro-step peak"]
        assert planned == pytest.approx(measured, rel=0.2), (stage, planned / 2**30, measured / 2**30)
