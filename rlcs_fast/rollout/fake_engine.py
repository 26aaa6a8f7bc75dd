"""A rollout engine for tests with `VLLMEngine`'s method names and state machine, sampling from a real
(tiny) model through `HFEngine`, so the whole GRPO loop can run on a CPU with the engine vLLM has.

What it enforces, as vLLM does (or as vLLM silently gets wrong, which is why it is checked here):
- no `generate` while asleep;
- a level-2 sleep frees the weights (here: overwritten with NaN, the way freed GPU memory holds garbage),
  so after it no `generate` until a *complete* push of the weights followed the wake;
- no `load_weights` into sleeping weights;
- no waking of the weights unless the trainer released its cached allocator blocks since the last
  sleep (`trainer_utils.release_cached_memory`): vLLM maps its memory outside torch's cache, and a
  trainer that keeps its training peak cached runs out of memory at the second wake on a GPU;
- one live instance per process (vLLM's sleep mode allows one): a second one raises until the first
  is `shutdown()`.
It records every call (`calls`) and a SHA-256 checksum of every pushed tensor (`pushes`, one dict per
`load_weights`), so a test can compare what reached the engine with the policy's weights.

Injected in tests by replacing `rlcs_fast.rollout.engine.make_engine` (the stage builds its engine
through that module attribute)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

from ..trainer_utils import allocator_releases
from .engine import Completion, Request, SamplingParams
from .hf_engine import HFEngine
from .vllm_engine import SLEEP_TAGS, vllm_weight_name


def tensor_checksum(t: torch.Tensor) -> str:
    """Bitwise identity of a tensor's values (dtype and shape included)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FakeEngine:
    _live: FakeEngine | None = None  # the process's engine that has not been shut down

    def __init__(self, model_path: str, *, device: torch.device | str = "cpu", batch_size: int = 64,
                 eos_token_id: int, pad_token_id: int, sleep_level: int = 2, **_engine_kwargs):
        if FakeEngine._live is not None:
            raise RuntimeError("a second sleep-mode engine in this process: vLLM allows one; reuse the live "
                               "engine or shut it down first")
        FakeEngine._live = self
        self.inner = HFEngine(model_path, device=torch.device(device), batch_size=batch_size,
                              eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        self.sleep_level = sleep_level
        self.calls: list[str] = []
        self.pushes: list[dict[str, str]] = []
        self._names = set(self.inner.model.state_dict())
        self._asleep: set[str] = set()
        self._weights_current = True
        self._releases_at_sleep = allocator_releases()
        self.sleep()  # as VLLMEngine starts (load_format="dummy", asleep): the first push is mandatory

    @property
    def asleep(self) -> frozenset[str]:
        return frozenset(self._asleep)

    def sleep(self, level: int | None = None) -> None:
        level = self.sleep_level if level is None else level
        self.calls.append(f"sleep({level})")
        self._asleep = set(SLEEP_TAGS)
        self._releases_at_sleep = allocator_releases()
        if level >= 2:
            self._weights_current = False
            with torch.no_grad():
                for p in self.inner.model.parameters():
                    p.fill_(float("nan"))

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        tags = ["weights"] if tags is None else list(tags)
        assert set(tags) <= set(SLEEP_TAGS), f"unknown sleep tags {tags}"
        if "kv_cache" in tags and "weights" in self._asleep and "weights" not in tags:
            raise RuntimeError("wake the weights before the KV cache")
        released = allocator_releases() > self._releases_at_sleep
        if "weights" in tags and "weights" in self._asleep and not released:
            raise RuntimeError("wake_up without releasing the trainer's cached allocator blocks since the "
                               "last sleep: call trainer_utils.release_cached_memory() before every wake")
        self.calls.append(f"wake_up({','.join(tags)})")
        self._asleep -= set(tags)

    def reset_prefix_cache(self) -> None:
        self.calls.append("reset_prefix_cache")

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self._asleep:
            raise RuntimeError("load_weights on a sleeping engine: call wake_up() first")
        self.calls.append("load_weights")
        sums: dict[str, str] = {}
        stream = []
        for name, tensor in named_tensors:
            name = vllm_weight_name(name)
            sums[name] = tensor_checksum(tensor)
            stream.append((name, tensor))
        self.inner.load_weights(stream)
        self.pushes.append(sums)
        missing = self._names - set(sums)
        if not self._weights_current and missing:
            raise RuntimeError(f"partial push after a level-2 sleep: {len(missing)} tensors missing, "
                               f"e.g. {sorted(missing)[:3]}")
        self._weights_current = True
        if "kv_cache" in self._asleep:
            self.wake_up(["kv_cache"])
        self.reset_prefix_cache()

    def generate(self, requests: list[Request], sampling: SamplingParams) -> list[Completion]:
        if "weights" in self._asleep:
            raise RuntimeError("generate on a sleeping engine: call wake_up() and load_weights() first")
        if not self._weights_current:
            raise RuntimeError("generate after a level-2 sleep without a weight push: the weights are freed")
        if "kv_cache" in self._asleep:
            self.wake_up(["kv_cache"])
        self.calls.append("generate")
        self.inner.awake = True
        return self.inner.generate(requests, sampling)

    def memory_gb(self) -> float:
        """Bytes of resident weights, as vLLM's pools would report them: 0 when they are asleep."""
        if "weights" in self._asleep:
            return 0.0
        return sum(p.numel() * p.element_size() for p in self.inner.model.parameters()) / 2**30

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        if FakeEngine._live is self:
            FakeEngine._live = None
