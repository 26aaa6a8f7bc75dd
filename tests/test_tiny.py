"""The offline tiny Qwen2.5-VL: tokenizer, chat template, stock processor, weights, cache."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from rlcs_fast import tiny
from rlcs_fast.synthetic import synthetic_dataset
from rlcs_fast.tiny import BASE_VOCAB, SPECIAL_IDS, SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return tiny.build_processor(tokenizer)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny.tiny_path(seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _image(side: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_tokenizer_ids_and_specials(tokenizer):
    base = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    assert sorted(base.values()) == list(range(BASE_VOCAB))
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == SPECIAL_IDS
    assert len(tokenizer) == BASE_VOCAB + len(SPECIAL_TOKENS) <= tiny.tiny_config().text_config.vocab_size
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == SPECIAL_IDS["<|im_end|>"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == SPECIAL_IDS["<|endoftext|>"]
    # a special token in text is one id, never split into bytes
    ids = tokenizer("a<|image_pad|>b<|im_end|>")["input_ids"]
    assert SPECIAL_IDS["<|image_pad|>"] in ids and SPECIAL_IDS["<|im_end|>"] in ids
    assert all(i < BASE_VOCAB for i in ids if i not in SPECIAL_IDS.values())


def test_tokenizer_is_deterministic(tokenizer):
    assert tiny.build_tokenizer().backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


@pytest.mark.parametrize(
    "text",
    [
        "<image>How many red shapes are in the image?",
        "<think>I look for red shapes. Counting them: 1, 2, 3. So there are 3 red shapes.</think> "
        "The answer is \\boxed{3}.",
        "$\\frac{3}{4} + \\sqrt{16} = 4.75$, so \\boxed{\\frac{19}{4}}.",
        "Unicode: café, naïve, 東京, emoji 🙂, tabs\tand\nnew lines.\n\n",
        "   leading spaces and trailing   ",
    ],
)
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert max(ids) < BASE_VOCAB  # byte-level: any text encodes with base tokens only


def test_task_text_is_compressed(tokenizer):
    # the BPE saw the task vocabulary: its words are single tokens, so rollouts stay short
    for word in [" red", " green", " blue", " yellow", " shapes", " answer", " Counting"]:
        assert len(tokenizer(word)["input_ids"]) == 1, word


def test_chat_template_matches_qwen25vl(processor):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are in the image?"}],
        }
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many shapes are in the image?"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        expected
    )
    no_prompt = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert no_prompt == expected.removesuffix("<|im_start|>assistant\n")


def test_chat_template_system_string_content_and_vision_ids(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        },
        {"role": "assistant", "content": "Yes."},
    ]
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    assert processor.apply_chat_template(messages, tokenize=False) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{pad}{pad}Same?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    labelled = processor.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert f"Picture 1: {pad}Picture 2: {pad}Same?" in labelled


@pytest.mark.parametrize("side,grid", [(84, 6), (112, 8)])
def test_processor_image_tokens(processor, side, grid):
    image_pad = SPECIAL_IDS["<|image_pad|>"]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    enc = processor(text=[text], images=[_image(side)], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, grid, grid]]
    t, h, w = enc["image_grid_thw"][0].tolist()
    # one pad token per merged 2×2 patch group, and one 3·2·14·14 row per patch
    assert int((enc["input_ids"] == image_pad).sum()) == t * h * w // 4 == (side // 28) ** 2
    assert tuple(enc["pixel_values"].shape) == (t * h * w, 3 * 2 * 14 * 14)
    assert torch.equal(enc["mm_token_type_ids"], (enc["input_ids"] == image_pad).long())


def test_processor_pixel_bounds(processor):
    # min/max pixels hold: a big image is shrunk to at most 256 tokens, a small one grown to at least 4
    for side, lo, hi in [(640, 1, tiny.MAX_PIXELS // 28**2), (20, tiny.MIN_PIXELS // 28**2, 16)]:
        grid = processor.image_processor(images=[_image(side)], return_tensors="pt")["image_grid_thw"]
        assert lo <= int(grid.prod()) // 4 <= hi, (side, grid)


def test_tiny_dir_loads_and_generates(tiny_dir):
    files = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= files
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    loaded_tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert loaded_tokenizer.eos_token_id == SPECIAL_IDS["<|im_end|>"]
    assert loaded_tokenizer.chat_template == processor.chat_template == tiny.CHAT_TEMPLATE
    assert processor.image_processor.size["longest_edge"] == tiny.MAX_PIXELS

    row = synthetic_dataset("rl", "val", 1)[0]
    question = row["problem"].replace("<image>", "")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=row["images"], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
        # the saved weights are exactly the seeded ones: same logits as a fresh in-memory build
        loaded = model(**enc).logits
        fresh = tiny.build_model(seed=0).eval()(**enc).logits
    new = out[0, enc["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 6 and int(new.max()) < len(processor.tokenizer)
    assert torch.equal(loaded, fresh)


def test_weights_deterministic_per_seed(tmp_path):
    a = (tiny.build_tiny(tmp_path / "a", seed=0) / "model.safetensors").read_bytes()
    b = (tiny.build_tiny(tmp_path / "b", seed=0) / "model.safetensors").read_bytes()
    c = (tiny.build_tiny(tmp_path / "c", seed=1) / "model.safetensors").read_bytes()
    assert a == b and a != c


def test_build_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_model(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_path_caches(tmp_path, monkeypatch):
    first = tiny.tiny_path(seed=3, cache_dir=tmp_path)
    assert first.name.startswith("tiny-v") and first.name.endswith("-s3")
    monkeypatch.setattr(tiny, "build_tiny", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert tiny.tiny_path(seed=3, cache_dir=tmp_path) == first
    monkeypatch.setenv("RLCS_CACHE", str(tmp_path))
    assert tiny.tiny_path(seed=3) == first


def test_tiny_path_loses_race_cleanly(tmp_path, monkeypatch):
    # another rank publishes its complete copy while this one builds: ours is dropped, theirs is used
    real_build = tiny.build_tiny

    def build_and_get_overtaken(out_dir, *, seed):
        real_build(out_dir, seed=seed)
        final = tmp_path / out_dir.name[1:].rsplit(".", 1)[0]
        real_build(final, seed=seed)
        (final / "winner").touch()
        return out_dir

    monkeypatch.setattr(tiny, "build_tiny", build_and_get_overtaken)
    path = tiny.tiny_path(seed=0, cache_dir=tmp_path)
    assert (path / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary directory left behind
