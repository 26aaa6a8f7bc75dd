"""Checkpoints and exports survive crashes: what `run.resume = "auto"` relies on.

Unit tests run in this process on a small module; the crash test kills a real training run (SIGKILL)
while its checkpoint is half written, then resumes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from rlcs_fast import checkpoint

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")


def _model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in enumerate(opt.state.values())}
    return params, state


def test_save_load_restores_model_optimizer_rng_and_extra(tmp_path):
    model, opt = _model_and_optimizer()
    _train_step(model, opt, 1)
    extra = {"step": 1, "scheduler": {"last_epoch": 1}, "skips": {"unreadable_image": [("data.train", 7)]}}
    path = checkpoint.save(tmp_path, 1, model, opt, extra, keep=2)
    params, state = _snapshot(model, opt)
    expected_draw = torch.rand(3)  # the RNG stream continues from the saved state
    _train_step(model, opt, 2)
    torch.rand(5)

    got = checkpoint.load(path, model, opt)
    assert got == extra
    assert torch.equal(torch.rand(3), expected_draw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for i, s in enumerate(opt.state.values()):
        for k, v in s.items():
            assert torch.equal(v, state[i][k]) if torch.is_tensor(v) else v == state[i][k], (i, k)
    # and training continues identically from the restored state
    _train_step(model, opt, 2)
    ref_model, ref_opt = _model_and_optimizer()
    _train_step(ref_model, ref_opt, 1)
    _train_step(ref_model, ref_opt, 2)
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_keeps_the_newest_checkpoints_and_ignores_partial_ones(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, model, opt, {"step": step}, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    # what a crash leaves: a half-written .tmp, and a folder whose deletion stopped after meta.json
    shutil.copytree(tmp_path / "step_00000003", tmp_path / "step_00000005.tmp")
    (tmp_path / "step_00000005.tmp" / "meta.json").unlink()
    shutil.copytree(tmp_path / "step_00000003", tmp_path / "step_00000004")
    (tmp_path / "step_00000004" / "meta.json").unlink()
    assert checkpoint.latest_checkpoint(tmp_path).name == "step_00000003"
    checkpoint.clean_partial(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]


def test_resume_on_another_world_size_follows_the_documented_rule(tmp_path):
    """A checkpoint written by 2 ranks, loaded by 1: rank 0's extra state, the RNG reseeded from rank 0's
    saved state (deterministic, distinct per rank), every rank's extra state still readable."""
    model, opt = _model_and_optimizer()
    path = checkpoint.save(tmp_path, 2, model, opt, {"step": 2, "skips": {"bad": [("t", 1)]}}, keep=2)
    saved = torch.load(path / "extra_rank0.pt", weights_only=True)
    torch.manual_seed(99)  # rank 1 had another RNG stream and other skipped rows
    torch.save({"extra": {"step": 2, "skips": {"bad": [("t", 4)]}}, "rng": checkpoint.rng_state()},
               path / "extra_rank1.pt")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))

    assert checkpoint.saved_world_size(path) == 2
    assert checkpoint.load(path, model, opt) == {"step": 2, "skips": {"bad": [("t", 1)]}}
    first = torch.rand(4)
    checkpoint.load(path, model, opt)
    assert torch.equal(torch.rand(4), first)  # deterministic
    checkpoint.set_rng_state(saved["rng"])
    assert not torch.equal(torch.rand(4), first)  # reseeded, not rank 0's stream replayed on every rank
    checkpoint.reseed_rng(saved["rng"], 0)
    r0 = torch.rand(4)
    checkpoint.reseed_rng(saved["rng"], 1)
    assert torch.equal(r0, first) and not torch.equal(torch.rand(4), r0)  # distinct per rank
    assert [e["skips"]["bad"] for e in checkpoint.saved_extras(path)] == [[("t", 1)], [("t", 4)]]


def test_plan_shards_respects_the_size_bound_and_order():
    from rlcs_fast.model import plan_shards

    g = torch.Generator().manual_seed(0)
    sizes = {f"w{i}": int(s) for i, s in enumerate(torch.randint(1, 400, (50,), generator=g))}
    sizes["huge"] = 5000
    shards = plan_shards(sizes, 1000)
    assert [n for s in shards for n in s] == list(sizes)
    for s in shards:
        assert sum(sizes[n] for n in s) <= 1000 or len(s) == 1
    assert ["huge"] in shards


def test_export_replaces_atomically_and_cleans_stale_folders(tmp_path):
    from safetensors import safe_open
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from rlcs_fast.model import Policy, export_hf, hf_weight_names, load_model
    from rlcs_fast.tiny import tiny_path

    model, _ = load_model(str(tiny_path()), device="cpu")
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(1.5)  # differs from the file on disk
    processor = AutoProcessor.from_pretrained(tiny_path())
    out = tmp_path / "sft" / "hf"
    for stale in (out, out.with_name("hf.tmp"), out.with_name("hf.old")):  # a previous export, killed runs
        stale.mkdir(parents=True)
        (stale / "model.safetensors").write_bytes(b"half written")
        (stale / "junk.txt").write_text("x")
    export_hf(Policy(model), processor, out, max_shard_bytes=1 << 40)

    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]
    assert not (out / "junk.txt").exists() and not (out / "model.safetensors.index.json").exists()
    names = hf_weight_names(model)
    assert "lm_head.weight" not in names  # tied to the embeddings in the tiny model, as in the 3B
    assert not any("language_model" in v or v.startswith("model.visual") for v in names.values())
    with safe_open(out / "model.safetensors", "pt") as st:
        assert set(st.keys()) == set(names.values())
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --- a real crash ----------------------------------------------------------------------------------------

# the trainer, with the DCP write of step 4 made slow: it stops after the shards are written, before the
# checkpoint is published, which is the moment a naive writer would leave a complete-looking folder
SLOW_SAVE = """
import sys, time
import torch.distributed.checkpoint as dcp
_save = dcp.save
def slow_save(state_dict, *, checkpoint_id, **kw):
    out = _save(state_dict, checkpoint_id=checkpoint_id, **kw)
    if str(checkpoint_id).endswith("step_00000004.tmp"):
        time.sleep(600)
    return out
dcp.save = slow_save
from rlcs_fast.train import main
sys.exit(main(sys.argv[1:]))
"""
ARGS = ["--log.progress", "false", "--run.stages", '["sft"]', "--data.synthetic_train_size", "48",
        "--data.synthetic_val_size", "8", "--sft.global_batch_size", "8",
        "--sft.max_tokens_per_microbatch", "600",
        "--sft.val_generate", "false", "--sft.steps", "4", "--checkpoint.every", "2"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.slow
def test_killed_mid_checkpoint_resumes_from_the_previous_one(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", SLOW_SAVE, "--cfg", CONFIG, "--run.dir", str(run), *ARGS]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = run / "sft" / "checkpoints" / "step_00000004.tmp"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not (partial / ".metadata").is_file():
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert (partial / ".metadata").is_file(), "killed before the step-4 write started"
    before = _losses(run)
    assert sorted(before) == [1, 2, 3, 4]  # steps 3-4 ran; only their checkpoint is missing
    assert checkpoint.latest_checkpoint(run / "sft" / "checkpoints").name == "step_00000002"
    assert not (run / "sft" / "DONE").exists() and not (run / "sft" / "hf").exists()

    done = subprocess.run([sys.executable, "-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir",
                           str(run), *ARGS],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "(step 2)" in done.stderr and "resumed from" in done.stderr
    after = _losses(run)
    assert sorted(after) == [1, 2, 3, 4]
    for step in (3, 4):  # the continuation from step 2 redoes steps 3-4 exactly
        assert after[step] == pytest.approx(before[step], rel=1e-6, abs=1e-7), (step, before, after)
    ckpts = run / "sft" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000004"]
    assert (run / "sft" / "DONE").is_file() and (run / "sft" / "hf" / "config.json").is_file()
