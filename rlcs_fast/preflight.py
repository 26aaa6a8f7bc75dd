"""Launch preflight: before any weight is loaded, check that the resolved model directory holds what the
processor, the trainer and the rollout engine will read, so that a launch stops in seconds with the key
and the fix instead of after a stage of training (the vLLM engine reads the pixel-norm constants and the
image token id only when it is built, at the first validation or rollout).

Reads the directory's JSON files only (no weights, no tokenizer build). ``python -m rlcs_fast.train
--dry-run`` prints the same findings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import Config, ConfigError

# the Qwen2-VL family's vision placeholders: config.json key → the token the chat template writes
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
EOS_TOKEN = "<|im_end|>"
MERGED_PATCH_PIXELS = 28 * 28  # one merged image token: patch 14, spatial merge 2


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _token_ids(model_dir: Path) -> dict[str, int]:
    """Special tokens' ids as the tokenizer files declare them (``tokenizer.json``'s added tokens, else
    ``tokenizer_config.json``'s ``added_tokens_decoder``)."""
    out = {t["content"]: int(t["id"]) for t in _json(model_dir / "tokenizer.json").get("added_tokens", [])}
    for tid, t in _json(model_dir / "tokenizer_config.json").get("added_tokens_decoder", {}).items():
        out.setdefault(t.get("content", ""), int(tid))
    return out


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").is_file() or _json(model_dir / "chat_template.json"):
        return True
    return bool(_json(model_dir / "tokenizer_config.json").get("chat_template")
                or _json(model_dir / "processor_config.json").get("chat_template"))


def check_model_dir(model_dir: str, *, engine: str, min_pixels: int, max_pixels: int,
                    max_prompt_length: int, key: str = "model.path") -> list[str]:
    """Problems that would stop the run later, each naming the key and the fix; [] when ready."""
    from .rollout.vllm_engine import pixel_norm_constants  # torch only, never vllm

    d = Path(model_dir)
    config = _json(d / "config.json")
    if not config:
        return [f"`{key}` = {model_dir!r}: no readable config.json. Fix: point `{key}` at a Hugging Face "
                "model directory (an export `<run.dir>/<stage>/hf`) or its hub id."]
    problems = []
    text = config.get("text_config", {})
    vision = config.get("vision_config")
    if not vision:
        problems.append(f"`{key}`: config.json has no vision_config; this trainer needs a vision-language "
                        "model (Qwen2.5-VL). Fix: use a VL checkpoint.")
    ids = _token_ids(d)
    for name, token in VISION_TOKENS.items():
        value = config.get(name, text.get(name))
        if value is None:
            problems.append(f"`{key}`: config.json has no {name} (the id of {token}), which the packing, "
                            f"the rollout ban and the vLLM engine read. Fix: copy {name} from the base "
                            "model's config.json.")
        elif token in ids and ids[token] != value:
            problems.append(f"`{key}`: config.json {name} = {value} but the tokenizer gives {token} id "
                            f"{ids[token]}. Fix: save the tokenizer and config of the same model.")
    if EOS_TOKEN not in ids:
        problems.append(f"`{key}`: the tokenizer has no {EOS_TOKEN} token (the end of an assistant turn, "
                        "the rollout stop token). Fix: use the model's own tokenizer files.")
    if not _has_chat_template(d):
        problems.append(f"`{key}`: no chat template (chat_template.jinja, chat_template.json or "
                        "tokenizer_config.json's chat_template). Fix: save the processor with "
                        "processor.save_pretrained, or copy chat_template.* from the base model.")
    if vision and pixel_norm_constants(str(d)) is None:
        problems.append(f"`{key}`: no image_mean/image_std in preprocessor_config.json or "
                        f"processor_config.json: the {'vLLM ' if engine == 'vllm' else ''}engine and the "
                        "processor normalise pixels with them. Fix: save the processor with "
                        "processor.save_pretrained, or copy preprocessor_config.json from the base model.")
    if min_pixels > max_pixels:
        problems.append(f"`data.min_pixels` = {min_pixels} > `data.max_pixels` = {max_pixels}. Fix: "
                        "min_pixels <= max_pixels.")
    if vision and min_pixels // MERGED_PATCH_PIXELS >= max_prompt_length:
        problems.append(f"`data.min_pixels` = {min_pixels}: the smallest image is "
                        f"{min_pixels // MERGED_PATCH_PIXELS} tokens, no prompt with an image fits "
                        f"`grpo.max_prompt_length` = {max_prompt_length}. Fix: lower data.min_pixels or "
                        "raise grpo.max_prompt_length.")
    return problems


def preflight(cfg: Config, model_dir: str, *, key: str = "model.path") -> list[str]:
    return check_model_dir(model_dir, engine=cfg.rollout.engine, min_pixels=cfg.data.min_pixels,
                           max_pixels=cfg.data.max_pixels, max_prompt_length=cfg.grpo.max_prompt_length,
                           key=key)


def check_launch(cfg: Config, model_dir: str) -> None:
    """Raise a ConfigError naming every problem (the run stops before loading weights)."""
    problems = preflight(cfg, model_dir)
    if problems:
        raise ConfigError(f"launch preflight of {model_dir}:\n  - " + "\n  - ".join(problems))
