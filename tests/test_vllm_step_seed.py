"""`VLLMEngine.generate` seeds the sampler once per call, never per request: a request-level seed gives
each request its own torch.Generator in vLLM, and sampling then runs as a Python loop over the batch
instead of FlashInfer's kernel (vLLM's ``topk_topp_sampler.py``; the V2 model runner skips its fused
sampler too). Checked here without vLLM: a stand-in ``vllm`` module records the SamplingParams and
samples from the global RNG, as vLLM's sampler does for unseeded requests. The real engine is checked
in ``tests/vllm_cpu/`` (``bash .ci/vllm_cpu.sh``)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import numpy as np
import torch

from rlcs_fast.rollout.engine import SamplingParams
from rlcs_fast.rollout.vllm_engine import VLLMEngine


@dataclass
class _Params:  # the fields VLLMEngine sets on vllm.SamplingParams
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    logprobs: int | None = None
    stop_token_ids: list | None = None
    logit_bias: dict | None = None
    detokenize: bool = True


@dataclass
class _LLM:
    """Samples like vLLM's sampler for unseeded requests: from torch's and numpy's global RNG."""

    sent: list = field(default_factory=list)

    def generate(self, prompts, params, use_tqdm=False):
        out = []
        for p in params:
            self.sent.append(p)
            assert p.seed is None, "a per-request seed: vLLM would leave its fast sampler"
            samples = []
            for k in range(p.n):
                ids = torch.randint(0, 1000, (p.max_tokens,)).tolist()
                ids[0] = int(np.random.randint(0, 1000))  # the V2 runner's draw for an unseeded request
                samples.append(types.SimpleNamespace(index=k, token_ids=ids, logprobs=None,
                                                     finish_reason="length"))
            out.append(types.SimpleNamespace(outputs=samples))
        return out


class _Req:
    def __init__(self, ids):
        self.prompt_ids = torch.tensor(ids)
        self.images = []


def _engine(monkeypatch) -> VLLMEngine:
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(SamplingParams=_Params))
    engine = object.__new__(VLLMEngine)  # no real vLLM behind it: only what generate() reads
    engine.llm, engine._asleep, engine._weights_current = _LLM(), set(), True
    engine.image_token_id, engine.eos_token_id, engine.tensor_parallel_size = None, 2, 1
    engine.mm_processor_kwargs, engine._forward_sleep = {}, False
    return engine


def test_requests_carry_no_seed_and_the_call_seed_fixes_the_samples(monkeypatch):
    engine = _engine(monkeypatch)
    requests = [_Req([1, 5, 7]), _Req([3, 4])]
    sampling = SamplingParams(n=3, temperature=0.7, top_p=0.99, max_tokens=6, seed=11)
    torch.manual_seed(0)
    np.random.seed(0)
    trainer_torch, trainer_np = torch.get_rng_state(), np.random.get_state()[1].copy()
    first = [c.response_ids for c in engine.generate(requests, sampling)]
    assert torch.equal(torch.get_rng_state(), trainer_torch)  # the trainer's streams are untouched
    assert np.array_equal(np.random.get_state()[1], trainer_np)
    reseeded = SamplingParams(**{**sampling.__dict__, "seed": 12})
    other = [c.response_ids for c in engine.generate(requests, reseeded)]
    torch.rand(3), np.random.rand(3)  # the trainer draws in between
    again = [c.response_ids for c in engine.generate(requests, sampling)]
    assert len(engine.llm.sent) == 3 * len(requests)
    assert all(p.seed is None for p in engine.llm.sent)
    assert again == first and other != first


def test_step_rng_seeds_and_restores():
    from rlcs_fast.rollout.vllm_engine import step_rng

    torch.manual_seed(1)
    before = torch.get_rng_state()
    with step_rng(5):
        a = torch.rand(4), np.random.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with step_rng(5):
        b = torch.rand(4), np.random.rand(4)
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with step_rng(None):  # no seed: the RNG as it is, restored after
        c = torch.rand(4)
    assert torch.equal(c, torch.rand(4))
