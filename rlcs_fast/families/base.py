"""The interface a model family implements, with what the Qwen vision-language families share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class ModelFamily(ABC):
    """One multimodal architecture. Subclasses set the class attributes and implement
    ``vision_kwargs``, ``count_params`` / ``merger_params`` and the tiny model."""

    model_type: str = ""  # config.json's model_type
    tiny_name: str = ""  # `model.path` value of the offline tiny model
    model_class_name: str = ""  # the transformers class (…ForConditionalGeneration)
    vision_attention_class_name: str = ""  # patched by rlcs_fast.attention for one varlen call
    modeling_module: str = ""  # transformers.models.<name>.modeling_<name>
    # the text model takes a per-layer-type mask mapping as already built (Qwen2.5-VL's does; Qwen3-VL's
    # text model always builds its mask from the positions, one host read per forward)
    text_mask_mapping: bool = True

    # --- model classes ------------------------------------------------------------------------------
    def _modeling(self):
        import importlib

        return importlib.import_module(self.modeling_module)

    def model_class(self) -> type:
        return getattr(self._modeling(), self.model_class_name)

    def vision_attention_class(self) -> type:
        return getattr(self._modeling(), self.vision_attention_class_name)

    # --- token ids and image geometry ---------------------------------------------------------------
    def token_ids(self, config: Any) -> dict[str, int]:
        """The vision placeholder ids, from the model's config (HF object or config.json dict)."""
        get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
        return {k: int(get(f"{k}_token_id")) for k in ("image", "video", "vision_start", "vision_end")}

    def image_factor(self, vision_config: Any) -> int:
        """Side in pixels of one merged image token: images pre-resize to multiples of it."""
        return int(vision_config.patch_size) * int(vision_config.spatial_merge_size)

    def patch_dim(self, vision_config: Any) -> int:
        """Values per vision patch (one row of ``pixel_values``): channels x temporal patch x side²."""
        v = vision_config
        return v.in_channels * v.temporal_patch_size * v.patch_size**2

    def smallest_image(self, vision_config: Any) -> tuple[Tensor, Tensor]:
        """(zero pixels [merge², patch_dim], grid [[1, merge, merge]]): the smallest image, one token."""
        merge = vision_config.spatial_merge_size
        return torch.zeros(merge * merge, self.patch_dim(vision_config)), torch.tensor([[1, merge, merge]])

    # --- positions ----------------------------------------------------------------------------------
    def mrope_positions(self, model_config: Any, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
        """3-D rope positions of one sequence → [3, T] int64 (images only).

        The same numbers as the family's ``get_rope_index`` (transformers 5.x) on one unpadded sequence,
        vectorised: text tokens count up by one; an image of LLM grid (t, h, w) placed at position p gets
        (p + t_i, p + h_i, p + w_i) and the text after it continues at p + max(h, w). Qwen2.5-VL and
        Qwen3-VL agree on images (they differ on video timestamps, which rlcs_fast does not take); how
        the three rows are laid over the rotary frequencies (Qwen2.5-VL's contiguous sections,
        Qwen3-VL's interleaving) is the model's rotary embedding's business, not the positions'.
        Images are matched to ``image_grid_thw`` rows in order by their token count (t·h·w / merge²),
        so adjacent images need no separator."""
        input_ids = input_ids.reshape(-1)
        n = input_ids.numel()
        device = input_ids.device
        is_image = input_ids == model_config.image_token_id
        if (input_ids == model_config.video_token_id).any():
            raise ValueError("video inputs are not supported by rlcs_fast packing (images only)")
        if image_grid_thw is None or image_grid_thw.numel() == 0:
            if is_image.any():
                raise ValueError(f"{int(is_image.sum())} <|image_pad|> tokens but no image_grid_thw")
            return torch.arange(n, device=device).expand(3, n).clone()

        merge = model_config.vision_config.spatial_merge_size
        grid = image_grid_thw.to(device=device, dtype=torch.long).reshape(-1, 3)
        t, h, w = grid[:, 0], grid[:, 1] // merge, grid[:, 2] // merge  # LLM grid of each image
        tokens = t * h * w  # [I] image tokens per image
        cum_tokens = torch.cumsum(tokens, 0)  # [I]
        if int(cum_tokens[-1]) != int(is_image.sum()):
            raise ValueError(
                f"{int(is_image.sum())} <|image_pad|> tokens but image_grid_thw {grid.tolist()} needs "
                f"{int(cum_tokens[-1])} (t·h·w/{merge * merge} per image)"
            )
        advance = torch.maximum(h, w)  # text position advance of each image
        cum_advance = torch.cat([advance.new_zeros(1), torch.cumsum(advance, 0)])  # [I+1]

        is_text = ~is_image
        text_before = torch.cumsum(is_text.long(), 0) - is_text.long()  # text tokens strictly before i
        image_before = torch.cumsum(is_image.long(), 0) - is_image.long()  # image tokens strictly before i
        # Index of the image a token is in (image tokens) or of the images already finished (text tokens).
        image_idx = torch.searchsorted(cum_tokens, image_before, right=True)  # [T]
        start = text_before + cum_advance[image_idx]  # position where the current run starts
        pos = start.expand(3, n).clone()

        img_idx = image_idx[is_image]  # [N_img]
        local = image_before[is_image] - (cum_tokens - tokens)[img_idx]  # index inside its image
        hw, wi = (h * w)[img_idx], w[img_idx]
        offsets = torch.stack([local // hw, (local // wi) % h[img_idx], local % wi])  # [3, N_img] (t, h, w)
        pos[:, is_image] = start[is_image] + offsets
        return pos

    # --- vision tower -------------------------------------------------------------------------------
    @abstractmethod
    def vision_kwargs(self, vision_config: Any, image_grid_thw: Tensor) -> dict[str, Any]:
        """The ViT's data-dependent inputs for ``image_grid_thw``, computed on the host and named as
        ``get_image_features`` accepts them precomputed (``image_*``)."""

    def dummy_vision_output(self, visual: nn.Module, device: torch.device) -> Tensor:
        """Sum of every output of the vision tower (merged tokens and, where the family has them, the
        DeepStack features) on one smallest image of zeros: a scalar that reaches every vision
        parameter, so 0 × it gives each one a (zero) gradient."""
        pixels, grid = self.smallest_image(visual.config)
        extra = {
            name.removeprefix("image_"): value.to(device) if isinstance(value, Tensor) else value
            for name, value in self.vision_kwargs(visual.config, grid).items()
        }
        out = visual(pixels.to(device, visual.dtype), grid_thw=grid, **extra)
        total = out.pooler_output.sum()
        for feature in getattr(out, "deepstack_features", None) or []:
            total = total + feature.sum()
        return total

    # --- sharding -----------------------------------------------------------------------------------
    def fsdp_units(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(vision blocks, decoder layers) of a …ForConditionalGeneration: one FSDP2 unit each; the rest
        (embeddings, head, norms, mergers, position tables) stays in the root."""
        inner = model.model
        return list(inner.visual.blocks), list(inner.language_model.layers)

    def vision_frozen_prefixes(self) -> tuple[str, ...]:
        """Names (under ``model.visual``) that ``model.freeze_vision`` keeps training: the mergers."""
        return ("merger.",)

    # --- planner ------------------------------------------------------------------------------------
    @abstractmethod
    def count_params(self, config: Any) -> tuple[int, int]:
        """(text, vision) parameter counts of the model built from ``config``, tied embeddings once."""

    @abstractmethod
    def unit_params(self, config: Any) -> tuple[int, int]:
        """(one decoder layer, one vision block) parameters: the non-root FSDP2 units."""

    @abstractmethod
    def merger_params(self, vision_config: Any) -> int:
        """Parameters that ``model.freeze_vision`` still trains."""

    # --- tiny model ---------------------------------------------------------------------------------
    @abstractmethod
    def tiny_config(self) -> Any:
        ...

    @abstractmethod
    def build_model(self, *, seed: int = 0) -> nn.Module:
        """The tiny model with float32 weights drawn from ``seed``; the caller's RNG state untouched."""

    @abstractmethod
    def build_processor(self, tokenizer: Any = None, *, min_pixels: int, max_pixels: int) -> Any:
        """The family's stock processor around the tiny tokenizer, with the chat template set."""

    @abstractmethod
    def build_tiny(self, out_dir: str | Path, *, seed: int = 0) -> Path:
        """Write the offline tiny model as an ordinary HF directory; same seed, same bytes."""

    @abstractmethod
    def tiny_fingerprint_parts(self) -> tuple[str, ...]:
        """Everything beyond the shared tokenizer corpus that shapes the tiny directory."""

    # --- a stand-in for a released checkpoint (the CI rehearsal's offline hub cache) -----------------
    released_pixels: tuple[int, int] = (0, 0)  # the released processor's (min, max) pixels

    def build_stand_in(self, hub_config: dict[str, Any], out_dir: str | Path, *, seed: int = 0) -> Path:
        """A tiny model of this family that loads like the released checkpoint whose ``config.json`` is
        ``hub_config``: the family's tiny architecture with the real token ids (vision placeholders, bos,
        eos, pad), vocabulary size and ``tie_word_embeddings``, the tiny tokenizer with its special tokens
        at the real ids, the family's processor at the released pixel bounds, a generation config as
        released (eos = ``<|im_end|>``, ``<|endoftext|>``), bf16 weights. Written to ``out_dir`` as an
        ordinary HF directory (what the rehearsal places under ``models--ORG--NAME/snapshots/<hash>/``)."""
        from transformers import GenerationConfig

        from ..tiny import SPECIAL_TOKENS, build_tokenizer

        text = hub_config.get("text_config", hub_config)
        first = int(text.get("bos_token_id", hub_config.get("bos_token_id", 151643)))  # <|endoftext|>
        tokenizer = build_tokenizer(first_special_id=first)
        ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
        want = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id"}
        for tok, key in want.items():
            if key in hub_config and int(hub_config[key]) != ids[tok]:
                raise ValueError(f"{key} = {hub_config[key]} in the released config, but the stand-in's "
                                 f"tokenizer puts {tok} at {ids[tok]}")
        config = self.tiny_config()
        tied = bool(hub_config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        t = config.text_config
        t.vocab_size = int(text.get("vocab_size", hub_config.get("vocab_size")))
        t.bos_token_id, t.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
        t.pad_token_id = ids["<|endoftext|>"]
        t.tie_word_embeddings = config.tie_word_embeddings = tied
        for tok, key in want.items():
            setattr(config, key, ids[tok])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class()(config)
        model.generation_config = GenerationConfig(
            bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
            pad_token_id=ids["<|endoftext|>"])
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(out_dir)
        lo, hi = self.released_pixels
        self.build_processor(tokenizer, min_pixels=lo, max_pixels=hi).save_pretrained(out_dir)
        return out_dir
