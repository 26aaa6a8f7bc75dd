"""FSDP2 collectives stay in step when some micro-batches hold no image: a cold-start set in which half
the rows are text-only (``images = []``) gives the single-process losses on 2 processes.

Every rank must all-gather the same shard units in the same order. A micro-batch with images runs the
vision tower, then the language layers; one without runs a dummy vision pass, which must come first
too, or ranks all-gather different units in the same slot (gloo: "Received data size doesn't match
expected size"; NCCL: a hang or garbage)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed import assert_same, metrics, train

ROWS = 48


def _mixed_set(path: Path) -> Path:
    from datasets import load_dataset

    from rlcs_fast.synthetic import save_synthetic

    save_synthetic(path.with_suffix(".full.parquet"), "sft", "train", ROWS, seed=0)
    ds = load_dataset("parquet", data_files=str(path.with_suffix(".full.parquet")), split="train")

    def text_only(row, i):
        if i % 2:
            return {"images": [], "problem": row["problem"].replace("<image>", "").strip()}
        return {}

    ds.map(text_only, with_indices=True).to_parquet(str(path))
    return path


@pytest.mark.slow
def test_text_only_rows_give_the_single_process_losses_on_two_processes(tmp_path):
    data = _mixed_set(tmp_path / "mixed.parquet")
    # small micro-batches, so that some of them hold only text rows on one rank and images on the other
    args = ["--data.train", str(data), "--data.val", str(data), "--sft.max_tokens_per_microbatch", "160",
            "--checkpoint.every", "0"]
    runs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    for nproc, run in runs.items():
        train(run, *args, nproc=nproc)
    for key in ("train/loss", "train/grad_norm"):
        ref, got = metrics(runs[1], key), metrics(runs[2], key)
        assert sorted(ref) == sorted(got) == [1, 2, 3, 4], (key, ref, got)
        assert_same(ref, got, ref, f"{key} on 2 vs 1 process with text-only rows")


@pytest.mark.slow
def test_one_and_two_processes_train_alike_on_text_only_steps(tmp_path):
    """8 steps of global batch 2 on the half text-only set: some steps hold no image at all. In one
    process the vision tower's gradients were None there (AdamW skipped it: no decay, no momentum), on 2
    ranks zeros from the dummy pass (AdamW moved it): the losses parted by 1.4e-4 from step 4."""
    data = _mixed_set(tmp_path / "mixed.parquet")
    args = ["--data.train", str(data), "--data.val", str(data), "--sft.global_batch_size", "2",
            "--sft.steps", "8", "--checkpoint.every", "0"]
    runs = {n: tmp_path / f"n{n}" for n in (1, 2)}
    for nproc, run in runs.items():
        train(run, *args, nproc=nproc)
    ref, got = metrics(runs[1], "train/loss"), metrics(runs[2], "train/loss")
    assert sorted(ref) == sorted(got) == list(range(1, 9)), (ref, got)
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-5, (step, ref, got)
