"""Rollouts with vLLM, co-located with the trainer: one engine per training process on the same GPU,
started inside the torchrun job (``distributed_executor_backend="external_launcher"``), asleep while the
trainer runs.

One GRPO step, as the loop drives it through the `RolloutEngine` protocol (`wake_up` → `load_weights` →
`generate` → `sleep`), becomes in vLLM terms::

    wake_up(["weights"])                        # only the weights' memory: the KV cache is still free
    collective_rpc("reload_weights", weights_iterator=stream)   # full bf16 tensors, one at a time
    restore_input_norm                          # device-side pixel-norm buffers, if any (below)
    wake_up(["kv_cache"]); reset_prefix_cache() # cached prefixes hold KV computed with the old weights
    reset_encoder_cache()                       # image embeddings computed with the old weights
    generate(...)
    sleep(level=2)                              # weights and KV cache freed (not copied to CPU)
    reset_encoder_cache(); empty_cache()        # the vision encoder cache survives sleep otherwise

Facts this relies on (vLLM 0.32 sources; notes/systems.md §3). Oldest vLLM with every call used here:
0.16 (`LLMEngine.reset_encoder_cache`, vllm#33452; `logprobs_mode`, 0.10.1); newer options are passed only
where `EngineArgs` has them.
- `reload_weights` without `weights_iterator` reloads the checkpoint *from disk* (trl#5312): rollouts
  would silently use the base model. The iterator is always passed; versions whose model runner lacks
  the argument get `model_runner.model.load_weights(iter)` instead.
- A level-2 sleep loses the weights: generating after a wake without a push gives gibberish
  (vllm#29341), so `generate` refuses until a push followed the wake.
- `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` makes sleep free nothing (or trip an assert,
  depending on the version): refused at start.
- The multimodal encoder cache (`encoder_cache[mm_hash]`) lives outside the sleepable pools and is
  only evicted under capacity pressure: without a reset, GPU memory grows by one entry per image per
  step (EasyR1 PR #11002).
- Since 0.32, Qwen2.5-VL normalises raw pixels on the device (`mm_device_do_normalize`, on by default)
  with the `weight`/`bias` buffers of an input-norm module. The dummy loader randomises them and an HF
  state dict has no such names, so a push never restores them: the model would see noise for every image
  (log-probs off by 8-12 nats on the tiny model). Turned off here (the processor normalises on the host,
  as the trainer's does), and checked after every load (`check_input_norm`).
- After a weight push the scheduler's encoder cache still lists the images of earlier requests while the
  worker's copy was dropped by the reload: the same image again raises `Encoder cache miss` (or, where
  the worker kept it, reuses an embedding of the old weights). Reset after every push.
- vLLM's Qwen2-VL processor expands each `<|image_pad|>` of a token prompt into the image's run itself
  (`PromptReplacement` of the single pad token): requests carry one pad per image, never the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..families import family_for
from .engine import Completion, Request, SamplingParams

log = logging.getLogger("rlcs_fast")

SLEEP_TAGS = ("weights", "kv_cache")
# wrappers that insert a module level into parameter names (activation checkpointing, torch.compile,
# FSDP1); vLLM's loaders know only the Hugging Face names
WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


# --- pure helpers (tested without vLLM) ----------------------------------------------------------------

def check_alloc_conf(env: Mapping[str, str] = os.environ) -> None:
    """Refuse `expandable_segments:True` with sleep mode: vLLM's sleep then frees no memory."""
    for key in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        for part in env.get(key, "").split(","):
            name, _, value = part.strip().partition(":")
            if name.strip() == "expandable_segments" and value.strip().lower() == "true":
                raise ValueError(
                    f"{key}={env[key]!r} sets expandable_segments:True, which breaks vLLM's sleep mode "
                    "(the co-located engine would keep its weights and KV cache on the GPU while the trainer "
                    f"runs). Unset it or use expandable_segments:False with rollout.engine = \"vllm\".")


def collapse_image_pads(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """Token ids with each run of `<|image_pad|>` replaced by one pad: vLLM expands it per image."""
    out: list[int] = []
    for t in prompt_ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


def vllm_prompt(prompt_ids: Sequence[int], images: Sequence[Image.Image], *, image_token_id: int | None,
                mm_processor_kwargs: dict[str, int] | None = None) -> dict[str, Any]:
    """One vLLM `TokensPrompt` dict: token ids (one pad per image) + the pre-resized images."""
    if not images:
        if image_token_id is not None:
            assert image_token_id not in prompt_ids, "prompt holds <|image_pad|> tokens but no images"
        return {"prompt_token_ids": [int(t) for t in prompt_ids]}
    assert image_token_id is not None, "images given to a text-only model"
    ids = collapse_image_pads(prompt_ids, image_token_id)
    pads = sum(t == image_token_id for t in ids)
    assert pads == len(images), f"{pads} <|image_pad|> runs in the prompt for {len(images)} images"
    out: dict[str, Any] = {"prompt_token_ids": ids, "multi_modal_data": {"image": list(images)}}
    if mm_processor_kwargs:
        out["mm_processor_kwargs"] = dict(mm_processor_kwargs)
    return out


def vllm_weight_name(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def completion_from_output(prompt_ids: list[int], output: Any, want_logprobs: bool) -> Completion:
    """A vLLM `CompletionOutput` → `Completion` (the stop token, when one ended it, is kept as HF does)."""
    ids = [int(t) for t in output.token_ids]
    logprobs = None
    if want_logprobs:
        assert output.logprobs is not None and len(output.logprobs) == len(ids), "vLLM returned no log-probs"
        logprobs = [float(pos[t].logprob) for pos, t in zip(output.logprobs, ids)]
    finish = "stop" if output.finish_reason == "stop" else "length"
    return Completion(prompt_ids, ids, logprobs, finish)


def pixel_norm_constants(model_path: str) -> tuple[list[float], list[float]] | None:
    """(weight, bias) per channel of the processor's pixel normalisation, `x * weight + bias` =
    `(x * rescale_factor - mean) / std`, from the model directory (`preprocessor_config.json`, or the
    `image_processor` of `processor_config.json` as transformers 5 writes it); None without one."""
    cfg: dict[str, Any] = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(model_path) / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg:
                break
    if "image_mean" not in cfg or "image_std" not in cfg:
        return None
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
    mean, std = cfg["image_mean"], cfg["image_std"]
    if not cfg.get("do_normalize", True):
        mean, std = [0.0] * len(mean), [1.0] * len(std)
    return [rescale / s for s in std], [-m / s for m, s in zip(mean, std)]


def restore_input_norm(model: torch.nn.Module, constants: tuple[list[float], list[float]] | None) -> int:
    """Write the processor's normalisation into every device-side pixel-norm module (vLLM's
    `FusedMMInputNorm`: persistent `weight`/`bias` buffers that no HF checkpoint holds, so a dummy load
    leaves them random and a weight push never fixes them). Returns how many there were."""
    found = 0
    for module in model.modules():
        if type(module).__name__ != "FusedMMInputNorm":
            continue
        if constants is None:
            raise RuntimeError("the engine normalises pixels on the device but the model directory has no "
                               "image_mean/image_std (preprocessor_config.json) to restore its buffers from")
        for name, value in zip(("weight", "bias"), constants):
            buf = getattr(module, name)
            buf.copy_(torch.tensor(value, dtype=buf.dtype))
        found += 1
    return found


@contextlib.contextmanager
def step_rng(seed: int | None) -> Iterator[None]:
    """Seed, once per `generate` call, the RNG vLLM samples unseeded requests with, and restore it after:
    torch's default generators (CPU and the current GPU: the native and FlashInfer samplers draw from them)
    and numpy's (the V2 model runner draws an unseeded request's seed there). The engine core runs in this
    process (external_launcher turns vLLM's multiprocessing off), so the same seed and requests give the
    same samples, and the trainer's random streams are untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        np_state = np.random.get_state()
        try:
            if seed is not None:
                torch.manual_seed(seed)
                np.random.seed(seed % 2**32)
            yield
        finally:
            np.random.set_state(np_state)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_launcher_env() -> None:
    """external_launcher reads the torchrun variables; a plain `python -m` run is a world of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return  # vLLM reuses the trainer's world group
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


# --- the engine --------------------------------------------------------------------------------------

class VLLMEngine:
    """`RolloutEngine` on vLLM. State machine (mirrored by `tests`' FakeEngine):
    asleep → `wake_up()` (weights) → `load_weights()` (then KV cache, prefix cache reset) → `generate`
    (any number of times) → `sleep()`. `wake_up(tags)` takes vLLM's tags for callers that want them."""

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.5, tensor_parallel_size: int = 1,
                 max_num_batched_tokens: int = 16384, enforce_eager: bool = False,
                 enable_prefix_caching: bool = True, max_model_len: int = 4096, seed: int = 0,
                 eos_token_id: int | None = None, min_pixels: int | None = None,
                 max_pixels: int | None = None,
                 max_images_per_prompt: int = 4, dtype: str = "auto", load_format: str = "dummy",
                 sleep_level: int = 2, enable_sleep_mode: bool | None = None, max_num_seqs: int = 256):
        on_gpu = torch.cuda.is_available()
        # sleep mode exists on CUDA/ROCm only; vLLM refuses the flag elsewhere (its CPU sleep is a no-op)
        self.sleep_mode = on_gpu if enable_sleep_mode is None else enable_sleep_mode
        # vLLM's own sleep/wake: with sleep mode, and on CPU, where they are no-ops around a scheduler
        # pause/resume (so the CPU test drives the real call sequence); never on a GPU without sleep mode
        self._forward_sleep = self.sleep_mode or not on_gpu
        if self.sleep_mode:
            check_alloc_conf()
        assert sleep_level in (1, 2), f"sleep_level must be 1 or 2, got {sleep_level}"
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("rollout.engine = \"vllm\" needs vLLM: pip install 'rlcs-fast[vllm]'") from e
        if not (Path(model_path) / "config.json").is_file():
            # a hub id read as "no config" ran without image settings and crashed at the first image:
            # callers resolve hub ids first (rlcs_fast.hub.resolve_model_path)
            raise ValueError("VLLMEngine needs a local model directory with config.json, got "
                             f"{model_path!r}: resolve a hub id with rlcs_fast.hub.resolve_model_path first")
        hf = json.loads((Path(model_path) / "config.json").read_text())
        # the family's vision token ids, read from config.json (both Qwen families: <|image_pad|> 151655)
        self.image_token_id: int | None = (family_for(hf).token_ids(hf)["image"] if "vision_config" in hf
                                           else None)
        self.eos_token_id = eos_token_id
        self.tensor_parallel_size = tensor_parallel_size
        self.sleep_level = sleep_level
        self.mm_processor_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                                    if v is not None}
        kwargs: dict[str, Any] = {}
        if "vision_config" in hf:
            # video 0: no video memory profiled; the same pixel bounds as the trainer's processor (images
            # arrive pre-resized to them, so vLLM's resize is the identity)
            kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
            if self.mm_processor_kwargs:
                kwargs["mm_processor_kwargs"] = dict(self.mm_processor_kwargs)
        from vllm.engine.arg_utils import EngineArgs

        known = {f.name for f in dataclasses.fields(EngineArgs)}
        if "vision_config" in hf and "mm_device_do_normalize" in known:
            # the processor normalises on the host, as the trainer's does: no device-side buffers that a
            # dummy load randomises (restore_input_norm still guards every load)
            kwargs["mm_device_do_normalize"] = False
        if self.sleep_mode:
            # the custom all-reduce registers IPC buffers that sleep mode does not manage (as EasyR1)
            kwargs["disable_custom_all_reduce"] = True
        if dtype == "auto":
            dtype = "bfloat16" if on_gpu else "float32"
        if not on_gpu:
            # a seeded request whose prefill is split over steps has its sampled token discarded, and
            # vLLM then rewinds its generator's offset, which a CPU generator does not have ("CPU
            # Generator does not use offset"): no chunked prefill on the CPU, every prompt in one step
            max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
        _ensure_launcher_env()
        self.llm = LLM(
            model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, load_format=load_format,
            tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=on_gpu,
            enable_sleep_mode=self.sleep_mode,
            # the model's own log-probs, before temperature, top-p and the ban: "processed" ones are
            # renormalised over the nucleus and the allowed tokens, which the trainer's are not
            logprobs_mode="raw_logprobs", **kwargs)
        self._asleep: set[str] = set()
        self._weights_current = load_format != "dummy"  # dummy weights are random until the first push
        self._reload_takes_iterator = self._check_reload_api()
        self._norm_constants = pixel_norm_constants(model_path) if "vision_config" in hf else None
        self.input_norm_layers = self._restore_input_norm()  # the dummy load randomised them too
        if self.sleep_mode:  # the trainer owns the GPU until the first rollout
            self.sleep()

    # --- state ---------------------------------------------------------------------------------------
    @property
    def asleep(self) -> frozenset[str]:
        return frozenset(self._asleep)

    def sleep(self, level: int | None = None) -> None:
        level = self.sleep_level if level is None else level
        if set(SLEEP_TAGS) <= self._asleep:
            return
        if self._asleep:  # half awake (weights only): wake fully first, vLLM sleeps all tags at once
            self._wake(sorted(self._asleep))
        if self._forward_sleep:
            self.llm.sleep(level=level)
        self._asleep = set(SLEEP_TAGS)
        if level >= 2:
            self._weights_current = False
        self._reset_encoder_cache()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Default: the weights only; the KV cache wakes after the push (or at the first `generate`),
        so that it is never resident while weights stream in."""
        tags = ["weights"] if tags is None else list(tags)
        assert set(tags) <= set(SLEEP_TAGS), f"unknown sleep tags {tags}"
        self._wake([t for t in tags if t in self._asleep])

    def _wake(self, tags: list[str]) -> None:
        if not tags:
            return  # vLLM ignores the whole call when one tag is awake already
        if "kv_cache" in tags and "weights" in self._asleep and "weights" not in tags:
            raise RuntimeError("wake the weights before the KV cache")
        if self._forward_sleep:
            self.llm.wake_up(tags=tags)
        self._asleep -= set(tags)

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _reset_encoder_cache(self) -> None:
        self.llm.llm_engine.reset_encoder_cache()  # scheduler and workers (vLLM >= 0.16)

    def _restore_input_norm(self) -> int:
        constants = self._norm_constants
        return sum(self.llm.apply_model(lambda model: restore_input_norm(model, constants)))

    shutdown_needs_peers = True  # `shutdown` holds a barrier: not after an error only one rank saw

    def shutdown(self) -> None:
        """End of the run (``SharedEngine.close``, before the trainer's own ``dist.shutdown``): vLLM's
        teardown destroys its groups and the default process group, which its exit-time finalizer would
        otherwise try after the trainer destroyed them ("Invalid process group specified" tracebacks)."""
        import torch.distributed as tdist

        client = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if client is None or not hasattr(client, "shutdown"):
            return
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            tdist.barrier()  # every rank has finished with the group before any rank tears it down
        client.shutdown()

    def memory_gb(self) -> float:
        """GPU memory resident in vLLM's sleepable pools (weights, KV cache), in GiB; 0 without them."""
        if not (self.sleep_mode and torch.cuda.is_available()):
            return 0.0
        from vllm.device_allocator.cumem import CuMemAllocator

        pool = CuMemAllocator.get_instance().pointer_to_data.values()
        return sum(d.handle[1] for d in pool if not getattr(d, "is_asleep", False)) / 2**30

    # --- weights -------------------------------------------------------------------------------------
    def _model_runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.worker.model_runner

    def _check_reload_api(self) -> bool:
        reload = getattr(self._model_runner(), "reload_weights", None)
        return reload is not None and "weights_iterator" in inspect.signature(reload).parameters

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self._asleep:
            raise RuntimeError("load_weights on a sleeping engine: call wake_up() first")
        pushed = [0]

        def stream() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in named_tensors:
                pushed[0] += 1
                yield vllm_weight_name(name), tensor

        if self._reload_takes_iterator:
            # never without the iterator: that reloads the checkpoint from disk (trl#5312)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream(),
                                                              "is_checkpoint_format": True})
        else:
            self._model_runner().model.load_weights(stream())
        if pushed[0] == 0:
            raise RuntimeError("load_weights got no tensors: the engine would keep stale or freed weights")
        self._weights_current = True
        self._restore_input_norm()
        self._wake([t for t in ("kv_cache",) if t in self._asleep])
        self.reset_prefix_cache()
        # embeddings of earlier images were computed with the old weights (and the reload dropped the
        # worker's copies while the scheduler still lists them: `Encoder cache miss` on a repeat image)
        self._reset_encoder_cache()

    # --- generation ----------------------------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingParams):
        from vllm import SamplingParams as VLLMSamplingParams

        # a hard ban, as HF's suppress_tokens: -inf added to a few logits (a vocabulary-sized
        # allowed_token_ids list costs a 152k-entry mask per request and older releases reject it)
        bias = {int(t): float("-inf") for t in sampling.banned_token_ids} or None
        greedy = sampling.temperature == 0
        return VLLMSamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=1.0 if greedy else sampling.top_p, top_k=0,
            max_tokens=sampling.max_tokens, seed=None, logprobs=0 if sampling.logprobs else None,
            stop_token_ids=[self.eos_token_id] if self.eos_token_id is not None else None,
            logit_bias=bias, detokenize=False)

    def generate(self, requests: list[Request], sampling: SamplingParams) -> list[Completion]:
        if "weights" in self._asleep:
            raise RuntimeError("generate on a sleeping engine: call wake_up() and load_weights() first")
        if not self._weights_current:
            raise RuntimeError("generate after a level-2 sleep (or on dummy weights) without a weight push: "
                               "the engine's weights are garbage; call load_weights() after wake_up()")
        self._wake([t for t in ("kv_cache",) if t in self._asleep])
        mine = [(r.prompt_ids.tolist(), list(r.images)) for r in requests]
        batch, seed, lo = self._tp_batch(mine, sampling.seed)
        prompts = [vllm_prompt(ids, imgs, image_token_id=self.image_token_id,
                               mm_processor_kwargs=self.mm_processor_kwargs) for ids, imgs in batch]
        # no per-request seed: one makes vLLM sample through a per-request generator, a Python loop over
        # the batch instead of FlashInfer (topk_topp_sampler.py; the V2 runner likewise skips its fused
        # sampler); the call's RNG is seeded once instead (step_rng)
        params = [self._sampling_params(sampling) for _ in batch]
        with step_rng(seed):
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        out: list[Completion] = []
        for (ids, _), res in list(zip(batch, outputs))[lo:lo + len(mine)]:
            samples = sorted(res.outputs, key=lambda o: o.index)
            assert len(samples) == sampling.n, f"vLLM returned {len(samples)} samples, asked for {sampling.n}"
            out += [completion_from_output(ids, o, sampling.logprobs) for o in samples]
        return out

    def _tp_batch(self, mine: list, seed: int) -> tuple[list, int, int]:
        """Under tensor parallelism every rank of a TP group must run the same requests with the same
        seeds (each rank schedules and samples on its own): gather the group's prompts, run them all, keep
        this rank's slice. Returns (requests, seed, offset of this rank's requests)."""
        if self.tensor_parallel_size == 1:
            return mine, seed, 0
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        parts: list[Any] = [None] * group.world_size
        dist.all_gather_object(parts, (mine, seed), group=group.cpu_group)
        offset = sum(len(p[0]) for p in parts[:group.rank_in_group])
        return [r for p in parts for r in p[0]], parts[0][1], offset
