"""The shipped launch: a model by hub id resolved once to its offline snapshot, the launch preflight, a stage
that saves before it validates, and a broken reward plug-in that is seen, not silently scored 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_cache import cache_tiny, put_in_cache

REPO = "Qwen/Qwen2.5-VL-7B-Instruct"
CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """An offline HF cache in tmp_path, seen by this process's huggingface_hub."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _tiny_copy(d: Path) -> Path:
    import shutil

    from rlcs_fast.tiny import tiny_path

    shutil.copytree(tiny_path(), d, dirs_exist_ok=True)
    return d


def test_a_hub_id_resolves_to_its_offline_snapshot(hub_home):
    from rlcs_fast.config import ConfigError
    from rlcs_fast.eval_model import resolve_eval_model
    from rlcs_fast.model import resolve_model_path

    snap = put_in_cache(hub_home, REPO, _tiny_copy)
    # the trainer, the engine and eval all get this one local directory (today: the hub id, unchanged)
    assert Path(resolve_model_path(REPO)) == snap
    assert Path(resolve_eval_model(REPO)) == snap
    assert json.loads((Path(resolve_model_path(REPO)) / "config.json").read_text())["image_token_id"]
    with pytest.raises(ConfigError, match=r"model.path.*Qwen2.5-VL-3B-Instruct.*huggingface-cli download"):
        resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct")  # not in the cache, HF_HUB_OFFLINE
    with pytest.raises(ConfigError, match="neither a local directory nor a hub id"):
        resolve_model_path("./no/such/dir")


def test_the_shipped_ids_get_a_tiny_model_with_their_tying(hub_home):
    small = cache_tiny(hub_home, "Qwen/Qwen2.5-VL-3B-Instruct")
    large = cache_tiny(hub_home, REPO)
    tied = {d: json.loads((d / "config.json").read_text()).get("tie_word_embeddings") for d in (small, large)}
    assert tied == {small: True, large: False}


def test_preflight_names_the_key_and_the_fix(tmp_path):
    from rlcs_fast.config import load_config
    from rlcs_fast.preflight import preflight

    cfg = load_config(CONFIG)
    model = _tiny_copy(tmp_path / "model")
    assert preflight(cfg, str(model)) == []
    (model / "processor_config.json").write_text(json.dumps({"image_processor": {"patch_size": 14}}))
    config = json.loads((model / "config.json").read_text())
    del config["image_token_id"]
    (model / "config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink()
    problems = "\n".join(preflight(cfg, str(model)))
    assert "no image_mean/image_std" in problems and "preprocessor_config.json" in problems
    assert "no image_token_id" in problems and "Fix: copy image_token_id" in problems
    assert "no chat template" in problems


@pytest.mark.slow
def test_a_launch_with_a_broken_model_dir_stops_before_loading_weights(tmp_path):
    """The trainer stops in seconds naming the key (today: a traceback when the engine is built, after
    the stage has trained)."""
    import time

    model = _tiny_copy(tmp_path / "model")
    (model / "processor_config.json").write_text(json.dumps({"image_processor": {"patch_size": 14}}))
    (model / "model.safetensors").write_bytes(b"not weights")  # loading weights would fail differently
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir",
                           str(tmp_path / "run"), "--model.path", str(model)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "launch preflight" in proc.stderr and "image_mean/image_std" in proc.stderr, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    dry = subprocess.run([sys.executable, "-m", "rlcs_fast.train", "--cfg", CONFIG, "--dry-run",
                          "--model.path", str(model), "--data.synthetic_train_size", "4",
                          "--data.synthetic_val_size", "2"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=_env())
    assert dry.returncode == 1 and "launch preflight" in dry.stdout and "image_mean" in dry.stdout, dry.stdout


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("WORLD_SIZE", None)
    return env


SMALL = ["--log.progress", "false", "--data.synthetic_train_size", "16", "--data.synthetic_val_size", "2",
         "--sft.global_batch_size", "2", "--sft.max_tokens_per_microbatch", "600",
         "--grpo.rollout_batch_size", "2", "--grpo.mini_batch_size", "2", "--grpo.n", "2",
         "--grpo.max_response_length", "8", "--reward.num_workers", "1", "--rollout.engine", "hf"]


@pytest.mark.slow
def test_sft_saves_and_exports_before_it_validates(tmp_path):
    """A validation that fails at the last step costs no training: the checkpoint, the export and DONE
    are written first (today: validation ran first, so the run ended with none of them)."""
    from rlcs_fast.train import main

    class Broken:
        def sleep(self, level=None): ...
        def wake_up(self, tags=None): ...
        def load_weights(self, named_tensors):
            for _ in named_tensors:
                pass

        def generate(self, requests, sampling):
            raise RuntimeError("validation engine broke")

    run = tmp_path / "run"
    argv = ["--cfg", CONFIG, "--run.dir", str(run), "--run.stages", '["sft"]', "--sft.steps", "2",
            "--sft.val_generate", "true", *SMALL]
    with pytest.raises(RuntimeError, match="validation engine broke"):
        main(argv, engine=Broken())
    assert (run / "sft" / "DONE").is_file()
    assert (run / "sft" / "hf" / "config.json").is_file()
    assert any((run / "sft" / "checkpoints").iterdir())


NAN_PLUGIN = '''
import math, os

def score(response, answer):
    """NaN for every response of GRPO step 2 (calls 5-8: 2 prompts x 2 responses per step, no step-0
    validation); a file counts the calls, so a restarted worker keeps counting."""
    path = os.environ["NAN_PLUGIN_COUNTER"]
    with open(path, "a") as f:
        f.write("x")
    calls = os.path.getsize(path)
    return {"overall": math.nan if 4 < calls <= 8 else 0.5, "format": 1.0, "accuracy": 0.0}
'''


@pytest.mark.slow
def test_a_reward_returning_nan_skips_the_step(tmp_path):
    """Today the NaN is a worker error scored 0, counted nowhere a user sees: 0 skipped steps."""
    (tmp_path / "nan_plugin.py").write_text(NAN_PLUGIN)
    run = tmp_path / "run"
    env = _env() | {"PYTHONPATH": str(tmp_path), "NAN_PLUGIN_COUNTER": str(tmp_path / "calls")}
    proc = subprocess.run([sys.executable, "-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir", str(run),
                           "--run.stages", '["grpo"]', "--grpo.steps", "3",
                           "--grpo.val_before_train", "false", "--reward.function", "nan_plugin:score",
                           *SMALL], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["stage"] == "grpo" and "train/skipped_steps" in r}
    assert rows[1]["train/skipped_steps"] == 0 and rows[2]["train/skipped_steps"] >= 1
    assert rows[2]["reward/non_finite"] == 4 and rows[1]["reward/non_finite"] == 0
    assert rows[3]["reward/errors"] == 0 and rows[3]["reward/timeouts"] == 0
    import math

    assert all(math.isfinite(rows[s]["train/loss"]) for s in (1, 3)), rows
    assert "returned a non-finite value for 4" in proc.stderr
    assert (run / "grpo" / "DONE").is_file()


@pytest.mark.slow
def test_profile_grpo_times_the_trainers_own_phases(monkeypatch, capsys):
    """profile_grpo runs grpo.generate / score / fill_logprobs / train, not a copy of the step loop (today
    it called the engine, the advantages and grpo.update itself: a change to a phase went unprofiled)."""
    from rlcs_fast import grpo, profile_grpo

    calls: list[str] = []
    for name in ("generate", "score", "fill_logprobs", "train"):
        real = getattr(grpo, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            return _real(*a, **k)

        monkeypatch.setattr(grpo, name, wrapped)
    assert profile_grpo.main(["--model", "tiny", "--prompts", "2", "--n", "2", "--response-len", "4",
                              "--prompt-len", "8", "--image-tokens", "4", "--device", "cpu", "--steps",
                              "1"]) == 0
    assert calls == ["generate", "score", "fill_logprobs", "train"]
    out = capsys.readouterr().out
    assert all(f"{phase} " in out for phase in ("sync", "rollout", "reward", "old_logprobs_forward", "train"))


def test_eval_and_the_benchmarks_do_not_import_each_other():
    """One side owns loading a model for evaluation (``eval_model``); ``eval`` dispatches to the suite,
    the suite never imports ``eval`` back (today: eval -> benchmarks.cli -> eval, a circle)."""
    import ast

    root = Path(__file__).parent.parent / "rlcs_fast"

    def imports(path: Path) -> set[str]:
        pkg = path.relative_to(root.parent).with_suffix("").parts[:-1]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
                mod = ".".join(base + ([node.module] if node.module else []))
                out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    for path in (root / "benchmarks").glob("*.py"):
        assert "rlcs_fast.eval" not in imports(path), path
    assert not {m for m in imports(root / "eval_model.py") if m.startswith(("rlcs_fast.eval",
                                                                            "rlcs_fast.benchmarks"))
                and m != "rlcs_fast.eval_model"}


def test_the_run_engine_is_shut_down_at_the_end_but_never_waits_for_peers_after_an_error():
    """vLLM's teardown must run while the process groups exist (at the end of a run, behind a barrier),
    but after an error that one rank alone may have seen, a barrier could wait forever: dropped then."""
    from rlcs_fast.rollout.build import SharedEngine

    class Engine:
        def __init__(self, needs_peers):
            self.shutdown_needs_peers, self.closed = needs_peers, False

        def shutdown(self):
            self.closed = True

    for needs_peers in (True, False):
        for graceful in (True, False):
            engine = Engine(needs_peers)
            SharedEngine(engine=engine).close(graceful=graceful)
            assert engine.closed == (graceful or not needs_peers)
