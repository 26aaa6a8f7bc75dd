"""Run configuration: frozen dataclasses loaded from TOML, with dotted command-line overrides.

A bad config stops the run before any work, with an error that names the key and the fix: unknown keys
suggest the nearest valid key, wrong types and values name what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# The defaults of each [grpo] loss for the keys it leaves unset: kernels.grpo_loss.LOSS_DEFAULTS (not
# imported: the config stays free of torch and Triton)
LOSS_DEFAULTS = {"grpo": {"clip_low": 0.2, "clip_high": 0.2, "agg": "token_mean"},
                 "gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq_mean_token_mean"}}


class ConfigError(ValueError):
    """A user error in the config or the command line; the message names the key and the fix."""


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"
    stages: list[str] = field(default_factory=lambda: ["sft", "grpo"])
    seed: int = 0
    resume: str = "auto"  # "auto": newest complete checkpoint in run.dir; "never": start fresh
    # longest wait in one collective before the job fails: above the slowest legitimate gap between two
    # collectives (a checkpoint or HF export on rank 0, vLLM start-up), so only a stuck rank trips it
    collective_timeout_s: int = 1800
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class ModelConfig:
    path: str = "tiny"  # a local HF directory, a hub id, "tiny" or "tiny-qwen3-vl" (offline tiny models)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 mixed precision on GPU, fp32 on CPU
    attention: Literal["auto", "flash", "torch_varlen", "sdpa_packed"] = "auto"
    gradient_checkpointing: bool = False
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: params, grads, optimizer in CPU memory (CUDA only)
    freeze_vision: bool = False
    tiny_seed: int = 0  # weight seed of the offline tiny model


@dataclass(frozen=True)
class DataConfig:
    train: str = "synthetic"  # hub id, local parquet/JSONL file or folder, or "synthetic"
    val: str = "synthetic"
    train_split: str = "train"
    val_split: str = "val"
    image_column: str = "images"
    problem_column: str = "problem"
    answer_column: str = "answer"
    synthetic_train_size: int = 20000  # fresh rows each step: the tiny model memorises 2,000 in a few epochs
    synthetic_val_size: int = 128
    val_size: int = 0  # 0: the whole validation set; otherwise its first N rows
    max_length: int = 1024  # SFT: prompt + answer tokens; longer samples are skipped and counted
    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 256
    system_prompt: str = ""  # empty: the chat template's default
    # RL prompt: "{problem}" is replaced by the row's problem (no other formatting is applied)
    prompt_template: str = (
        "{problem} You FIRST think about the reasoning process as an internal monologue and then provide "
        "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
        "answer MUST BE put in \\boxed{{}}."
    )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # non-finite (NaN/inf) steps are skipped; this many in a row stop the run (README, "Faults")
    max_bad_steps: int = 3


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 0  # 0: run `epochs` passes over the training set
    epochs: float = 1.0
    global_batch_size: int = 16  # sequences per optimizer step, over all ranks
    max_tokens_per_microbatch: int = 4096
    lr: float = 0.0  # 0: use optim.lr
    val_every: int = 0  # 0: validate at the end of the stage only
    val_generate: bool = True  # also generate on the val split and score val/accuracy
    log_every: int = 1


@dataclass(frozen=True)
class GRPOConfig:
    steps: int = 10
    n: int = 8  # responses per prompt (group size)
    rollout_batch_size: int = 16  # prompts per step
    mini_batch_size: int = 16  # prompts per optimizer update (rollout_batch_size / mini_batch_size updates)
    epochs: int = 1  # passes over each rollout batch
    max_tokens_per_microbatch: int = 8192
    max_prompt_length: int = 1024
    max_response_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 0.0  # 0: use optim.lr
    loss: Literal["grpo", "gspo"] = "grpo"  # gspo: the sequence ratio (verl's compute_policy_loss_gspo)
    clip_low: float | None = None  # unset: the loss's default, 0.2 (grpo) or 3e-4 (gspo, the paper's)
    clip_high: float | None = None  # unset: 0.2 (grpo) or 4e-4 (gspo)
    clip_dual: float = 0.0  # 0: off; else verl's dual-clip constant c (> 1) for negative advantages
    kl_coef: float = 0.0  # KL as a loss term against the frozen reference; 0 skips the reference model
    kl_type: Literal["kl", "abs", "mse", "low_var_kl"] = "low_var_kl"
    # unset: token_mean (grpo) or seq_mean_token_mean (gspo, which verl forces)
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                 "seq_mean_token_sum_norm"] | None = None
    std_norm: bool = True  # divide advantages by the group std (GRPO); false: Dr. GRPO
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens; 0: off
    overlong_penalty: float = 1.0
    val_every: int = 0  # 0: at the end of the stage only
    val_before_train: bool = True  # also validate at step 0 (verl's trainer.val_before_train)
    val_temperature: float = 0.0  # 0: greedy
    val_n: int = 1
    log_every: int = 1
    # Rollout correction (rlcs_fast.rollout_correction): TRL's vllm_importance_sampling_mode on the engine's
    # vs the old policy's log-probs; "none" (EasyR1, the paper's RL code, has none), "token_truncate",
    # "token_mask", "sequence_truncate", "sequence_mask" (TRL's default)
    rollout_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate",
                                "sequence_mask"] = "none"
    rollout_correction_clip: list[float] = field(default_factory=lambda: [0.0, 3.0])  # [C_min, C_max], TRL's
    rollout_rejection: str = ""  # verl's rollout_rs, e.g. "token_k1,seq_mean_k3"; empty: no rejection
    rollout_rejection_threshold: float | str = ""  # verl's rollout_rs_threshold, e.g. "0.5_2.0,0.01"

    def __post_init__(self):  # the loss's defaults for what the config leaves unset
        defaults = LOSS_DEFAULTS.get(self.loss, LOSS_DEFAULTS["grpo"])
        for name in ("clip_low", "clip_high", "agg"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps between resumable checkpoints; 0: only at the end of a stage
    keep: int = 2  # complete checkpoints kept per stage (each stage also exports a HF directory at its end)


@dataclass(frozen=True)
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"
    batch_size: int = 64  # sequences per generate call of the HF engine
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    max_num_batched_tokens: int = 16384
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    # images one prompt may hold (vLLM's limit_mm_per_prompt, which raises on more): prompts with more are
    # skipped and counted (data/skipped/too_many_images), never sent
    max_images_per_prompt: int = 4


@dataclass(frozen=True)
class RewardConfig:
    function: str = ""  # "module:function" with compute_score's signature; empty: the recipe's math reward
    format_weight: float = 0.1
    timeout_s: float = 5.0
    num_workers: int = 2


@dataclass(frozen=True)
class KernelsConfig:
    impl: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on GPU, the torch reference on CPU


@dataclass(frozen=True)
class LogConfig:
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    log: LogConfig = field(default_factory=LogConfig)


STAGES = ("sft", "grpo")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, e.g. ``optim.lr``."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _hints(cls)[f.name]
        if dataclasses.is_dataclass(sub):
            keys += all_keys(sub, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    if not close:  # a typo in the section name: match on the last part alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f" Did you mean `{close[0]}`?" if close else ""


def _check_value(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"config key `{key}` = {value!r} is not one of {choices}.")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}` must be a list, got {value!r} "
                              "(write it as TOML: '[...]').")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(
            f"config key `{key}` must be of type {tp.__name__}, got {type(value).__name__} {value!r}."
        )
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            raise ConfigError(f"unknown config key `{prefix}{k}`.{_suggest(prefix + k)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key `{prefix}{f.name}` is a section: write it as "
                                  f"[{prefix}{f.name}].")
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _check_value(prefix + f.name, value, tp)
    return cls(**kwargs)


def parse_value(text: str) -> Any:
    """A command-line value read as a TOML value (`1e-5`, `true`, `'["grpo"]'`); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key `{key}`: `{p}` is not a section.{_suggest(key)}")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML file (or the defaults), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (pass --cfg configs/tiny.toml or "
                              "another file).")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    for key, value in (overrides or {}).items():
        if key not in all_keys():
            raise ConfigError(f"unknown config key `{key}` on the command line.{_suggest(key)}")
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate_rollout_correction(grpo: GRPOConfig) -> None:
    """The GSPO and rollout-correction keys of [grpo], each error naming its key."""
    if grpo.loss == "gspo" and grpo.clip_dual:
        raise ConfigError(f"config key `grpo.clip_dual` = {grpo.clip_dual} is a token-level GRPO option: "
                          "with `grpo.loss` = \"gspo\" set it to 0 (verl's GSPO has no dual clip).")
    clip = grpo.rollout_correction_clip
    if len(clip) != 2 or not 0 <= clip[0] < clip[1]:
        raise ConfigError(f"config key `grpo.rollout_correction_clip` = {clip} must be [C_min, C_max] with "
                          "0 <= C_min < C_max (TRL: [0, 3]).")
    if grpo.rollout_rejection:
        from .rollout_correction import parse_rejection

        try:
            parse_rejection(grpo.rollout_rejection, grpo.rollout_rejection_threshold)
        except ValueError as e:
            key = "rollout_rejection_threshold" if "threshold" in str(e) else "rollout_rejection"
            raise ConfigError(f"config key `grpo.{key}`: {e}.") from None
    elif grpo.rollout_rejection_threshold != "":
        raise ConfigError("config key `grpo.rollout_rejection_threshold` is set but `grpo.rollout_rejection` "
                          "is empty: name the criteria (e.g. \"token_k1\") or drop the threshold.")


def validate(cfg: Config) -> None:
    """Impossible combinations, caught before any work starts."""
    if not cfg.run.stages:
        raise ConfigError('config key `run.stages` is empty: use ["sft"], ["grpo"] or ["sft", "grpo"].')
    for s in cfg.run.stages:
        if s not in STAGES:
            raise ConfigError(f"config key `run.stages` has unknown stage {s!r}: valid stages are "
                              f"{list(STAGES)}.")
    if len(set(cfg.run.stages)) != len(cfg.run.stages) or list(cfg.run.stages) != sorted(cfg.run.stages,
                                                                                         key=STAGES.index):
        raise ConfigError(f"config key `run.stages` = {cfg.run.stages}: each stage once, sft before grpo.")
    if cfg.run.resume not in ("auto", "never") and not Path(cfg.run.resume).exists():
        raise ConfigError(f"config key `run.resume` = {cfg.run.resume!r}: use \"auto\", \"never\" or an "
                          "existing checkpoint directory.")
    if cfg.model.cpu_offload and cfg.run.device == "cpu":
        raise ConfigError("config key `model.cpu_offload` = true needs a CUDA device (FSDP2's "
                          "CPUOffloadPolicy "
                          "streams CPU-resident shards to the GPU), but `run.device` = \"cpu\": set "
                          "`model.cpu_offload = false`.")
    positive = {
        "sft.global_batch_size": cfg.sft.global_batch_size,
        "sft.max_tokens_per_microbatch": cfg.sft.max_tokens_per_microbatch,
        "grpo.n": cfg.grpo.n,
        "grpo.rollout_batch_size": cfg.grpo.rollout_batch_size,
        "grpo.mini_batch_size": cfg.grpo.mini_batch_size,
        "grpo.epochs": cfg.grpo.epochs,
        "grpo.max_tokens_per_microbatch": cfg.grpo.max_tokens_per_microbatch,
        "grpo.max_response_length": cfg.grpo.max_response_length,
        "data.max_length": cfg.data.max_length,
        "rollout.batch_size": cfg.rollout.batch_size,
        "checkpoint.keep": cfg.checkpoint.keep,
        "optim.max_bad_steps": cfg.optim.max_bad_steps,
        "run.collective_timeout_s": cfg.run.collective_timeout_s,
    }
    for key, v in positive.items():
        if v <= 0:
            raise ConfigError(f"config key `{key}` = {v} must be > 0.")
    for key, v in {"optim.lr": cfg.optim.lr, "sft.steps": cfg.sft.steps, "grpo.steps": cfg.grpo.steps,
                   "grpo.kl_coef": cfg.grpo.kl_coef, "checkpoint.every": cfg.checkpoint.every}.items():
        if v < 0:
            raise ConfigError(f"config key `{key}` = {v} must be >= 0.")
    if cfg.grpo.rollout_batch_size % cfg.grpo.mini_batch_size:
        raise ConfigError(
            f"config key `grpo.mini_batch_size` = {cfg.grpo.mini_batch_size} must divide "
            f"`grpo.rollout_batch_size` = {cfg.grpo.rollout_batch_size}."
        )
    if "grpo" in cfg.run.stages and cfg.grpo.n < 2:
        raise ConfigError("config key `grpo.n` must be >= 2: group advantages need several responses per "
                          "prompt.")
    if not 0 <= cfg.grpo.clip_low < 1 or cfg.grpo.clip_high < 0:
        raise ConfigError("config keys `grpo.clip_low` (in [0, 1)) and `grpo.clip_high` (>= 0) are out of "
                          "range.")
    validate_rollout_correction(cfg.grpo)
    if cfg.grpo.clip_dual and cfg.grpo.clip_dual <= 1:
        raise ConfigError(f"config key `grpo.clip_dual` = {cfg.grpo.clip_dual} must be 0 (off) or > 1 (verl "
                          "uses 3).")
    if not 0 < cfg.grpo.top_p <= 1:
        raise ConfigError(f"config key `grpo.top_p` = {cfg.grpo.top_p} must be in (0, 1].")
    if cfg.grpo.temperature <= 0:
        raise ConfigError(f"config key `grpo.temperature` = {cfg.grpo.temperature} must be > 0 (sampling).")
    if not 0 <= cfg.reward.format_weight <= 1:
        raise ConfigError(f"config key `reward.format_weight` = {cfg.reward.format_weight} "
                          "must be in [0, 1].")
    if cfg.reward.function and ":" not in cfg.reward.function:
        raise ConfigError(f"config key `reward.function` = {cfg.reward.function!r} must look like "
                          "\"module:function\".")
    if cfg.data.min_pixels > cfg.data.max_pixels:
        raise ConfigError("config keys `data.min_pixels` and `data.max_pixels`: min must not exceed max.")
    if "{problem}" not in cfg.data.prompt_template:
        raise ConfigError("config key `data.prompt_template` must contain \"{problem}\" where the question "
                          "goes.")
    if cfg.grpo.max_prompt_length + cfg.grpo.max_response_length > cfg.grpo.max_tokens_per_microbatch:
        raise ConfigError(
            "config key `grpo.max_tokens_per_microbatch` must hold at least one whole sequence: raise it to "
            f">= grpo.max_prompt_length + grpo.max_response_length = "
            f"{cfg.grpo.max_prompt_length + cfg.grpo.max_response_length}."
        )


def parse_args(argv: list[str] | None = None, *,
               extra_flags: tuple[str, ...] = ()) -> tuple[Config, dict[str, bool]]:
    """``--cfg FILE`` plus ``--section.key value`` (or ``--section.key=value``) overrides.

    ``extra_flags`` are boolean switches of the entry point (e.g. ``--dry-run``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg_path, overrides, flags = None, {}, {f: False for f in extra_flags}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --cfg FILE and --section.key value.")
        name, eq, value = arg[2:].partition("=")
        if name in flags:
            flags[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"argument --{name} needs a value.")
            value, i = argv[i + 1], i + 1
        i += 1
        if name == "cfg":
            cfg_path = value
        elif "." in name:
            overrides[name] = parse_value(value)
        else:
            raise ConfigError(f"unknown argument --{name}: use --cfg FILE, --section.key "
                              f"value{', ' if flags else ''}"
                              + ", ".join(f"--{f}" for f in flags) + ".")
    return load_config(cfg_path, overrides), flags


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(cfg: Config) -> str:
    """The resolved config as TOML that ``load_config`` reads back to an equal Config."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def stage_lr(cfg: Config, stage: str) -> float:
    lr = cfg.sft.lr if stage == "sft" else cfg.grpo.lr
    return lr or cfg.optim.lr
