"""The loop's use of the rollout engine, proven with `FakeEngine` (vLLM's state machine over a real tiny
model), and the vLLM request builder checked against the trainer's processor.

Properties a user relies on: every GRPO step pushes the *current* policy weights into the engine before
it generates (bit-identical to the policy after the previous update), in vLLM's order (wake weights →
push → KV cache → prefix-cache reset → generate → sleep); a loop that forgot the push cannot run; what
vLLM receives for an image prompt expands to exactly the tokens, grid and pixels the trainer trains on.
The GPU tests run the real vLLM engine (multimodal, sleep memory) and skip without CUDA and vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fake_engine import FakeEngine, tensor_checksum
from PIL import Image
from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

import rlcs_fast.grpo as grpo
import rlcs_fast.stage as stage_module
from rlcs_fast import train
from rlcs_fast.checkpointer import Checkpointer
from rlcs_fast.config import DataConfig
from rlcs_fast.data import Columns, Encoder
from rlcs_fast.model import load_processor
from rlcs_fast.rollout.engine import SamplingParams
from rlcs_fast.rollout.vllm_engine import check_alloc_conf, collapse_image_pads, vllm_prompt, vllm_weight_name
from rlcs_fast.stage import StageContext
from rlcs_fast.tiny import SPECIAL_IDS, tiny_path
from rlcs_fast.trainer_utils import iter_full_weights, release_cached_memory

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
IMAGE_PAD = SPECIAL_IDS["<|image_pad|>"]
EOS, PAD = SPECIAL_IDS["<|im_end|>"], SPECIAL_IDS["<|endoftext|>"]
SMALL = ["--log.progress", "false", "--run.stages", '["grpo"]', "--data.synthetic_train_size", "16",
         "--data.synthetic_val_size", "2", "--grpo.rollout_batch_size", "2", "--grpo.mini_batch_size", "2",
         "--grpo.n", "2", "--grpo.max_response_length", "6", "--reward.num_workers", "1", "--grpo.steps", "2",
         "--kernels.impl", "torch",  # in-process, TRITON_INTERPRET is on: the interpreter would be slow
         "--grpo.epochs", "1", "--grpo.val_before_train", "true"]  # one update per step; val at step 0
SYNC = ["wake_up(weights)", "load_weights", "wake_up(kv_cache)", "reset_prefix_cache", "generate", "sleep(2)"]


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


# --- the request vLLM gets ---------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[(84, 84)], [(100, 37)], [(600, 300)], [(20, 20)], [(112, 56), (70, 140)]])
def test_vllm_request_expands_to_trainer_tokens_and_pixels(sizes):
    """vLLM's Qwen2-VL processor replaces each single `<|image_pad|>` of a token prompt by
    grid.prod() // merge**2 pads of the image its HF image processor sees with `mm_processor_kwargs`
    mapped to `size` (vllm/model_executor/models/qwen2_vl.py); emulated here with a fresh processor."""
    min_pixels, max_pixels = 28 * 28 * 8, 28 * 28 * 32  # not the tiny processor's defaults
    path = tiny_path()
    trainer_proc = load_processor(str(path), min_pixels=min_pixels, max_pixels=max_pixels)
    encoder = Encoder(trainer_proc, AutoConfig.from_pretrained(path), Columns(),
                      template=DataConfig().prompt_template,
                      system_prompt="", min_pixels=min_pixels, max_pixels=max_pixels, max_length=4096)
    images = [_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    prompt = encoder.prompt({"images": images, "problem": "What is shown?", "answer": "3"})

    req = vllm_prompt(prompt.prompt_ids.tolist(), prompt.images, image_token_id=IMAGE_PAD,
                      mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels})
    assert req["prompt_token_ids"].count(IMAGE_PAD) == len(images)  # one pad per image, not the run
    assert req["mm_processor_kwargs"] == {"min_pixels": min_pixels, "max_pixels": max_pixels}
    sent = req["multi_modal_data"]["image"]
    assert [im.size for im in sent] == [im.size for im in prompt.images]

    engine_side = AutoProcessor.from_pretrained(path).image_processor
    kw = req["mm_processor_kwargs"]
    feats = engine_side(images=sent,
                        size={"shortest_edge": kw["min_pixels"], "longest_edge": kw["max_pixels"]},
                        return_tensors="pt")
    merge = engine_side.merge_size ** 2
    expanded, k = [], 0
    for t in req["prompt_token_ids"]:
        if t == IMAGE_PAD:
            expanded += [IMAGE_PAD] * (int(feats["image_grid_thw"][k].prod()) // merge)
            k += 1
        else:
            expanded.append(t)
    assert expanded == prompt.prompt_ids.tolist()
    assert torch.equal(feats["image_grid_thw"], prompt.image_grid_thw)
    torch.testing.assert_close(feats["pixel_values"], prompt.pixel_values, atol=0, rtol=0)


def test_request_builder_edge_cases():
    assert collapse_image_pads([1, IMAGE_PAD, IMAGE_PAD, 2, IMAGE_PAD, 3],
                               IMAGE_PAD) == [1, IMAGE_PAD, 2, IMAGE_PAD, 3]
    assert vllm_prompt([5, 6], [], image_token_id=IMAGE_PAD) == {"prompt_token_ids": [5, 6]}
    assert vllm_prompt([5, 6], [], image_token_id=None) == {"prompt_token_ids": [5, 6]}  # text-only model
    with pytest.raises(AssertionError, match="runs in the prompt"):
        vllm_prompt([1, IMAGE_PAD, IMAGE_PAD], [_image(28, 28, 0)] * 2, image_token_id=IMAGE_PAD)
    with pytest.raises(AssertionError, match="no images"):
        vllm_prompt([1, IMAGE_PAD], [], image_token_id=IMAGE_PAD)
    wrapped = "model.language_model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert vllm_weight_name(wrapped) == "model.language_model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("conf",
                         ["expandable_segments:True", "max_split_size_mb:64, expandable_segments:true"])
def test_sleep_mode_refuses_expandable_segments(conf):
    with pytest.raises(ValueError, match="expandable_segments"):
        check_alloc_conf({"PYTORCH_CUDA_ALLOC_CONF": conf})
    check_alloc_conf({"PYTORCH_CUDA_ALLOC_CONF": conf.replace("rue", "alse").replace("Talse", "False")})
    check_alloc_conf({})


# --- the fake engine's state machine -----------------------------------------------------------------

@pytest.fixture
def fake():
    engine = FakeEngine(str(tiny_path()), eos_token_id=EOS, pad_token_id=PAD, batch_size=8)
    yield engine
    engine.shutdown()


def _requests(n: int = 2):
    class Req:
        def __init__(self, ids):
            self.prompt_ids, self.pixel_values, self.image_grid_thw, self.images = ids, None, None, []

    g = torch.Generator().manual_seed(0)
    return [Req(torch.randint(0, 900, (5,), generator=g)) for _ in range(n)]


def test_fake_engine_enforces_vllm_state_machine(fake):
    weights = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path(),
                                                                 dtype=torch.float32).state_dict()
    reqs, greedy = _requests(), SamplingParams(temperature=0, max_tokens=4)
    assert fake.calls == ["sleep(2)"] and fake.memory_gb() == 0.0  # born asleep, weights freed
    with pytest.raises(RuntimeError, match="cached allocator blocks"):
        fake.wake_up()
    with pytest.raises(RuntimeError, match="without a weight push"):
        release_cached_memory()
        fake.wake_up()
        fake.generate(reqs, greedy)
    fake.load_weights(iter(weights.items()))
    before = [c.response_ids for c in fake.generate(reqs, greedy)]
    assert all(t != 0 for ids in before for t in ids)  # real tokens, not argmax of NaN logits
    fake.sleep()
    with pytest.raises(RuntimeError, match="sleeping"):
        fake.generate(reqs, greedy)
    with pytest.raises(RuntimeError, match="sleeping"):
        fake.load_weights(iter(weights.items()))
    with pytest.raises(RuntimeError, match="cached allocator blocks"):  # released before the sleep: stale
        fake.wake_up()
    release_cached_memory()
    fake.wake_up()
    with pytest.raises(RuntimeError, match="without a weight push"):
        fake.generate(reqs, greedy)
    partial = [(k, v.clone()) for k, v in weights.items()][1:]
    with pytest.raises(RuntimeError, match="partial push"):
        fake.load_weights(iter(partial))
    with pytest.raises(RuntimeError, match="without a weight push"):
        fake.generate(reqs, greedy)
    full = [(k, v.clone()) for k, v in weights.items()]
    fake.load_weights(iter(full))
    assert fake.pushes[-1] == {k: tensor_checksum(v) for k, v in full}
    assert [c.response_ids for c in fake.generate(reqs, greedy)] == before  # real outputs again
    assert fake.memory_gb() > 0
    fake.sleep()
    assert fake.memory_gb() == 0.0
    with pytest.raises(RuntimeError, match="second sleep-mode engine"):
        FakeEngine(str(tiny_path()), eos_token_id=EOS, pad_token_id=PAD, batch_size=8)


# --- the GRPO loop with the fake engine --------------------------------------------------------------

def _run_grpo(tmp_path: Path, engines: list, *extra: str) -> int:
    engines.append(FakeEngine(str(tiny_path()), batch_size=8, eos_token_id=EOS, pad_token_id=PAD))
    return train.main(["--cfg", CONFIG, "--run.dir", str(tmp_path / "run"), *SMALL, *extra],
                      engine=engines[-1])


def _checksums(model: torch.nn.Module) -> dict[str, str]:
    return {k: tensor_checksum(v) for k, v in iter_full_weights(model)}


@pytest.mark.slow
def test_grpo_loop_pushes_current_weights_each_step(tmp_path, monkeypatch):
    updated: list[dict[str, str]] = []  # the policy's weights after each optimizer update
    initial: list[dict[str, str]] = []
    real_update, real_resume = grpo.update, Checkpointer.resume

    def resume(self):
        out = real_resume(self)
        initial.append(_checksums(self.ctx.policy.model))
        return out

    def update(ctx, *args, **kwargs):
        out = real_update(ctx, *args, **kwargs)
        updated.append(_checksums(ctx.policy.model))
        return out

    monkeypatch.setattr(Checkpointer, "resume", resume)
    monkeypatch.setattr(grpo, "update", update)
    engines: list[FakeEngine] = []
    assert _run_grpo(tmp_path, engines) == 0
    (fake,) = engines

    # validation at step 0, steps 1 and 2, validation at the end: each one full sync cycle; then shut down
    assert fake.calls == ["sleep(2)"] + SYNC * 4 + ["shutdown"]
    assert len(updated) == 2 and len(initial) == 1
    assert fake.pushes == [initial[0], initial[0], updated[0], updated[1]]
    assert updated[0] != initial[0] and updated[1] != updated[0]  # the updates did change the weights

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["stage"] == "grpo" and "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["mem/vllm_awake_gb"] > 0 and r["mem/vllm_asleep_gb"] == 0.0 and r["time/sync"] > 0


@pytest.mark.slow
def test_grpo_loop_that_forgets_the_push_fails(tmp_path, monkeypatch):
    def sync_without_push(self):
        engine = self.engine
        release_cached_memory()
        engine.wake_up()
        return engine

    monkeypatch.setattr(StageContext, "sync_engine", sync_without_push)
    with pytest.raises(RuntimeError, match="without a weight push"):
        _run_grpo(tmp_path, [])


def test_grpo_loop_that_keeps_the_allocator_cache_before_a_wake_fails(tmp_path, monkeypatch):
    """On a GPU the wake after the first update runs out of memory: the cache holds the training peak."""
    monkeypatch.setattr(stage_module, "release_cached_memory", lambda: None)
    with pytest.raises(RuntimeError, match="cached allocator blocks"):
        _run_grpo(tmp_path, [])


@pytest.mark.slow
def test_sft_then_grpo_share_one_engine(tmp_path, monkeypatch):
    """vLLM allows one sleep-mode engine per process: SFT's validation engine is the one GRPO uses, and
    the run shuts it down at the end."""
    engines: list[FakeEngine] = []
    two_stages = ["--run.stages", '["sft", "grpo"]', "--sft.steps", "1", "--sft.global_batch_size", "2",
                  "--sft.val_generate", "true", "--grpo.val_before_train", "false"]
    assert _run_grpo(tmp_path, engines, *two_stages) == 0
    (fake,) = engines
    # SFT's validation, GRPO's steps 1 and 2, GRPO's final validation
    assert fake.calls == ["sleep(2)"] + SYNC * 4 + ["shutdown"]
    assert FakeEngine._live is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["stage"] == "sft" and "val/accuracy" in r for r in rows)
    assert [r["step"] for r in rows if r["stage"] == "grpo" and "train/loss" in r] == [1, 2]


# --- the real engine on a GPU ------------------------------------------------------------------------

def _gpu_engine_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("vllm")


@pytest.mark.gpu
def test_vllm_multimodal_rollout_matches_hf_engine_greedy():
    _gpu_engine_or_skip()
    from rlcs_fast.rollout.hf_engine import HFEngine
    from rlcs_fast.rollout.vllm_engine import VLLMEngine

    path = tiny_path()
    min_pixels, max_pixels = DataConfig().min_pixels, DataConfig().max_pixels
    encoder = Encoder(load_processor(str(path), min_pixels=min_pixels, max_pixels=max_pixels),
                      AutoConfig.from_pretrained(path), Columns(), template=DataConfig().prompt_template,
                      system_prompt="", min_pixels=min_pixels, max_pixels=max_pixels, max_length=4096)
    prompts = [encoder.prompt({"images": [_image(w, h, i)], "problem": "Count.", "answer": "1"})
               for i, (w, h) in enumerate([(84, 84), (112, 56), (200, 90)])]
    hf = HFEngine(str(path), device=torch.device("cuda"), batch_size=8, eos_token_id=EOS, pad_token_id=PAD)
    engine = VLLMEngine(str(path), gpu_memory_utilization=0.2, max_model_len=1024, enforce_eager=True,
                        eos_token_id=EOS, min_pixels=min_pixels, max_pixels=max_pixels)
    assert engine.asleep == {"weights", "kv_cache"} and engine.memory_gb() == 0.0
    engine.wake_up()
    engine.load_weights(iter_full_weights(hf.model, torch.bfloat16))
    awake = engine.memory_gb()
    greedy = SamplingParams(temperature=0, max_tokens=8, banned_token_ids=(IMAGE_PAD,))
    got = [c.response_ids[:4] for c in engine.generate(prompts, greedy)]
    want = [c.response_ids[:4] for c in hf.generate(prompts, greedy)]
    assert got == want  # bf16 on both sides; the first tokens only, later ones may flip on near-ties
    engine.sleep()
    assert awake > 0 and engine.memory_gb() == 0.0  # level 2: weights and KV cache released
