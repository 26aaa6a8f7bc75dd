"""The one place a rollout engine is built, for training, ``eval`` and ``generate``, and the run's single
engine that every stage shares."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..config import RolloutConfig
from .engine import RolloutEngine

log = logging.getLogger("rlcs_fast")


def banned_token_ids(model_config) -> tuple[int, ...]:
    """Vision placeholders, never sampled: a response holding one would break the image-token count of
    the training forward (and open an image no request carries)."""
    from ..families import family_for

    ids = family_for(model_config).token_ids(model_config)
    return (ids["image"], ids["video"], ids["vision_start"], ids["vision_end"])


def engine_kind(kind: str, device: torch.device) -> str:
    """``auto`` → vLLM on a GPU, transformers elsewhere; vLLM falls back to transformers (said once)
    when the package is missing."""
    if kind == "auto":
        kind = "vllm" if device.type == "cuda" else "hf"
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            log.warning("rollout.engine = \"vllm\" but vllm is not installed (pip install "
                        "'rlcs-fast[vllm]'): "
                        "using the transformers engine")
            return "hf"
    return kind


def build_engine(rollout: RolloutConfig, model_path: str, *, tokenizer, device: torch.device,
                 max_model_len: int, seed: int, min_pixels: int, max_pixels: int, kind: str | None = None,
                 batch_size: int | None = None, from_disk: bool = False) -> RolloutEngine:
    """An engine for `model_path` with the settings of `rollout` (``kind`` and ``batch_size`` override
    ``rollout.engine`` and ``rollout.batch_size``). vLLM runs its own processor on the pre-resized images:
    it gets the encoder's pixel bounds. Training pushes its weights before each generation, so vLLM starts
    on dummy weights; ``from_disk`` (eval, generate) loads the checkpoint's instead."""
    eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if engine_kind(kind or rollout.engine, device) == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_path, eos_token_id=eos_token_id,
                          gpu_memory_utilization=rollout.gpu_memory_utilization,
                          tensor_parallel_size=rollout.tensor_parallel_size,
                          max_num_batched_tokens=rollout.max_num_batched_tokens,
                          enforce_eager=rollout.enforce_eager,
                          enable_prefix_caching=rollout.enable_prefix_caching, max_model_len=max_model_len,
                          seed=seed, min_pixels=min_pixels, max_pixels=max_pixels,
                          max_images_per_prompt=rollout.max_images_per_prompt,
                          load_format="auto" if from_disk else "dummy")
    from .hf_engine import HFEngine

    return HFEngine(model_path, device=device, batch_size=batch_size or rollout.batch_size,
                    eos_token_id=eos_token_id, pad_token_id=tokenizer.pad_token_id)


class SharedEngine:
    """The run's one rollout engine, built at first use and reused by every stage: vLLM allows one
    sleep-mode instance per process, and the SFT stage's validation engine would otherwise still hold its
    memory pools (and its claim on the process) when the GRPO stage builds its own. Weights are pushed
    before every generation, so the stage that built it does not matter.

    ``build(model_path, tokenizer)`` makes the engine; a caller that has one (a test) passes ``engine``."""

    def __init__(self, build: Callable[[str, object], RolloutEngine] | None = None,
                 engine: RolloutEngine | None = None):
        if (build is None) == (engine is None):
            raise ValueError("SharedEngine takes either `build` or `engine`")
        self._build, self._engine = build, engine

    def get(self, model_path: str, tokenizer) -> RolloutEngine:
        if self._engine is None:
            self._engine = self._build(model_path, tokenizer)
        return self._engine

    def close(self, *, graceful: bool = True) -> None:
        """End of the run: shut the engine down (engines without ``shutdown`` are just dropped).
        ``graceful=False`` after an error that not every rank may have seen: an engine whose shutdown
        waits for the other ranks (``shutdown_needs_peers``) is just dropped."""
        engine, self._engine = self._engine, None
        if engine is None or not hasattr(engine, "shutdown"):
            return
        if graceful or not getattr(engine, "shutdown_needs_peers", False):
            engine.shutdown()
