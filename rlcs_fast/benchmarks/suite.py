"""Run models on the paper's benchmarks, or score answers produced elsewhere; resumable.

Every answer goes to ``<out>/<model>/<bench>.jsonl`` as soon as its chunk is scored (append-only, one
line per row, keyed by ``index``), so a killed run continues where it stopped: rows already in the file
are not generated again, and a line cut short by the kill is ignored and redone. Prompts, pixels,
sampling and token limits are the run's validation settings (``config.toml`` beside the export) unless a
flag overrides them; one answer per question, greedy unless ``grpo.val_temperature`` or ``--temperature``
says otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..config import ConfigError
from . import SCORER, payload
from .common import data_root, load_split, row_image

log = logging.getLogger("rlcs_fast")


# --- data ----------------------------------------------------------------------------------------------


def load_bench(bench: ModuleType, source: str | None, split: str | None, limit: int = 0):
    """The benchmark's table (hub id by default) and the folder its relative image paths start from."""
    import datasets

    from ..data import lazy_images

    source = source or bench.HUB_ID
    table = load_split(source, split or bench.SPLIT, bench.CONFIG, key=f"--data ({bench.NAME})")
    missing = [c for c in ("answer",) if c not in table.column_names]
    if missing or not any(c in table.column_names for c in bench.IMAGE_COLUMNS):
        raise ConfigError(
            f"--data {source!r} is not in {bench.TITLE}'s schema: it has {table.column_names}, "
            f"needs 'answer' and one of {list(bench.IMAGE_COLUMNS)}."
        )
    if limit:
        table = table.select(range(min(limit, len(table))))
    for col in bench.IMAGE_COLUMNS:  # decode images one row at a time: a bad image skips one row
        if col in table.column_names and isinstance(table.features[col], datasets.Image):
            table = lazy_images(table, col)
    return table, data_root(source)


def targets_of(bench: ModuleType, table) -> list[dict[str, Any]]:
    return [bench.target(table[i]) for i in range(len(table))]


def row_ids(bench: ModuleType, table) -> dict[str, int]:
    if bench.ID_COLUMN not in table.column_names:
        return {}
    return {str(v): i for i, v in enumerate(table[bench.ID_COLUMN])}


# --- answers on disk -----------------------------------------------------------------------------------


def read_records(path: Path) -> dict[int, dict[str, Any]]:
    """Finished rows of an answers file, by index; a torn last line (a killed write) is dropped."""
    records: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("index"), int):
            records[rec["index"]] = rec
    return records


def _repair_tail(path: Path) -> None:
    """Cut a torn last line so that appended records start on a line of their own."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            path.write_bytes(data[: data.rfind(b"\n") + 1])


def summarize(bench: ModuleType, targets: list[dict], records: dict[int, dict]) -> dict[str, Any]:
    """The benchmark's metrics over the rows that have an answer (skipped rows count as wrong)."""
    done = sorted(i for i in records if i < len(targets))
    out = bench.metrics([targets[i] for i in done], [float(records[i]["accuracy"]) for i in done])
    out["format"] = sum(float(records[i].get("format", 0.0)) for i in done) / max(len(done), 1)
    out["skipped"] = sum(1 for i in done if records[i].get("skipped"))
    out["answered"] = len(done)
    out["rows"] = len(targets)
    return out


# --- generation ----------------------------------------------------------------------------------------


def run_model(
    model_dir: str,
    name: str,
    benches: list[tuple[ModuleType, str | None, str | None]],
    args: argparse.Namespace,
    device: torch.device,
    out: Path,
    fallback_config: Path | None = None,
) -> dict[str, dict]:
    """Generate and score the missing rows of each benchmark for one model; its summary per benchmark.
    A model without a run config of its own (the base model) takes ``fallback_config``'s settings."""
    from ..config import Config, load_config
    from ..data import Columns, Encoder, SkipSample
    from ..eval_model import load_for_eval, resolve_settings, run_settings
    from ..rewards import RewardScorer
    from ..rollout.build import banned_token_ids
    from ..validation import val_sampling

    cfg, cfg_path = run_settings(model_dir) if Path(model_dir).is_dir() else (None, None)
    if cfg_path is None and fallback_config is not None:
        cfg, cfg_path = load_config(fallback_config), fallback_config
    cfg = cfg if cfg is not None else Config()
    s = resolve_settings(cfg, args)
    temperature = cfg.grpo.val_temperature if args.temperature is None else args.temperature
    log.info(
        "eval %s: settings from %s, temperature %s, max %d new tokens",
        name,
        cfg_path or "defaults and flags",
        temperature,
        s.max_new_tokens,
    )
    processor, mcfg, engine = load_for_eval(model_dir, s, args.engine, device)
    encoder = Encoder(
        processor,
        mcfg,
        Columns("images", "problem", "answer"),
        template=s.template,
        system_prompt=s.system_prompt,
        min_pixels=s.min_pixels,
        max_pixels=s.max_pixels,
        max_length=s.max_prompt_length,
        max_images=s.rollout.max_images_per_prompt,
    )
    sampling = val_sampling(
        n=1,
        temperature=temperature,
        top_p=s.top_p,
        max_tokens=s.max_new_tokens,
        seed=s.seed,
        banned_token_ids=banned_token_ids(mcfg),
    )
    tok = processor.tokenizer
    summaries = {}
    with RewardScorer(fn=SCORER, timeout_s=s.reward_timeout_s, num_workers=s.reward_workers) as scorer:
        for bench, source, split in benches:
            table, root = load_bench(bench, source, split, args.limit)
            targets = targets_of(bench, table)
            path = out / name / f"{bench.NAME}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            records = read_records(path)
            todo = [i for i in range(len(table)) if i not in records]
            if records:
                log.info(
                    "eval %s/%s: resuming, %d of %d rows done",
                    name,
                    bench.NAME,
                    len(table) - len(todo),
                    len(table),
                )
            _repair_tail(path)
            bar = _bar(f"{name} {bench.NAME}", len(table), len(table) - len(todo), args.progress)
            chunk = max(1, args.chunk or s.batch_size)
            with path.open("a") as f:
                for start in range(0, len(todo), chunk):
                    new = []
                    prompts = []
                    for i in todo[start : start + chunk]:
                        row = table[i]
                        sample = {
                            "images": [row_image(row, bench.IMAGE_COLUMNS, root)],
                            "problem": bench.question(row),
                            "answer": payload(bench.NAME, targets[i]),
                        }
                        try:
                            prompts.append(encoder.prompt(sample, i))
                        except SkipSample as e:  # counted as a wrong answer, as a missing one would be
                            new.append({"index": i, "skipped": e.kind, "accuracy": 0.0, "format": 0.0})
                    new += _generate_and_score(engine, tok, prompts, sampling, scorer, bench, targets)
                    for rec in new:
                        rec["id"] = str(table[rec["index"]].get(bench.ID_COLUMN, rec["index"]))
                        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        records[rec["index"]] = rec
                    f.flush()
                    if bar is not None:
                        bar.update(len(new))
            if bar is not None:
                bar.close()
            summaries[bench.NAME] = summarize(bench, targets, records)
    del engine
    return summaries


def _generate_and_score(engine, tok, prompts, sampling, scorer, bench: ModuleType, targets) -> list[dict]:
    if not prompts:
        return []
    completions = engine.generate(prompts, sampling)
    responses = tok.batch_decode([c.response_ids for c in completions], skip_special_tokens=True)
    scores = scorer.score(responses, [p.answer for p in prompts])
    out = []
    for p, c, response, score in zip(prompts, completions, responses, scores):
        t = targets[p.index]
        out.append(
            {
                "index": p.index,
                "response": response,
                "prediction": _prediction(bench, response, t),
                "answer": t["answer"],
                "accuracy": score["accuracy"],
                "format": score["format"],
                "response_tokens": len(c.response_ids),
                "finish_reason": c.finish_reason,
            }
        )
    return out


def _prediction(bench: ModuleType, response: str, target: dict) -> str | None:
    """The normalised answer, for reading the JSONL (the score itself comes from the bounded workers)."""
    try:
        return bench.prediction(response, target)
    except Exception:  # odd text: the record still has its score
        return None


def _bar(desc: str, total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5)


# --- answers produced elsewhere ------------------------------------------------------------------------


def score_answers(
    bench: ModuleType,
    source: str | None,
    split: str | None,
    answers: Path,
    out: Path,
    name: str,
    *,
    workers: int = 2,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Score ``{"index"|"id"|"pid", "response"}`` lines against the split, as the official scripts do."""
    from ..rewards import RewardScorer

    table, _ = load_bench(bench, source, split)
    targets = targets_of(bench, table)
    ids = row_ids(bench, table)
    rows: dict[int, str] = {}
    for n, line in enumerate(answers.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--score-only {str(answers)!r} line {n} is not JSON ({e}).") from e
        rows[_answer_row(obj, ids, len(table), answers, n)] = str(obj.get("response") or "")
    if len(rows) < len(table):
        log.warning(
            "score-only %s: %d of %d rows have no answer; scored over the %d answered, as the "
            "official scripts do",
            bench.NAME,
            len(table) - len(rows),
            len(table),
            len(rows),
        )
    order = sorted(rows)
    with RewardScorer(fn=SCORER, timeout_s=timeout_s, num_workers=workers) as scorer:
        scores = scorer.score([rows[i] for i in order], [payload(bench.NAME, targets[i]) for i in order])
    records = {}
    for i, score in zip(order, scores):
        records[i] = {
            "index": i,
            "id": str(table[i].get(bench.ID_COLUMN, i)),
            "response": rows[i],
            "prediction": _prediction(bench, rows[i], targets[i]),
            "answer": targets[i]["answer"],
            "accuracy": score["accuracy"],
            "format": score["format"],
        }
    path = out / name / f"{bench.NAME}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(records[i], ensure_ascii=False) + "\n" for i in order))
    return summarize(bench, targets, records)


def _answer_row(obj: Any, ids: dict[str, int], n_rows: int, answers: Path, line: int) -> int:
    if not isinstance(obj, dict) or "response" not in obj:
        raise ConfigError(
            f'--score-only {str(answers)!r} line {line}: expected {{"index": row, "response": '
            'text}} (or "id"/"pid" instead of "index").'
        )
    if isinstance(obj.get("index"), int) and 0 <= obj["index"] < n_rows:
        return obj["index"]
    for key in ("id", "pid"):
        if key in obj and str(obj[key]) in ids:
            return ids[str(obj[key])]
    raise ConfigError(
        f"--score-only {str(answers)!r} line {line}: no row of the split matches "
        f"{ {k: obj[k] for k in ('index', 'id', 'pid') if k in obj} } ({n_rows} rows)."
    )
