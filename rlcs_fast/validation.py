"""Validation: generate on held-out rows, score with the reward, average over ranks.

The generate-and-score core (:func:`generate_and_score`, :func:`val_sampling`, :func:`ground_truth`) is
shared by training's :class:`Validator` and ``python -m rlcs_fast.eval``, so ``eval`` on an exported
checkpoint reproduces the ``val/accuracy`` the run logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from . import dist
from .data import SkipCounter, encode_many, read_row
from .rollout.engine import Completion, SamplingParams
from .schedule import rank_share

log = logging.getLogger("rlcs_fast")


def ground_truth(answer: str) -> str:
    """The reference answer of a row: its last \\boxed{} content when it holds a full solution (the
    cold-start schema), else the answer itself (the RL schema)."""
    from .rewards import extract_boxed

    boxed = extract_boxed(answer)
    return boxed if boxed is not None else answer.strip()


def val_sampling(*, n: int, temperature: float, top_p: float, max_tokens: int, seed: int, rank: int = 0,
                 banned_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """Validation sampling: greedy at temperature 0 (top-p off), else the rollout top-p; a seed per rank."""
    return SamplingParams(n=n, temperature=temperature, top_p=1.0 if temperature == 0 else top_p,
                          max_tokens=max_tokens, seed=seed + 7919 * rank, banned_token_ids=banned_token_ids)


def generate_and_score(engine, tokenizer, prompts: list, sampling: SamplingParams,
                       scorer) -> list[dict[str, Any]]:
    """Generate ``sampling.n`` responses per prompt and score them with the reward's scorer.

    Returns one record per response, grouped by prompt: ``index`` (row), ``sample`` (0..n-1),
    ``response``, ``ground_truth`` and the scorer's ``accuracy``, ``format``, ``overall``."""
    completions: list[Completion] = engine.generate(prompts, sampling) if prompts else []
    responses = tokenizer.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
    answers = [ground_truth(p.answer) for p in prompts for _ in range(sampling.n)]
    scores = scorer.score(responses, answers) if responses else []
    records = []
    for j, (completion, response, answer, score) in enumerate(zip(completions, responses, answers, scores)):
        prompt = prompts[j // sampling.n]
        records.append({"index": prompt.index, "sample": j % sampling.n, "response": response,
                        "ground_truth": answer, "response_tokens": len(completion.response_ids),
                        "finish_reason": completion.finish_reason, **{k: float(v) for k, v in score.items()}})
    return records


class Validator:
    """When to validate a stage (every ``every`` steps and at its last step) and how: the optional
    ``loss`` measure (SFT's val NLL), then, when ``generate``, sampled answers scored by the reward.
    ``run`` logs the row under the stage and returns it."""

    def __init__(self, ctx, table, *, every: int, temperature: float, n: int, generate: bool = True,
                 loss: Callable[[], float] | None = None):
        self.ctx, self.table = ctx, table
        self.every, self.temperature, self.n = every, temperature, n
        self.generate, self.loss = generate, loss

    def should_validate(self, step: int, last: bool) -> bool:
        return last or bool(self.every and step % self.every == 0)

    def run(self, step: int) -> dict[str, float]:
        row = {}
        if self.loss is not None:
            row["val/loss"] = self.loss()
        if self.generate:
            row.update(self.generate_and_score())
        self.ctx.metrics.log(self.ctx.stage, step, row)
        log.info("%s step %d: %s", self.ctx.stage, step, "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
        return row

    @torch.no_grad()
    def generate_and_score(self) -> dict[str, float]:
        """Mean accuracy, format and reward of the answers to this rank's share of the rows, over ranks."""
        ctx, grpo = self.ctx, self.ctx.cfg.grpo
        encoder = ctx.encoder(max_length=grpo.max_prompt_length)
        rows = rank_share(list(range(len(self.table))), ctx.rank, ctx.world)
        prompts = encode_many(lambda row, i: encoder.prompt(row, i),
                              ((read_row(self.table, i), i) for i in rows), SkipCounter(), "data.val")
        engine = ctx.sync_engine()
        sampling = val_sampling(n=self.n, temperature=self.temperature, top_p=grpo.top_p,
                                max_tokens=grpo.max_response_length, seed=ctx.cfg.run.seed, rank=ctx.rank,
                                banned_token_ids=ctx.banned_token_ids)
        records = generate_and_score(engine, ctx.processor.tokenizer, prompts, sampling, ctx.scorer)
        engine.sleep()
        sums = dist.reduce_sums({"accuracy": sum(r["accuracy"] for r in records),
                                 "format": sum(r["format"] for r in records),
                                 "reward": sum(r["overall"] for r in records), "count": len(records)})
        count = max(sums.pop("count"), 1.0)
        return {f"val/{name}": total / count for name, total in sums.items()}
