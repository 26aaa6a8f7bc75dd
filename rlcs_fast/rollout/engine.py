"""The rollout-engine contract shared by the transformers engine (CPU default, reference) and vLLM.

The loop calls, per GRPO step: `wake_up()` → `load_weights(stream)` → `generate(...)` → `sleep()`.
`generate` returns `n` completions per request, grouped: request i's samples are at [i*n, (i+1)*n).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    # return the sampled tokens' raw log-probs, log_softmax(logits) of the model: before temperature,
    # top-p and the ban, whose renormalisations the trainer does not apply (rollout/logprob_diff compares
    # them with the trainer's log-probs at T = 1)
    logprobs: bool = False
    # never sampled: a generated <|image_pad|> would not match any image in the training forward
    banned_token_ids: tuple[int, ...] = ()


class Request(Protocol):
    prompt_ids: torch.Tensor  # [T] int64, with one <|image_pad|> run per image already expanded
    pixel_values: torch.Tensor | None  # [P, 1176]
    image_grid_thw: torch.Tensor | None  # [I, 3]
    images: list[Image.Image]  # pre-resized images (vLLM runs its own processor on them)


@dataclass
class Completion:
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" (eos) | "length"


class RolloutEngine(Protocol):
    def generate(self, requests: list[Request], sampling: SamplingParams) -> list[Completion]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def sleep(self) -> None: ...

    def wake_up(self) -> None: ...


def make_engine(kind: str, model_path: str, *, device: torch.device, batch_size: int, eos_token_id: int,
                pad_token_id: int, **vllm_kwargs) -> RolloutEngine:
    """`rollout.engine` → an engine; vLLM falls back to the HF engine (said once at start) when the
    package is missing. `vllm_kwargs` go to `VLLMEngine` only. Tests inject another engine by replacing
    this module attribute (the stage looks it up here at first use)."""
    if kind == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            import logging

            logging.getLogger("rlcs_fast").warning(
                "rollout.engine = \"vllm\" but vllm is not installed (pip install 'rlcs-fast[vllm]'): "
                "using the transformers engine")
            kind = "hf"
        else:
            from .vllm_engine import VLLMEngine

            return VLLMEngine(model_path, eos_token_id=eos_token_id, **vllm_kwargs)
    from .hf_engine import HFEngine

    return HFEngine(model_path, device=device, batch_size=batch_size, eos_token_id=eos_token_id,
                    pad_token_id=pad_token_id)
