"""Mixed precision as a GPU run has it, checked on the CPU: the fused head gets compute-dtype inputs under
autocast; FSDP2's input casting leaves the vision rotary tables in fp32 (as vLLM keeps them); the
reference model is held in the compute dtype and resharded after its no-grad forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from rlcs_fast.config import load_config
from rlcs_fast.grpo import Rollout, compute_logprobs
from rlcs_fast.model import Policy, apply_fsdp, load_model
from rlcs_fast.packing import Sample, mrope_positions, pack
from rlcs_fast.stage import StageContext
from rlcs_fast.tiny import tiny_path
from rlcs_fast.trainer_utils import dummy_image_sample

CONFIG = Path(__file__).parent.parent / "configs" / "tiny.toml"


@pytest.fixture
def one_rank_group():
    """FSDP2 needs a process group; one gloo rank in this process, torn down after the test."""
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def _text_sample(config, length: int = 12, seed: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 200, (length,), generator=g)
    target = torch.zeros(length, dtype=torch.bool)
    target[length // 2:] = True
    return Sample(ids, target, mrope_positions(config, ids, None))


def _image_batch(config):
    image = dummy_image_sample(config)
    return pack([image, _text_sample(config)], config.vision_config)


def test_head_inputs_are_in_the_autocast_dtype():
    """Under autocast the residual stream and the master weight stay fp32: the head must cast them."""
    model, _ = load_model(str(tiny_path()))
    seen = {}

    def head(hidden, weight):
        seen.update(hidden=hidden.dtype, weight=weight.dtype)
        return hidden.float().sum() + weight.float().sum()

    batch = _image_batch(model.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = Policy(model)(batch, head, torch.arange(batch.num_tokens))
    loss.backward()  # the cast is differentiable: the fp32 master weight gets its gradient
    assert seen == {"hidden": torch.bfloat16, "weight": torch.bfloat16}
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.dtype == torch.float32


def test_vision_rotary_tables_stay_fp32_under_fsdp_mixed_precision(one_rank_group):
    model, _ = load_model(str(tiny_path()))
    policy = apply_fsdp(Policy(model), mixed_precision=True)
    seen = []

    def grab(module, args, kwargs):
        cos, sin = kwargs["position_embeddings"]
        seen.append((cos.dtype, sin.dtype, kwargs.get("hidden_states", args[0] if args else None).dtype))

    for block in model.model.visual.blocks:
        block.attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        policy(_image_batch(model.config), lambda h, w: h.float().sum(), torch.arange(4))
    assert len(seen) == len(model.model.visual.blocks)
    for cos, sin, hidden in seen:
        assert (cos, sin) == (torch.float32, torch.float32), "FSDP2 cast the vision rotary tables"
        assert hidden == torch.bfloat16  # the blocks still compute in bf16


def test_reference_model_is_compute_dtype_and_resharded_after_logprobs(one_rank_group, monkeypatch):
    from torch.distributed.tensor import DTensor

    cfg = load_config(CONFIG)
    ctx = StageContext(cfg, "grpo", str(tiny_path()), rank=0, world=2, device=torch.device("cpu"),
                       metrics=None)
    monkeypatch.setattr(StageContext, "mixed_precision",
                        property(lambda self: True))  # what CUDA + bf16 gives
    ref = ctx.reference_policy()
    ctx.model_config = ref.model.config
    for name, p in ref.named_parameters():
        assert isinstance(p, DTensor) and p.to_local().dtype == torch.bfloat16, (name, type(p), p.dtype)
    rollouts = [Rollout(_text_sample(ctx.model_config, seed=s), 0.0, None) for s in range(3)]
    logprobs = compute_logprobs(ref, rollouts, ctx=ctx, max_tokens=64, temperature=1.0)
    assert [lp.shape for lp in logprobs] == [(6,)] * 3 and all(torch.isfinite(lp).all() for lp in logprobs)
    gathered = [name for name, p in ref.named_parameters() if not isinstance(p, DTensor)]
    assert not gathered, f"left unsharded after the no-grad forward: {gathered}"
