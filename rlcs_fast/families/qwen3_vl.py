"""Qwen3-VL dense (2B/4B/8B/32B), from transformers' ``qwen3_vl`` (5.20) and checked against it
(``tests/test_qwen3_vl.py``). What differs from Qwen2.5-VL, and where it is handled:

- text: QK-norm attention without biases, explicit ``head_dim``, and *interleaved* mrope (the T/H/W rows
  take every third rotary frequency, ``mrope_section`` [24, 20, 20]); the interleaving lives in the
  model's rotary embedding, the per-sequence [3, T] positions are the same numbers as Qwen2.5-VL's for
  images (``get_rope_index`` advances by max(h, w) after an image), so packing needs nothing new;
- DeepStack: the vision tower also returns merged features of blocks ``deepstack_visual_indexes``, which
  ``Qwen3VLTextModel`` adds to the hidden states of its first layers at the image-token positions
  (``visual_pos_masks = input_ids == image_token_id``). On a packed row those positions are the packed
  image tokens in sequence order, the same order the features are concatenated in (``pack`` keeps images
  in sequence order), so the stock forward lands them right; the test checks it against one sequence at
  a time;
- vision tower: no windows (one attention segment per frame), a learned 2-D position table
  (``num_position_embeddings``, 48×48 in the released models) bilinearly interpolated (align_corners)
  to each image's grid: precomputed here as ``image_interp_indices``/``image_interp_weights``;
- geometry: patch 16, merge 2, so images pre-resize to multiples of 32; the processor normalises with
  mean = std = 0.5 (Qwen2.5-VL: the CLIP constants);
- chat template: no default system turn (Qwen2.5-VL inserts "You are a helpful assistant."); token ids
  as Qwen2.5-VL (``<|image_pad|>`` 151655, ``<|vision_start|>`` 151652, ``<|vision_end|>`` 151653,
  ``<|im_end|>`` 151645).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import ModelFamily

# The released processor's normalisation (Qwen3-VL-*-Instruct preprocessor_config.json)
IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]
PATCH_SIZE, MERGE_SIZE = 16, 2
FACTOR = PATCH_SIZE * MERGE_SIZE
TINY_MIN_PIXELS = FACTOR * FACTOR * 4  # 4 merged image tokens at least
TINY_MAX_PIXELS = FACTOR * FACTOR * 256

# Qwen3-VL-Instruct's released chat template without tools, rewritten with the same output for the
# conversations rlcs_fast builds: a system turn only when given, `<|vision_start|><|image_pad|>
# <|vision_end|>` per image part, "Picture k: " with `add_vision_id`, `<|im_start|>assistant\n` with
# `add_generation_prompt`.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


# The released Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json (as published: rope keys in the legacy
# `rope_scaling`/`rope_theta` form, the vision config's model_type "qwen3_vl"). The planner's and the
# benchmarks' widths, and the rehearsal's tiny stand-ins take their token ids and geometry from here.
_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
              "vision_end_token_id": 151653}
_VISION_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
                 "deepstack_visual_indexes": [5, 11, 17]}
_VISION_8B = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
              "deepstack_visual_indexes": [8, 16, 24]}


def _released(hidden: int, inter: int, layers: int, heads: int, tied: bool, vision: dict) -> dict:
    text = {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "head_dim": 128, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
            "intermediate_size": inter, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
            "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                                    "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": tied, "use_cache": True, "vocab_size": 151936}
    return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", **_TOKEN_IDS,
            "tie_word_embeddings": tied, "text_config": text,
            "vision_config": {**vision, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3,
                              "initializer_range": 0.02, "model_type": "qwen3_vl", "num_heads": 16,
                              "num_position_embeddings": 2304, "out_hidden_size": hidden, "patch_size": 16,
                              "spatial_merge_size": 2, "temporal_patch_size": 2}}


RELEASED = {
    "2b": _released(2048, 6144, 28, 16, True, _VISION_SMALL),
    "4b": _released(2560, 9728, 36, 32, True, _VISION_SMALL),
    "8b": _released(4096, 12288, 36, 32, False, _VISION_8B),
}


class Qwen3VL(ModelFamily):
    model_type = "qwen3_vl"
    text_mask_mapping = False
    tiny_name = "tiny-qwen3-vl"
    model_class_name = "Qwen3VLForConditionalGeneration"
    vision_attention_class_name = "Qwen3VLVisionAttention"
    modeling_module = "transformers.models.qwen3_vl.modeling_qwen3_vl"
    released_pixels = (65536, 16777216)  # Qwen3-VL-*-Instruct preprocessor_config.json size

    def vision_kwargs(self, vision_config: Any, image_grid_thw: Tensor) -> dict[str, Any]:
        """Patch positions (for the 2-D rotary), per-frame segments, and the bilinear taps that resample
        the learned position table to each image's grid (``Qwen3VLVisionModel`` computes the same with
        ``mode="bilinear", align_corners=True``)."""
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        grid = image_grid_thw.cpu()
        merge = vision_config.spatial_merge_size
        cu_seqlens = get_vision_cu_seqlens(grid)
        indices, weights = get_vision_interpolation_indices_and_weights(
            grid,
            num_grid_per_side=int(vision_config.num_position_embeddings**0.5),
            mode="bilinear",
            align_corners=True,
            spatial_merge_size=merge,
        )
        return {
            "image_position_ids": get_vision_position_ids(grid, merge),
            "image_cu_seqlens": cu_seqlens,
            "image_max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            "image_interp_indices": indices,
            "image_interp_weights": weights,
        }

    def vision_frozen_prefixes(self) -> tuple[str, ...]:
        return ("merger.", "deepstack_merger_list.")

    def unit_params(self, config: Any) -> tuple[int, int]:
        """(decoder layer, vision block) parameters, mirroring transformers' Qwen3-VL (dense) modules."""
        t, v = config.text_config, config.vision_config
        h, inter = t.hidden_size, t.intermediate_size
        hd = getattr(t, "head_dim", None) or h // t.num_attention_heads
        q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
        bias = bool(getattr(t, "attention_bias", False))
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if bias else 0) + 2 * hd  # + q_norm, k_norm
        layer = attn + 3 * h * inter + 2 * h  # gated MLP without biases, two RMSNorms
        vh, vi = v.hidden_size, v.intermediate_size
        block = (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + (vh * vi + vi) + (vi * vh + vh) + 4 * vh  # 2 LNs
        return layer, block

    def count_params(self, config: Any) -> tuple[int, int]:
        """Mirrors the module shapes of transformers' Qwen3-VL (dense)."""
        t, v = config.text_config, config.vision_config
        layer, block = self.unit_params(config)
        text = t.vocab_size * t.hidden_size + t.num_hidden_layers * layer + t.hidden_size
        if not config.tie_word_embeddings:
            text += t.vocab_size * t.hidden_size
        patch_embed = self.patch_dim(v) * v.hidden_size + v.hidden_size  # Conv3d with bias
        pos_embed = v.num_position_embeddings * v.hidden_size  # the learned position table
        vision = patch_embed + pos_embed + v.depth * block + self.merger_params(v)
        return text, vision

    def merger_params(self, v: Any) -> int:
        """The merger (LayerNorm over patches, then a 2-layer MLP over 2x2 merged patches) and one
        DeepStack merger per ``deepstack_visual_indexes`` entry (LayerNorm after the merge)."""
        vh = v.hidden_size
        merged = vh * v.spatial_merge_size**2
        mlp = (merged * merged + merged) + (merged * v.out_hidden_size + v.out_hidden_size)
        return (2 * vh + mlp) + len(v.deepstack_visual_indexes) * (2 * merged + mlp)

    # --- tiny model ---------------------------------------------------------------------------------
    def tiny_config(self, *, vocab_size: int | None = None, token_ids: dict[str, int] | None = None,
                    tie_word_embeddings: bool = True) -> Any:
        """A small Qwen3-VL: QK-norm GQA with explicit head_dim, interleaved mrope, a 3-block ViT with
        learned interpolated position table and two DeepStack levels, at CPU size."""
        from transformers import Qwen3VLConfig

        from ..tiny import SPECIAL_IDS, VOCAB_SIZE

        ids = token_ids or {
            "image": SPECIAL_IDS["<|image_pad|>"], "video": SPECIAL_IDS["<|video_pad|>"],
            "vision_start": SPECIAL_IDS["<|vision_start|>"], "vision_end": SPECIAL_IDS["<|vision_end|>"],
            "bos": SPECIAL_IDS["<|endoftext|>"], "eos": SPECIAL_IDS["<|im_end|>"],
            "pad": SPECIAL_IDS["<|endoftext|>"],
        }
        hidden = 128
        return Qwen3VLConfig(
            text_config=dict(
                vocab_size=vocab_size or VOCAB_SIZE,
                hidden_size=hidden,
                intermediate_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                max_position_embeddings=4096,
                rms_norm_eps=1e-6,
                # sections sum to head_dim / 2 as [24, 20, 20] does for the released head_dim 128
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True},
                tie_word_embeddings=tie_word_embeddings,
                bos_token_id=ids["bos"],
                eos_token_id=ids["eos"],
                pad_token_id=ids["pad"],
            ),
            vision_config=dict(
                depth=3,
                hidden_size=64,
                intermediate_size=128,
                num_heads=2,
                out_hidden_size=hidden,
                patch_size=PATCH_SIZE,
                spatial_merge_size=MERGE_SIZE,
                temporal_patch_size=2,
                num_position_embeddings=64,  # an 8x8 table: the synthetic 96-px images (6x6) interpolate
                deepstack_visual_indexes=[0, 1],
                # from scratch, as the tiny Qwen2.5-VL's ViT (rlcs_fast/tiny.py says why 0.1)
                initializer_range=0.1,
            ),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
            tie_word_embeddings=tie_word_embeddings,
        )

    def build_processor(self, tokenizer: Any = None, *, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> Any:
        """The stock Qwen3-VL processor (Qwen2-VL image processor at patch 16 / merge 2 with the
        released mean/std, the Qwen3-VL video processor) around the tiny tokenizer."""
        from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

        from ..tiny import build_tokenizer

        tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        size = {"shortest_edge": min_pixels or TINY_MIN_PIXELS, "longest_edge": max_pixels or TINY_MAX_PIXELS}
        image_processor = Qwen2VLImageProcessor(
            size=size, patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
            image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        video_processor = Qwen3VLVideoProcessor(patch_size=PATCH_SIZE, merge_size=MERGE_SIZE,
                                                image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
        return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                video_processor=video_processor, chat_template=CHAT_TEMPLATE)

    def build_model(self, *, seed: int = 0, config: Any = None):
        from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

        config = config if config is not None else self.tiny_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen3VLForConditionalGeneration(config)
        t = config.text_config
        model.generation_config = GenerationConfig(
            bos_token_id=t.bos_token_id, eos_token_id=[t.eos_token_id, t.pad_token_id],
            pad_token_id=t.pad_token_id)
        return model

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.build_model(seed=seed).save_pretrained(out_dir)
        self.build_processor().save_pretrained(out_dir)
        return out_dir

    def tiny_fingerprint_parts(self) -> tuple[str, ...]:
        return (self.tiny_config().to_json_string(), CHAT_TEMPLATE,
                f"{TINY_MIN_PIXELS},{TINY_MAX_PIXELS}", json.dumps([IMAGE_MEAN, IMAGE_STD]))


FAMILY = Qwen3VL()
