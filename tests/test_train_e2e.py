"""End to end on the CPU: the training entry point as users run it, in subprocesses, on small settings.

Each property here is one a user relies on: the same losses on 1 and 2 processes, a killed run resumed
with identical losses, bad rows skipped and counted, the export loading back into transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # the trainer in subprocesses

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
SMALL = [
    "--log.progress", "false", "--data.synthetic_train_size", "96", "--data.synthetic_val_size", "8",
    "--sft.global_batch_size", "8", "--sft.max_tokens_per_microbatch", "600",
    "--grpo.rollout_batch_size", "4", "--grpo.mini_batch_size", "4", "--grpo.n", "4",
    "--grpo.max_response_length", "24", "--reward.num_workers", "1",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the trainer picks the torch path on CPU by itself
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def train_cmd(run_dir: Path, *args: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "rlcs_fast.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
        "rlcs_fast.train"]
    return launcher + ["--cfg", CONFIG, "--run.dir", str(run_dir), *SMALL, *args]


def run_train(run_dir: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(run_dir, *args, nproc=nproc), cwd=run_dir.parent, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def rows(run_dir: Path, stage: str, key: str) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["stage"] == stage and key in r:
            out[r["step"]] = r[key]
    return out


def test_sft_two_processes_match_one(tmp_path):
    args = ["--run.stages", '["sft"]', "--sft.steps", "3", "--sft.val_generate", "false"]
    run_train(tmp_path / "one", *args)
    run_train(tmp_path / "two", *args, nproc=2)
    one, two = rows(tmp_path / "one", "sft", "train/loss"), rows(tmp_path / "two", "sft", "train/loss")
    assert sorted(one) == [1, 2, 3] and sorted(two) == [1, 2, 3]
    for step in one:
        assert one[step] == pytest.approx(two[step], rel=1e-5, abs=1e-6), (step, one, two)
    assert rows(tmp_path / "one", "sft",
                "val/loss")[3] == pytest.approx(rows(tmp_path / "two", "sft", "val/loss")[3], rel=1e-5)


def _kill_after_checkpoint(run_dir: Path, stage: str, args: list[str]) -> None:
    """Start a run and SIGKILL it as soon as its first checkpoint is complete."""
    proc = subprocess.Popen(train_cmd(run_dir, *args), cwd=run_dir.parent, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / stage / "checkpoints"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if any((p / "meta.json").is_file() for p in ckpt.glob("step_*")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before its first checkpoint: make it longer"
    assert not (run_dir / stage / "DONE").exists()


@pytest.mark.parametrize("stage, keys", [
    ("sft", ["train/loss", "train/grad_norm"]),
    ("grpo", ["train/loss", "reward/overall", "response/length", "actor/entropy"]),
])
def test_killed_run_resumes_with_identical_metrics(tmp_path, stage, keys):
    args = ["--run.stages", f'["{stage}"]', "--checkpoint.every", "2", "--sft.steps", "6",
            "--grpo.steps", "4", "--sft.val_generate", "false"]
    run_train(tmp_path / "straight", *args)
    resumed = tmp_path / "resumed"
    _kill_after_checkpoint(resumed, stage, args)
    run_train(resumed, *args)
    for key in keys:
        a, b = rows(tmp_path / "straight", stage, key), rows(resumed, stage, key)
        assert sorted(a) == sorted(b) and len(a) >= 4, (key, a, b)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-7), (key, step, a, b)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    import datasets

    from rlcs_fast.synthetic import synthetic_dataset

    good = synthetic_dataset("sft", "train", 14, seed=3).cast_column(
        "images", datasets.List(datasets.Image(decode=False)))
    rows_ = good.to_list()
    rows_[3]["images"] = [{"bytes": b"this is not an image", "path": None}]
    rows_[9]["answer"] = None
    path = tmp_path / "data" / "train.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(rows_, features=good.features).to_parquet(str(path))
    run = tmp_path / "run"
    proc = run_train(run, "--run.stages", '["sft"]', "--data.train", str(path), "--data.val", str(path),
                     "--sft.steps", "2", "--sft.global_batch_size", "14", "--sft.val_generate", "false")
    skipped = rows(run, "sft", "data/skipped")
    assert skipped[2] == 2, skipped
    assert "unreadable_image" in proc.stderr and "missing_answer" in proc.stderr
    assert (run / "sft" / "DONE").exists()


def test_export_loads_in_transformers_and_generates(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    run = tmp_path / "run"
    run_train(run, "--run.stages", '["sft"]', "--sft.steps", "2", "--sft.val_generate", "false")
    export = run / "sft" / "hf"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
    processor = AutoProcessor.from_pretrained(export)
    image = Image.new("RGB", (84, 84), (255, 0, 0))
    messages = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": "How many shapes?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    # the exported weights are the trained ones, not the initial ones
    saved = {k: v for k, v in model.state_dict().items()}
    from rlcs_fast.tiny import tiny_path

    init = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_path()).state_dict()
    assert any(not torch.equal(saved[k], init[k]) for k in init)


def test_grpo_rows_have_every_design_metric(tmp_path):
    run = tmp_path / "run"
    run_train(run, "--run.stages", '["grpo"]', "--grpo.steps", "1", "--grpo.kl_coef", "0.01",
              "--grpo.val_before_train", "true")
    need = ["train/loss", "train/grad_norm", "train/lr", "reward/overall", "reward/accuracy", "reward/format",
            "actor/kl", "actor/clip_frac", "actor/entropy", "response/length", "perf/tokens_per_s",
            "time/rollout", "time/ref", "time/train", "time/sync", "mem/peak_gb", "data/skipped",
            "perf/rank_imbalance"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in lines if r["stage"] == "grpo" and "train/loss" in r]
    assert step_rows and all(k in step_rows[0] for k in need), sorted(step_rows[0])
    val_rows = [r for r in lines if r["stage"] == "grpo" and "val/accuracy" in r]
    assert {r["step"] for r in val_rows} == {0, 1} and all("val/format" in r for r in val_rows)


def test_config_error_exits_before_work(tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "run", "--optim.lrr", "1e-5"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "`optim.lrr`" in proc.stderr and "`optim.lr`" in proc.stderr
    assert not (tmp_path / "run").exists()




def test_tiny_qwen3_vl_runs_sft_then_grpo_and_exports_a_qwen3_vl(tmp_path):
    """configs/tiny_qwen3_vl.toml end to end at small sizes: SFT then GRPO on the tiny Qwen3-VL (32-px
    pre-resize, DeepStack, its processor), and the export loads as Qwen3-VL in transformers."""
    from transformers import AutoConfig

    run = tmp_path / "run"
    cmd = train_cmd(run, "--sft.steps", "2", "--grpo.steps", "1", "--sft.val_generate", "false")
    cmd[cmd.index(CONFIG)] = str(Path(CONFIG).with_name("tiny_qwen3_vl.toml"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert set(rows(run, "sft", "train/loss")) == {1, 2} and set(rows(run, "grpo", "train/loss")) == {1}
    assert "val/accuracy" in json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    config = AutoConfig.from_pretrained(run / "grpo" / "hf")
    assert config.model_type == "qwen3_vl" and config.architectures == ["Qwen3VLForConditionalGeneration"]
