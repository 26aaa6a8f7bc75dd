"""Rollouts with transformers `generate`: the CPU default and the reference the vLLM engine is checked
against. Like vLLM it holds its own copy of the weights (bf16 on GPU), refreshed by `load_weights`
from the trainer's stream, so the loop's sync path is the same for both engines."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import AutoConfig, PreTrainedModel

from ..families import family_for
from .engine import Completion, Request, SamplingParams


class HFEngine:
    def __init__(self, model_path: str | PreTrainedModel, *, device: torch.device,
                 batch_size: int, eos_token_id: int, pad_token_id: int):
        self.device = torch.device(device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        if isinstance(model_path, str):
            config = AutoConfig.from_pretrained(model_path)
            model_path = family_for(config).model_class().from_pretrained(
                model_path, config=config, dtype=dtype, attn_implementation="sdpa")
        # an already built model (the profiler's random-weight 3B/7B) is taken over as it is
        self.model = model_path.to(self.device, dtype).eval()
        self.model.generation_config.cache_implementation = None
        self.batch_size = batch_size
        self.eos, self.pad = eos_token_id, pad_token_id
        self.awake = True
        self._params = self.model.state_dict(keep_vars=True)  # tied weights appear under both names

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        assert self.awake, "load_weights on a sleeping engine: call wake_up() first"
        for name, tensor in named_tensors:
            if name not in self._params:
                raise KeyError(f"HFEngine.load_weights: unknown parameter {name!r}")
            self._params[name].copy_(tensor)

    def sleep(self) -> None:
        if self.device.type == "cuda":  # free the GPU for the trainer, as vLLM's sleep mode does
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.awake = False

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.awake = True

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: SamplingParams) -> list[Completion]:
        assert self.awake, "generate on a sleeping engine: call wake_up() first"
        expanded = [r for r in requests for _ in range(sampling.n)]
        out: list[Completion] = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # generation keeps its own RNG stream
            torch.manual_seed(sampling.seed)
            for start in range(0, len(expanded), self.batch_size):
                out += self._generate_batch(expanded[start:start + self.batch_size], sampling)
        return out

    def _generate_batch(self, batch: list[Request], sampling: SamplingParams) -> list[Completion]:
        lengths = [r.prompt_ids.numel() for r in batch]
        width = max(lengths)
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):  # left padding
            input_ids[i, width - lengths[i]:] = r.prompt_ids
            attention_mask[i, width - lengths[i]:] = 1
        kwargs = {}
        pixels = [r.pixel_values for r in batch if r.pixel_values is not None]
        if pixels:
            kwargs["pixel_values"] = torch.cat(pixels).to(self.device, self.model.dtype)
            kwargs["image_grid_thw"] = torch.cat([r.image_grid_thw for r in batch
                                                  if r.image_grid_thw is not None]).to(self.device)
            # transformers 5 computes Qwen2.5-VL's 3-D mrope positions only when it is given the token types
            # (as the stock processor returns them); without them every token gets a 1-D text position and
            # the engine samples from a different model than the trainer's (rollout/logprob_diff 0.01-0.3)
            kwargs["mm_token_type_ids"] = (input_ids
                                           == self.model.config.image_token_id).int().to(self.device)
        greedy = sampling.temperature == 0
        gen = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None, max_new_tokens=sampling.max_tokens,
            eos_token_id=self.eos, pad_token_id=self.pad, use_cache=True,
            suppress_tokens=list(sampling.banned_token_ids) or None,
            return_dict_in_generate=True, output_logits=sampling.logprobs, **kwargs)
        new = gen.sequences[:, width:].cpu()
        logps = None
        if sampling.logprobs:
            # raw logits, before temperature, top-p and suppress_tokens: the rule of SamplingParams.logprobs
            logits = torch.stack(gen.logits, dim=1).float().cpu()  # [B, T_new, V]
            logps = torch.log_softmax(logits, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        out = []
        for i, r in enumerate(batch):
            ids = new[i].tolist()
            finish = "length"
            if self.eos in ids:
                ids = ids[: ids.index(self.eos) + 1]
                finish = "stop"
            out.append(Completion(r.prompt_ids.tolist(), ids,
                                  logps[i, : len(ids)].tolist() if logps is not None else None, finish))
        return out
