"""Every model family on the packed path: the packed forward equals the stock transformers model run one
sequence at a time (hidden states and log-probs, float32 and float64), on packed rows mixing several
images, images of different sizes and text-only rows; Qwen3-VL's DeepStack, interleaved mrope, learned
position table and patch-16 geometry included."""

from __future__ import annotations

import copy

import pytest
import torch

from rlcs_fast.attention import apply_attention
from rlcs_fast.families import FAMILIES, family_by_tiny_name, family_for
from rlcs_fast.packing import Sample, forward_hidden, mrope_positions, pack, unpack

FAMILY_TYPES = sorted(FAMILIES)


def make_sample(config, gen: torch.Generator, grids: list[list[int]], n_text: int) -> Sample:
    """Text, then each image framed by vision start/end and a little text after it."""
    rand = lambda k: torch.randint(0, 1000, (k,), generator=gen).tolist()  # noqa: E731
    merge = config.vision_config.spatial_merge_size
    ids = rand(n_text)
    for t, h, w in grids:
        ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge**2)
        ids += [config.vision_end_token_id] + rand(3)
    ids += rand(n_text)
    input_ids = torch.tensor(ids)
    target_mask = torch.zeros(len(ids), dtype=torch.bool)
    target_mask[len(ids) // 2:] = True
    grid = torch.tensor(grids) if grids else None
    dim = family_for(config).patch_dim(config.vision_config)
    pixels = torch.randn(int(grid.prod(-1).sum()), dim, generator=gen) if grids else None
    return Sample(input_ids, target_mask, mrope_positions(config, input_ids, grid), pixels, grid)


# rows of one packed batch: several images in a row, two sizes, text-only rows between them
ROWS = [[[1, 8, 4]], [], [[1, 4, 6], [1, 6, 4], [1, 4, 4]], [], [[1, 8, 8]]]


def build(model_type: str, dtype: torch.dtype):
    family = FAMILIES[model_type]
    config = family.tiny_config()
    torch.manual_seed(0)
    ref = family.model_class()(config).to(dtype).eval()
    packed = copy.deepcopy(ref)
    apply_attention(packed, "sdpa_packed")
    return config, ref, packed


def stock_one(ref, config, s: Sample, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states [T, H], log p(token t | <t) [T-1]) of a plain transformers call that computes
    its own positions (``get_rope_index`` from ``mm_token_type_ids``), mask and vision inputs."""
    kw = {}
    if s.pixel_values is not None:
        kw = dict(pixel_values=s.pixel_values.to(dtype), image_grid_thw=s.image_grid_thw,
                  mm_token_type_ids=(s.input_ids == config.image_token_id).int()[None])
    out = ref.model(input_ids=s.input_ids[None], use_cache=False, **kw)
    hidden = out.last_hidden_state[0]
    logits = hidden[:-1] @ ref.lm_head.weight.T
    return hidden, torch.log_softmax(logits, -1).gather(-1, s.input_ids[1:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_packed_forward_equals_stock_one_sequence_at_a_time(model_type: str, dtype: torch.dtype) -> None:
    config, ref, model = build(model_type, dtype)
    gen = torch.Generator().manual_seed(1)
    samples = [make_sample(config, gen, g, n_text=4 + 3 * i) for i, g in enumerate(ROWS)]
    batch = pack(samples, config.vision_config)
    batch.pixel_values = batch.pixel_values.to(dtype)
    with torch.no_grad():
        hidden = forward_hidden(model, batch)  # [L, H]
        logprobs = torch.log_softmax(hidden @ model.lm_head.weight.T, -1).gather(
            -1, batch.targets[:, None])[:, 0]
        want = [stock_one(ref, config, s, dtype) for s in samples]
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for i, (h, lp, (want_h, want_lp)) in enumerate(zip(unpack(hidden, batch), unpack(logprobs, batch), want)):
        torch.testing.assert_close(h, want_h, **tol, msg=f"hidden states of sequence {i}")
        torch.testing.assert_close(lp[:-1], want_lp, **tol, msg=f"log-probs of sequence {i}")


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_mrope_positions_match_the_familys_get_rope_index(model_type: str) -> None:
    family = FAMILIES[model_type]
    config = family.tiny_config()
    torch.manual_seed(0)
    model = family.model_class()(config)
    gen = torch.Generator().manual_seed(7)
    for grids in ([[1, 4, 6]], [[1, 8, 4], [1, 4, 4], [1, 6, 10]], [[1, 2, 2], [1, 2, 2]]):
        s = make_sample(config, gen, grids, n_text=3)
        types = (s.input_ids == config.image_token_id).int()[None]
        want, _ = model.model.get_rope_index(s.input_ids[None], mm_token_type_ids=types,
                                             image_grid_thw=torch.tensor(grids))
        torch.testing.assert_close(s.position_ids, want[:, 0], msg=str(grids))


def test_qwen3_vl_deepstack_reaches_the_packed_image_tokens() -> None:
    """DeepStack features land at the packed image positions: dropping them changes exactly the hidden
    states at and after image tokens of the rows that hold images, never a text-only row."""
    config, _, model = build("qwen3_vl", torch.float64)
    gen = torch.Generator().manual_seed(2)
    samples = [make_sample(config, gen, g, n_text=5) for g in ([], [[1, 4, 4]], [])]
    batch = pack(samples, config.vision_config)
    batch.pixel_values = batch.pixel_values.double()
    with torch.no_grad():
        full = forward_hidden(model, batch)
        lm = model.model.language_model
        original = lm._deepstack_process
        lm._deepstack_process = lambda hidden, mask, embeds: hidden
        try:
            without = forward_hidden(model, batch)
        finally:
            lm._deepstack_process = original
    changed = (full - without).abs().amax(-1) > 1e-12  # [L]
    first_image = int((batch.input_ids[0] == config.image_token_id).nonzero()[0])
    rows = unpack(changed, batch)
    assert not rows[0].any() and not rows[2].any()
    image_start = first_image - batch.seq_lens[0]
    assert not rows[1][:image_start].any() and rows[1][image_start:].all()


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_touch_vision_reaches_every_vision_parameter(model_type: str) -> None:
    """A text-only micro-batch's dummy vision pass gives every vision parameter (Qwen3-VL's DeepStack
    mergers and position table included) a zero gradient, so FSDP ranks stay in step."""
    config, _, model = build(model_type, torch.float32)
    gen = torch.Generator().manual_seed(9)
    batch = pack([make_sample(config, gen, [], 5), make_sample(config, gen, [], 9)], config.vision_config)
    plain = forward_hidden(model, batch, touch_vision=False)
    touched = forward_hidden(model, batch, touch_vision=True)
    torch.testing.assert_close(touched, plain, rtol=0, atol=0)
    touched.pow(2).sum().backward()
    vision = {n: p.grad for n, p in model.named_parameters() if n.startswith("model.visual.")}
    assert vision and all(g is not None and not g.any() for g in vision.values()), [
        n for n, g in vision.items() if g is None]


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_count_params_equals_the_built_model(model_type: str) -> None:
    family = FAMILIES[model_type]
    config = family.tiny_config()
    model = family.model_class()(config)
    text, vision = family.count_params(config)
    assert text + vision == sum(p.numel() for p in model.parameters())
    assert vision == sum(p.numel() for p in model.model.visual.parameters())
    layer, block = family.unit_params(config)
    assert layer == sum(p.numel() for p in model.model.language_model.layers[0].parameters())
    assert block == sum(p.numel() for p in model.model.visual.blocks[0].parameters())
    trained = family.vision_frozen_prefixes()
    assert family.merger_params(config.vision_config) == sum(
        p.numel() for n, p in model.model.visual.named_parameters() if n.startswith(trained))


def test_family_lookup() -> None:
    assert family_by_tiny_name("tiny").model_type == "qwen2_5_vl"
    assert family_by_tiny_name("tiny-qwen3-vl").model_type == "qwen3_vl"
    config = FAMILIES["qwen3_vl"].tiny_config()
    assert family_for(config) is family_for(config.vision_config) is family_for({"model_type": "qwen3_vl"})
    assert FAMILIES["qwen3_vl"].image_factor(config.vision_config) == 32
    assert FAMILIES["qwen2_5_vl"].image_factor(FAMILIES["qwen2_5_vl"].tiny_config().vision_config) == 28
    with pytest.raises(ValueError, match="qwen3_vl_moe.*supported"):
        family_for("qwen3_vl_moe")


@pytest.mark.slow
def test_stand_in_for_released_qwen3_vl_loads_with_the_real_token_ids(tmp_path) -> None:
    """The rehearsal's stand-in for Qwen/Qwen3-VL-4B-Instruct: the trainer loads it like the real one
    (family from config.json, processor, token ids), and a prompt with an image tokenizes to the real
    placeholder ids and runs through the packed forward."""
    from PIL import Image

    from rlcs_fast.families import build_stand_in
    from rlcs_fast.families.qwen3_vl import RELEASED
    from rlcs_fast.model import load_model, load_processor

    hub = RELEASED["4b"]
    path = str(build_stand_in(hub, tmp_path / "stand_in"))
    model, _ = load_model(path, attention="auto")
    processor = load_processor(path, min_pixels=64 * 64, max_pixels=128 * 128)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    config = model.config
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(config, key) == hub[key]
    assert config.text_config.vocab_size == 151936 and config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]) == [151643, 151645]
    content = [{"type": "image"}, {"type": "text", "text": "how many?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    assert not text.startswith("<|im_start|>system")  # Qwen3-VL's template: no default system turn
    enc = processor(text=[text], images=[Image.new("RGB", (64, 96), "white")], return_tensors="pt")
    ids = enc["input_ids"][0]
    assert int((ids == 151655).sum()) == 2 * 3 and 151652 in ids.tolist()  # 64x96 px: 2x3 tokens of 32 px
    grid = enc["image_grid_thw"]
    sample = Sample(ids, torch.ones_like(ids, dtype=torch.bool), mrope_positions(config, ids, grid),
                    enc["pixel_values"], grid)
    with torch.no_grad():
        hidden = forward_hidden(model, pack([sample], config.vision_config))
    assert hidden.shape == (ids.numel(), config.text_config.hidden_size) and torch.isfinite(hidden).all()


@pytest.mark.parametrize("model_type, side", [("qwen2_5_vl", 28), ("qwen3_vl", 32)])
def test_images_pre_resize_to_the_familys_merged_token(model_type: str, side: int) -> None:
    """Pre-resize to multiples of patch x merge (28 or 32), so the processor's own resize (trainer's and
    vLLM's) is the identity and both count the same image tokens."""
    from PIL import Image

    from rlcs_fast.data import Columns, Encoder

    family = FAMILIES[model_type]
    config = family.tiny_config()
    pixels = dict(min_pixels=side * side * 4, max_pixels=side * side * 64)
    processor = family.build_processor(**pixels)
    encoder = Encoder(processor, config, Columns("images", "problem", "answer"), template="{problem}",
                      system_prompt="", max_length=512, **pixels)
    raw = Image.new("RGB", (100, 150), "white")
    (image,) = encoder._images([raw])
    assert image.width % side == 0 and image.height % side == 0, image.size
    prompt = encoder.prompt({"images": [raw], "problem": "how many?", "answer": "1"})
    t, h, w = prompt.image_grid_thw[0].tolist()
    assert (h * family.image_factor(config.vision_config) // config.vision_config.spatial_merge_size,
            w * side // config.vision_config.spatial_merge_size) == (image.height, image.width)
    assert int((prompt.prompt_ids == config.image_token_id).sum()) == t * h * w // 4
