"""Benchmark accuracy of trained models, with the validation code path of training.

``python -m rlcs_fast.eval --model DIR [--model DIR2 ...] --data SET [--split S] [--n K] [--temperature T]
[--out DIR]``

The paper's benchmarks (MathVista, MathVerse, MathVision, We-Math; loaders and scorers in
:mod:`rlcs_fast.benchmarks`): ``--suite paper --model BASE --model SFT --model RL [--out DIR]``, or
``--bench NAME`` for one, or ``--bench NAME --data SET --score-only ANSWERS.jsonl`` to score responses
produced elsewhere.

The generate-and-score core (:mod:`rlcs_fast.validation`) is the one the trainer's ``Validator`` runs,
so for the same checkpoint, prompts, greedy decoding and scorer, ``eval`` gives the ``val/accuracy`` the
training run logged. Prompt settings (template, system prompt, pixel bounds,
token limits, reward) come from the run's ``config.toml`` found beside the model directory (an export
``<run.dir>/<stage>/hf`` has it two levels up), else from the command line and the defaults.

Data: any benchmark-format set (hub id, local parquet/JSONL, or ``synthetic`` for the shipped task's val
split) with an image column (``images`` or ``image``), a question (``problem`` or ``question``) and an
``answer``; an optional ``category`` / ``subject`` / ``question_type`` column gives a per-category
breakdown (MathVista, MathVerse, We-Math style).

Metrics per model, over the prompts that could be encoded: ``pass@1`` (the first sample of each prompt:
the greedy answer at temperature 0), ``mean@k`` (accuracy averaged over all k samples; the unbiased
pass@1 estimate, and what ``val/accuracy`` is), ``pass@k`` (some sample correct) and ``format``. Every
answer goes to ``<out>/<model-name>.jsonl``; the side-by-side table to stdout, ``<out>/summary.md`` and
``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .eval_model import (  # noqa: F401  (rlcs_fast.eval.* names of the loading half, as before)
    EvalSettings,
    display_path,
    find_run_config,
    load_for_eval,
    model_name,
    resolve_eval_model,
    resolve_settings,
    run_settings,
)
from .rollout.build import banned_token_ids
from .validation import generate_and_score, val_sampling

log = logging.getLogger("rlcs_fast")

IMAGE_COLUMNS = ("images", "image")
PROBLEM_COLUMNS = ("problem", "question")
ANSWER_COLUMNS = ("answer",)
CATEGORY_COLUMNS = ("category", "subject", "question_type")


# --- metrics -------------------------------------------------------------------------------------------

def summarize(records: list[dict[str, Any]], n: int,
              categories: dict[int, str] | None = None) -> dict[str, Any]:
    """pass@1, mean@k, pass@k and format over prompts (records grouped by ``index``), overall and per
    category."""
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_prompt[r["index"]].append(r)

    def stats(indices: list[int]) -> dict[str, float]:
        groups = [sorted(by_prompt[i], key=lambda r: r["sample"]) for i in indices]
        count = max(len(groups), 1)
        out = {"prompts": len(groups),
               "pass@1": sum(g[0]["accuracy"] for g in groups) / count,
               f"mean@{n}": sum(sum(r["accuracy"] for r in g) / len(g) for g in groups) / count,
               "format": sum(sum(r["format"] for r in g) / len(g) for g in groups) / count}
        if n > 1:
            out[f"pass@{n}"] = sum(max(r["accuracy"] for r in g) for g in groups) / count
        return out

    indices = sorted(by_prompt)
    summary = {"overall": stats(indices)}
    if categories:
        per: dict[str, list[int]] = defaultdict(list)
        for i in indices:
            per[categories.get(i, "")].append(i)
        summary["categories"] = {c: stats(ix) for c, ix in sorted(per.items())}
    return summary


def comparison_markdown(summaries: dict[str, dict[str, Any]], n: int) -> str:
    """Metrics as rows, models as columns; per-category rows give the category's mean@k."""
    names = list(summaries)
    metrics = ["prompts", "pass@1", f"mean@{n}"] + ([f"pass@{n}"] if n > 1 else []) + ["format"]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in metrics:
        cells = [summaries[name]["overall"].get(m) for name in names]
        lines.append(f"| {m} | " + " | ".join(_cell(v) for v in cells) + " |")
    cats = sorted({c for s in summaries.values() for c in s.get("categories", {})})
    for c in cats:
        cells = [summaries[name].get("categories", {}).get(c, {}).get(f"mean@{n}") for name in names]
        lines.append(f"| {c or '(none)'} mean@{n} | " + " | ".join(_cell(v) for v in cells) + " |")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{100 * v:.1f}"


# --- settings and data ---------------------------------------------------------------------------------

def detect_columns(names: list[str], source: str) -> tuple[str, str, str, str | None]:
    def pick(options: tuple[str, ...], what: str) -> str:
        for o in options:
            if o in names:
                return o
        raise ConfigError(f"--data {source!r}: no {what} column (looked for {list(options)}, found {names}).")

    category = next((c for c in CATEGORY_COLUMNS if c in names), None)
    return pick(IMAGE_COLUMNS, "image"), pick(PROBLEM_COLUMNS, "question"), pick(ANSWER_COLUMNS,
                                                                                 "answer"), category


def evaluate_model(model_dir: str, args: argparse.Namespace, device: torch.device) -> tuple[list[dict], dict]:
    """Encode the set with this model's processor and run settings, generate, score; records + summary."""
    from .data import Columns, Encoder, SkipCounter, encode_many, lazy_images, load_table
    from .rewards import RewardScorer

    cfg, cfg_path = run_settings(model_dir)
    s = resolve_settings(cfg, args)
    log.info("eval %s: settings from %s", model_dir, cfg_path or "defaults and flags")
    table = load_table(args.data, args.split, kind="rl", seed=s.seed, synthetic_size=s.synthetic_val_size,
                       key="--data")
    if args.limit:
        table = table.select(range(min(args.limit, len(table))))
    image_col, problem_col, answer_col, category_col = detect_columns(list(table.column_names), args.data)
    table = lazy_images(table, image_col)
    processor, mcfg, engine = load_for_eval(model_dir, s, args.engine, device)
    encoder = Encoder(processor, mcfg, Columns(image_col, problem_col, answer_col), template=s.template,
                      system_prompt=s.system_prompt, min_pixels=s.min_pixels, max_pixels=s.max_pixels,
                      max_length=s.max_prompt_length, max_images=s.rollout.max_images_per_prompt)
    skips = SkipCounter()
    prompts = encode_many(lambda row, i: encoder.prompt(row, i),
                          ((table[i], i) for i in range(len(table))), skips, "--data")
    tok = processor.tokenizer
    sampling = val_sampling(n=args.n, temperature=args.temperature, top_p=s.top_p,
                            max_tokens=s.max_new_tokens, seed=s.seed, banned_token_ids=banned_token_ids(mcfg))
    with RewardScorer(fn=s.reward_function or None, format_weight=s.format_weight,
                      timeout_s=s.reward_timeout_s, num_workers=s.reward_workers) as scorer:
        records = generate_and_score(engine, tok, prompts, sampling, scorer)
    del engine
    categories = {}
    for rec in records:
        row = table[rec["index"]]
        rec["question"] = row[problem_col]
        if category_col is not None:
            rec["category"] = categories.setdefault(rec["index"], str(row[category_col]))
    summary = summarize(records, args.n, categories if category_col else None)
    summary["overall"]["skipped"] = skips.total
    summary["settings"] = {"model": str(model_dir), "run_config": str(cfg_path) if cfg_path else None,
                           "data": args.data, "split": args.split, "n": args.n,
                           "temperature": args.temperature, "max_new_tokens": s.max_new_tokens}
    return records, summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[],
                   help="model directory, or 'tiny' (repeat to compare models)")
    p.add_argument("--data", action="append", default=[],
                   help="hub id, local parquet/JSONL file or folder, or 'synthetic'; with --suite/--bench a "
                        "local "
                        "copy of a benchmark as NAME=PATH (repeat), or PATH for a single --bench")
    p.add_argument("--suite", choices=("paper",), default=None,
                   help="the paper's benchmarks: MathVista, MathVerse, MathVision, We-Math")
    p.add_argument("--bench", action="append", default=[], help="one benchmark (repeat for several)")
    p.add_argument("--score-only", default=None, metavar="ANSWERS.jsonl",
                   help="score given responses ({\"index\": row, \"response\": text} per line) for one "
                        "--bench")
    p.add_argument("--split", default=None,
                   help="split (default test; with benchmarks their published split, or NAME=SPLIT)")
    p.add_argument("--n", type=int, default=1, help="responses per question (mean@k, pass@k)")
    p.add_argument("--temperature", type=float, default=None,
                   help="0: greedy (default; benchmarks: the run's grpo.val_temperature)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the run's grpo.max_response_length")
    p.add_argument("--out", default="eval_out", help="output folder for answers (JSONL) and summary.md/.json")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vLLM on GPU, else transformers")
    p.add_argument("--limit", type=int, default=0, help="first N rows only (0: all)")
    p.add_argument("--chunk", type=int, default=0,
                   help="benchmarks: rows generated and saved at a time (default: the run's "
                        "rollout.batch_size)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="sequences per transformers generate call")
    p.add_argument("--prompt-template", default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--reward-workers", type=int, default=None)
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        p.error("--temperature must be >= 0")
    if args.suite or args.bench or args.score_only:
        if args.n != 1:
            p.error("--suite/--bench score one answer per question (--n 1), as the benchmarks publish")
        if args.score_only and len(args.bench) != 1:
            p.error("--score-only needs exactly one --bench")
        if not args.score_only and not args.model:
            p.error("--suite/--bench need at least one --model")
        return args
    if not args.model or len(args.data) != 1:
        p.error("give --model and one --data (or --suite paper / --bench NAME)")
    args.data, args.split = args.data[0], args.split or "test"
    args.temperature = 0.0 if args.temperature is None else args.temperature
    if args.n > 1 and args.temperature == 0:
        p.error("--n > 1 needs --temperature > 0: greedy decoding gives n identical answers")
    return args


def main(argv: list[str] | None = None) -> int:
    from .metrics import setup_logging

    args = parse_args(argv)
    setup_logging(0)
    if args.suite or args.bench or args.score_only:
        from .benchmarks.cli import run

        return run(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    taken: set[str] = set()
    try:
        for model in args.model:
            model_dir = resolve_eval_model(model)
            name = model_name(display_path(model, model_dir), taken)
            records, summary = evaluate_model(model_dir, args, device)
            with (out / f"{name}.jsonl").open("w") as f:
                for rec in records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            summaries[name] = summary
            log.info("eval %s: %s", name, "  ".join(f"{k} {v:.4f}" for k, v in summary["overall"].items()
                                                     if isinstance(v, float)))
    except ConfigError as e:
        print(f"rlcs_fast.eval: {e}", file=sys.stderr)
        return 2
    table = comparison_markdown(summaries, args.n)
    header = (f"# eval on {args.data} ({args.split}), n={args.n}, temperature={args.temperature}; "
              "accuracy in %\n\n")
    (out / "summary.md").write_text(header + table + "\n")
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
