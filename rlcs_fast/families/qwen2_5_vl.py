"""Qwen2.5-VL (3B/7B/32B/72B): windowed ViT with full-attention blocks, patch 14, merge 2 (images pre-resize
to multiples of 28), RMSNorm merger, contiguous mrope sections. The tiny model is ``rlcs_fast.tiny``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from .base import ModelFamily

# The released Qwen/Qwen2.5-VL-{3B,7B}-Instruct config.json (as published). The recipe-config tests read
# them, and the rehearsal's tiny stand-ins take their token ids, vocabulary size and tying from here.
_VISION = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
           "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
           "window_size": 112,
           "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}
_COMMON = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
           "attention_dropout": 0.0,
           "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
           "vision_end_token_id": 151653,
           "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
           "hidden_act": "silu",
           "initializer_range": 0.02, "max_position_embeddings": 128000, "rms_norm_eps": 1e-06,
           "rope_theta": 1000000.0,
           "sliding_window": 32768, "use_sliding_window": False, "torch_dtype": "bfloat16", "use_cache": True,
           "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
RELEASED = {
    "3b": {**_COMMON, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
           "num_attention_heads": 16,
           "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
           "max_window_layers": 70, "vision_config": {**_VISION, "out_hidden_size": 2048}},
    "7b": {**_COMMON, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28,
           "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "max_window_layers": 28, "vision_config": {**_VISION, "out_hidden_size": 3584}},
}


class Qwen25VL(ModelFamily):
    model_type = "qwen2_5_vl"
    tiny_name = "tiny"
    model_class_name = "Qwen2_5_VLForConditionalGeneration"
    vision_attention_class_name = "Qwen2_5_VLVisionAttention"
    modeling_module = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
    released_pixels = (3136, 12845056)  # Qwen2.5-VL-*-Instruct preprocessor_config.json min/max_pixels

    def vision_kwargs(self, vision_config: Any, image_grid_thw: Tensor) -> dict[str, Any]:
        """Patch positions, per-frame segments and the window permutation with its segments, from
        transformers' own ``vision_utils``."""
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_position_ids,
            get_vision_window_index,
        )

        grid = image_grid_thw.cpu()
        merge = vision_config.spatial_merge_size
        cu_seqlens = get_vision_cu_seqlens(grid)
        window_index, cu_window_seqlens = get_vision_window_index(
            grid,
            spatial_merge_size=merge,
            window_size=vision_config.window_size,
            patch_size=vision_config.patch_size,
        )
        return {
            "image_position_ids": get_vision_position_ids(grid, merge),
            "image_cu_seqlens": cu_seqlens,
            "image_max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            "image_window_index": window_index,
            "image_cu_window_seqlens": cu_window_seqlens,
            "image_max_window_seqlen": int((cu_window_seqlens[1:] - cu_window_seqlens[:-1]).max()),
        }

    def unit_params(self, config: Any) -> tuple[int, int]:
        """(decoder layer, vision block) parameters, mirroring transformers' Qwen2.5-VL modules."""
        t, v = config.text_config, config.vision_config
        h, inter = t.hidden_size, t.intermediate_size
        hd = getattr(t, "head_dim", None) or h // t.num_attention_heads
        q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
        attn = (h * q + q) + 2 * (h * kv + kv) + q * h  # q/k/v carry biases, o_proj does not
        layer = attn + 3 * h * inter + 2 * h  # gated MLP without biases, two RMSNorms
        vh, vi = v.hidden_size, v.intermediate_size
        block = (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh) + 2 * vh
        return layer, block

    def count_params(self, config: Any) -> tuple[int, int]:
        """Mirrors the module shapes of transformers' Qwen2.5-VL."""
        t, v = config.text_config, config.vision_config
        layer, block = self.unit_params(config)
        text = t.vocab_size * t.hidden_size + t.num_hidden_layers * layer + t.hidden_size  # + final norm
        if not config.tie_word_embeddings:
            text += t.vocab_size * t.hidden_size  # lm_head
        patch_embed = self.patch_dim(v) * v.hidden_size  # Conv3d without bias
        vision = patch_embed + v.depth * block + self.merger_params(v)
        return text, vision

    def merger_params(self, v: Any) -> int:
        """The vision merger (RMSNorm + 2-layer MLP over 2x2 merged patches)."""
        vh = v.hidden_size
        merged = vh * v.spatial_merge_size**2
        return vh + (merged * merged + merged) + (merged * v.out_hidden_size + v.out_hidden_size)

    def tiny_config(self) -> Any:
        from ..tiny import tiny_config

        return tiny_config()

    def build_model(self, *, seed: int = 0) -> Any:
        from ..tiny import build_model

        return build_model(seed=seed)

    def build_processor(self, tokenizer: Any = None, *, min_pixels: int | None = None,
                        max_pixels: int | None = None) -> Any:
        from ..tiny import MAX_PIXELS, MIN_PIXELS, build_processor

        return build_processor(tokenizer, min_pixels=min_pixels or MIN_PIXELS,
                               max_pixels=max_pixels or MAX_PIXELS)

    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        from ..tiny import build_tiny

        return build_tiny(out_dir, seed=seed)

    def tiny_fingerprint_parts(self) -> tuple[str, ...]:
        from ..tiny import CHAT_TEMPLATE, MAX_PIXELS, MIN_PIXELS

        return (self.tiny_config().to_json_string(), CHAT_TEMPLATE, f"{MIN_PIXELS},{MAX_PIXELS}")


FAMILY = Qwen25VL()
