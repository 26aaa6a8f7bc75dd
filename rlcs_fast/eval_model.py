"""Loading a model for evaluation, shared by ``python -m rlcs_fast.eval`` (any benchmark-format set) and the
paper suite (:mod:`rlcs_fast.benchmarks`), which both import it and not each other: the model resolved to
one local directory (a hub id to its snapshot), the training run's settings found beside it, its processor,
config and a rollout engine."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError, load_config
from .hub import is_hub_id, resolve_model_path
from .rollout.build import build_engine


def resolve_eval_model(model: str) -> str:
    """``--model``: a model directory, ``tiny`` / ``tiny-qwen3-vl``, or a hub id (the base model, resolved
    to its local snapshot directory, as training resolves ``model.path``)."""
    from .families import family_by_tiny_name

    if (family_by_tiny_name(model) is None and not Path(model).expanduser().is_dir()
            and not is_hub_id(model)):
        raise ConfigError(f"--model {model!r} is not a directory (give an exported HF directory, e.g. "
                          "<run.dir>/grpo/hf, a hub id, 'tiny' or 'tiny-qwen3-vl').")
    return resolve_model_path(model, key="--model")


def display_path(model: str, model_dir: str) -> str:
    """What a model's name is made from: the hub id for a hub model (its snapshot directory is a hash)."""
    return model if is_hub_id(model) else model_dir


def find_run_config(model_dir: str | Path) -> Path | None:
    """The training run's ``config.toml`` for a model directory: in it, or up to two levels above
    (``<run.dir>/<stage>/hf``)."""
    d = Path(model_dir).resolve()
    for cand in (d, d.parent, d.parent.parent):
        if (cand / "config.toml").is_file():
            return cand / "config.toml"
    return None


def run_settings(model_dir: str | Path) -> tuple[Config, Path | None]:
    path = find_run_config(model_dir)
    return (load_config(path) if path is not None else Config()), path


def model_name(model_dir: str | Path, taken: set[str]) -> str:
    """A file-safe name: an export ``<run>/<stage>/hf`` becomes ``<run>-<stage>``."""
    d = Path(model_dir).resolve()
    name = f"{d.parent.parent.name}-{d.parent.name}" if d.name == "hf" else d.name
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "model"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


@dataclass
class EvalSettings:
    template: str
    system_prompt: str
    min_pixels: int
    max_pixels: int
    max_prompt_length: int
    max_new_tokens: int
    top_p: float
    seed: int
    batch_size: int
    reward_function: str
    format_weight: float
    reward_timeout_s: float
    reward_workers: int
    synthetic_val_size: int
    rollout: Any


def resolve_settings(cfg: Config, args: argparse.Namespace) -> EvalSettings:
    """The run's values, overridden by the flags given on the command line."""
    def pick(flag: Any, value: Any) -> Any:
        return value if flag is None else flag

    data, grpo, reward = cfg.data, cfg.grpo, cfg.reward
    return EvalSettings(
        template=pick(args.prompt_template, data.prompt_template),
        system_prompt=pick(args.system_prompt, data.system_prompt),
        min_pixels=pick(args.min_pixels, data.min_pixels), max_pixels=pick(args.max_pixels, data.max_pixels),
        max_prompt_length=grpo.max_prompt_length,
        max_new_tokens=pick(args.max_new_tokens, grpo.max_response_length),
        top_p=pick(args.top_p, grpo.top_p), seed=pick(args.seed, cfg.run.seed),
        batch_size=pick(args.batch_size, cfg.rollout.batch_size), reward_function=reward.function,
        format_weight=reward.format_weight, reward_timeout_s=reward.timeout_s,
        reward_workers=pick(args.reward_workers, reward.num_workers),
        synthetic_val_size=data.synthetic_val_size, rollout=cfg.rollout)


def load_for_eval(model_dir: str, settings: EvalSettings, engine_kind: str, device: torch.device):
    """The model's processor (with the run's pixel bounds), its config and a rollout engine."""
    from transformers import AutoConfig

    from .model import load_processor

    processor = load_processor(model_dir, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    model_config = AutoConfig.from_pretrained(model_dir)
    engine = build_engine(settings.rollout, model_dir, tokenizer=processor.tokenizer, device=device,
                          kind=engine_kind,
                          batch_size=settings.batch_size,
                          max_model_len=settings.max_prompt_length + settings.max_new_tokens,
                          seed=settings.seed, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels,
                          from_disk=True)
    return processor, model_config, engine


