"""Scale-out on the CPU (gloo, FSDP2): the trainer under torchrun with 1, 2 and 3 processes.

Properties a user relies on: the same global batch gives the same losses on any number of processes
(3 ranks shard the tiny model unevenly); a checkpoint written by 2 processes resumes on 1 and on 3 with
the uninterrupted run's losses; activation checkpointing changes memory, not numbers; the weight stream
to the rollout engine and the HF export are the full, unsharded parameters under HF names.

This file is also the 2-process worker of the in-process checks (`python -m torch.distributed.run ...
tests/test_distributed.py OUT_DIR`), so that one process start covers them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")
# global batch 12 divides over 1, 2 and 3 ranks; 4 steps with a checkpoint every 2
SMALL = [
    "--log.progress", "false", "--run.stages", '["sft"]', "--data.synthetic_train_size", "48",
    "--data.synthetic_val_size", "8", "--sft.global_batch_size", "12",
    "--sft.max_tokens_per_microbatch", "600",
    "--sft.val_generate", "false", "--sft.steps", "4", "--checkpoint.every", "2", "--checkpoint.keep", "2",
]
KEYS = ("train/loss", "train/grad_norm")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the trainer picks the torch path on CPU by itself
    env["OMP_NUM_THREADS"] = "1"  # 3 ranks on 2 cores: oversubscribed threads would crawl
    return env


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


def train(run_dir: Path, *args: str, nproc: int) -> str:
    cmd = _launcher(nproc) + ["-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir", str(run_dir),
                              *SMALL, *args]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["stage"] == "sft" and key in row:
            assert row["step"] not in out, f"step {row['step']} logged twice: {key}"
            out[row["step"]] = row[key]
    return out


def assert_same(a: dict[int, float], b: dict[int, float], steps, what: str) -> None:
    for step in steps:
        # float32 sums in another order (other micro-batches, FSDP reductions): a few ulps apart
        assert a[step] == pytest.approx(b[step], rel=2e-5, abs=1e-6), (what, step, a, b)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory) -> Path:
    """The reference: 4 uninterrupted SFT steps on 2 processes, checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("dist") / "two"
    train(run, nproc=2)
    return run


def test_data_order_does_not_depend_on_world_size():
    from rlcs_fast.data import global_indices
    from rlcs_fast.schedule import rank_share

    for step in range(3):
        batch = global_indices(48, step * 12, 12, seed=0)
        for world in (1, 2, 3):
            shares = [rank_share(batch, r, world) for r in range(world)]
            assert sorted(i for s in shares for i in s) == sorted(batch)
            assert len({len(s) for s in shares}) == 1  # 12 splits evenly: no rank pads the step


@pytest.mark.slow
def test_one_two_three_processes_give_the_same_losses(two_procs, tmp_path):
    """The same global batch on 1, 2 and 3 ranks (3 shards the tiny model's tensors unevenly)."""
    for nproc in (1, 3):
        run = tmp_path / f"n{nproc}"
        train(run, nproc=nproc)
        for key in (*KEYS, "val/loss"):
            ref, got = metrics(two_procs, key), metrics(run, key)
            assert sorted(ref) == sorted(got) and ref, (key, ref, got)
            assert_same(ref, got, ref, f"{key} on {nproc} vs 2 processes")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])
def test_two_process_checkpoint_resumes_on_another_world_size(two_procs, tmp_path, nproc):
    run = tmp_path / "resumed"
    shutil.copytree(two_procs, run)
    # the state right after the step-2 checkpoint: later checkpoints, the export and the done mark gone
    shutil.rmtree(run / "sft" / "checkpoints" / "step_00000004")
    shutil.rmtree(run / "sft" / "hf")
    (run / "sft" / "DONE").unlink()
    log = train(run, nproc=nproc)
    assert "resumed from" in log and "(step 2)" in log, log[-2000:]
    assert "written by 2 process(es), resuming on" in log
    for key in KEYS:
        ref, got = metrics(two_procs, key), metrics(run, key)
        assert sorted(got) == [1, 2, 3, 4], (key, got)  # steps 3-4 replaced, not appended
        assert_same(ref, got, [3, 4], f"{key} resumed on {nproc} from a 2-process checkpoint")
    assert (run / "sft" / "DONE").is_file()


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses(two_procs, tmp_path):
    run = tmp_path / "ac"
    train(run, "--model.gradient_checkpointing", "true", "--checkpoint.every", "0", nproc=2)
    for key in KEYS:
        assert_same(metrics(two_procs, key), metrics(run, key), [1, 2, 3, 4],
                    f"{key} with activation checkpointing")


# --- in-process checks under 2-process FSDP2 ------------------------------------------------------------

def _perturbed_tiny():
    """The tiny model with seeded noise added, so an export cannot pass by copying the file on disk."""
    from rlcs_fast.model import load_model
    from rlcs_fast.tiny import tiny_path

    model, _ = load_model(str(tiny_path()), device="cpu")
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _worker(out: Path) -> None:
    from torch.distributed.tensor import DTensor

    from rlcs_fast import dist
    from rlcs_fast.model import (
        Policy,
        apply_activation_checkpointing,
        apply_fsdp,
        export_hf,
        load_processor,
        resolve_model_path,
    )
    from rlcs_fast.trainer_utils import iter_full_weights

    dist.init("cpu")
    resolve_model_path("tiny")  # rank 0 builds the cache, the others wait
    model = _perturbed_tiny()
    apply_activation_checkpointing(model)  # the trainer's order: checkpointing, then sharding
    policy = apply_fsdp(Policy(model), mixed_precision=False)
    sharded = isinstance(model.model.language_model.embed_tokens.weight, DTensor)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight

    calls = {"n": 0}
    gather = DTensor.full_tensor

    def counting(self, *a, **k):
        calls["n"] += 1
        return gather(self, *a, **k)

    DTensor.full_tensor = counting
    stream = iter_full_weights(model)
    before = calls["n"]
    first = next(stream)
    after_first = calls["n"]
    streamed = dict([first, *stream])
    DTensor.full_tensor = gather
    assert not any(isinstance(t, DTensor) for t in streamed.values())

    processor = load_processor(str(resolve_model_path("tiny")), min_pixels=3136, max_pixels=28224)
    export_hf(policy, processor, out / "hf", max_shard_bytes=1 << 20)
    if dist.rank() == 0:
        torch.save(streamed, out / "streamed.pt")
        (out / "report.json").write_text(json.dumps({
            "sharded": sharded, "tied": tied, "gathers_before_first": before,
            "gathers_after_first": after_first, "gathers_total": calls["n"], "n_params": len(streamed)}))
    dist.shutdown()


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worker")
    cmd = _launcher(2) + [__file__, str(out)]
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_streamed_weights_are_the_full_parameters_under_hf_names(worker_out):
    report = json.loads((worker_out / "report.json").read_text())
    assert report["sharded"], "the worker's model was not sharded: the test checks nothing"
    streamed = torch.load(worker_out / "streamed.pt", weights_only=True)
    reference = _perturbed_tiny().state_dict()
    assert list(streamed) == list(reference)  # HF names, HF order: no _fsdp / _checkpoint_wrapped_module
    for name, t in reference.items():
        assert torch.equal(streamed[name], t), name
    # lazy: nothing gathered before the first item, one all-gather per item, each parameter once
    assert report["gathers_before_first"] == 0 and report["gathers_after_first"] == 1
    assert report["gathers_total"] == report["n_params"] == len(reference)


@pytest.mark.slow
def test_sharded_export_equals_the_unsharded_model_and_loads(worker_out, tmp_path):
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    export = worker_out / "hf"
    reference = _perturbed_tiny()
    index = json.loads((export / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # 1 MiB shards of a 4 MiB model
    on_disk = {}
    for f in files:
        assert (export / f).stat().st_size <= (1 << 20) + 64 * 1024 or len(safe_open(export / f,
                                                                                     "pt").keys()) == 1
        with safe_open(export / f, "pt") as st:
            on_disk.update({k: st.get_tensor(k) for k in st.keys()})
    assert set(index["weight_map"]) == set(on_disk)
    # the same names save_pretrained writes for the unsharded model (original Qwen2.5-VL layout, the
    # tied head left out when tied): the layout transformers and vLLM load
    reference.save_pretrained(tmp_path / "hf_ref")
    with safe_open(tmp_path / "hf_ref" / "model.safetensors", "pt") as st:
        ref_disk = {k: st.get_tensor(k) for k in st.keys()}
    assert set(on_disk) == set(ref_disk)
    for k in ref_disk:
        assert torch.equal(on_disk[k], ref_disk[k]), k
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
    ref_sd, got_sd = reference.state_dict(), loaded.state_dict()
    assert list(ref_sd) == list(got_sd)
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    assert json.loads((worker_out / "report.json").read_text())["tied"] == (
        loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight)
    assert not (worker_out / "hf.tmp").exists() and not (worker_out / "hf.old").exists()


# --- CPU offload: validated everywhere, run on a GPU ------------------------------------------------------

def test_cpu_offload_needs_cuda():
    from rlcs_fast.config import ConfigError, load_config
    from rlcs_fast.model import check_cpu_offload

    with pytest.raises(ConfigError, match=r"model\.cpu_offload"):
        load_config(CONFIG, {"model.cpu_offload": True, "run.device": "cpu"})
    assert load_config(CONFIG, {"model.cpu_offload": True}).model.cpu_offload  # "auto" is decided at start
    with pytest.raises(ConfigError, match=r"model\.cpu_offload"):
        check_cpu_offload(True, torch.device("cpu"))
    check_cpu_offload(False, torch.device("cpu"))
    check_cpu_offload(True, torch.device("cuda", 0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 CPU offload needs a CUDA device")
def test_cpu_offload_trains_like_the_gpu_resident_model(tmp_path):
    args = ["--run.device", "cuda", "--checkpoint.every", "0", "--model.dtype", "float32"]
    train(tmp_path / "gpu", *args, nproc=1)
    train(tmp_path / "offload", *args, "--model.cpu_offload", "true", nproc=1)
    for key in KEYS:
        a, b = metrics(tmp_path / "gpu", key), metrics(tmp_path / "offload", key)
        for step in a:  # GPU kernels differ between the two paths only in summation order
            assert a[step] == pytest.approx(b[step], rel=1e-3), (key, step, a, b)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


def test_tiny_qwen3_vl_two_processes_match_one(tmp_path):
    """The Qwen3-VL family under FSDP2 (its units: vision blocks and decoder layers; the DeepStack mergers
    and position table in the root): 2 ranks give 1 rank's losses and gradient norms."""
    qwen3 = ["--model.path", "tiny-qwen3-vl", "--data.min_pixels", "4096", "--data.max_pixels", "16384",
             "--sft.steps", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, *qwen3, nproc=1)
    train(two, *qwen3, nproc=2)
    for key in KEYS:
        assert_same(metrics(two, key), metrics(one, key), (1, 2), key)
