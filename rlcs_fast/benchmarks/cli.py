"""``python -m rlcs_fast.eval --suite paper | --bench NAME [--score-only ANSWERS.jsonl]``: which benchmarks,
from where, for which models; then the table (:mod:`.report`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ..config import ConfigError
from . import BENCHMARKS, PAPER_SUITE, get

log = logging.getLogger("rlcs_fast")


def per_bench(values: list[str], benches: list[str], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` entries (or one bare ``VALUE`` when a single benchmark runs) → {bench: value}."""
    out: dict[str, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if sep and name in BENCHMARKS:
            out[name] = rest
        elif len(benches) == 1:
            out[benches[0]] = v
        else:
            raise ConfigError(
                f"{flag} {v!r}: with several benchmarks, give NAME=VALUE with NAME in {sorted(BENCHMARKS)}."
            )
    unknown = sorted(set(out) - set(benches))
    if unknown:
        raise ConfigError(f"{flag} names {unknown}, which this run does not evaluate ({benches}).")
    return out


def resolve_model(model: str) -> str:
    """A model directory, ``tiny`` / ``tiny-qwen3-vl``, or a hub id (``Qwen/Qwen2.5-VL-7B-Instruct``, the
    base model) resolved to its local snapshot directory, the one directory the processor, the engine and
    the settings read."""
    from ..eval_model import resolve_eval_model

    return resolve_eval_model(model)


def shared_run_config(models: list[str]) -> Path | None:
    """The first run config among the models: a model without one (the base model) is prompted and
    sampled like the trained ones it is compared with."""
    from ..eval_model import find_run_config

    for m in models:
        if Path(m).is_dir():
            path = find_run_config(m)
            if path is not None:
                return path
    return None


def run(args: argparse.Namespace) -> int:
    from ..eval_model import display_path, model_name
    from .report import write_report
    from .suite import run_model, score_answers

    benches = list(PAPER_SUITE) if args.suite else list(dict.fromkeys(args.bench))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        modules = [get(b) for b in benches]
        data = per_bench(args.data, benches, "--data")
        splits = per_bench([args.split] if args.split else [], benches, "--split")
        plan = [(m, data.get(m.NAME), splits.get(m.NAME)) for m in modules]
        summaries: dict[str, dict] = {}
        if args.score_only:
            answers = Path(args.score_only)
            if not answers.is_file():
                raise ConfigError(f"--score-only {args.score_only!r} is not a file.")
            name = model_name(answers.with_suffix(""), set())
            bench, source, split = plan[0]
            summaries[name] = {
                bench.NAME: score_answers(
                    bench, source, split, answers, out, name, workers=args.reward_workers or 2
                )
            }
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            taken: set[str] = set()
            dirs = [resolve_model(m) for m in args.model]
            fallback = shared_run_config(dirs)
            for model, model_dir in zip(args.model, dirs):
                name = model_name("tiny" if model == "tiny" else display_path(model, model_dir), taken)
                summaries[name] = run_model(model_dir, name, plan, args, device, out, fallback)
                log.info(
                    "eval %s: %s",
                    name,
                    "  ".join(f"{b} {m['accuracy']:.4f}" for b, m in summaries[name].items()),
                )
    except ConfigError as e:
        print(f"rlcs_fast.eval: {e}", file=sys.stderr)
        return 2
    header = "eval: " + ", ".join(f"{m.TITLE} ({s or m.SPLIT})" for m, _, s in plan)
    table = write_report(summaries, benches, out, header)
    print(table)
    return 0
