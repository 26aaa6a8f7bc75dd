"""`python -m rlcs_fast.plot RUN_DIR`: one non-blank PNG per metric group, both stages on one x axis."""

from __future__ import annotations

import json
import random
import sys

import pytest
from PIL import Image, ImageStat

from rlcs_fast.plot import GROUPS, main, series, stage_offsets


def write_run(run_dir, *, grpo: bool = True) -> None:
    rng = random.Random(0)
    rows = []
    for step in range(1, 6):
        rows.append({"stage": "sft", "step": step, "train/loss": 3.0 / step + rng.random() * 0.1,
                     "perf/tokens_per_s": 1000 + rng.random() * 100})
    rows.append({"stage": "sft", "step": 5, "val/loss": 1.2, "val/accuracy": 0.2, "val/format": 0.9})
    if grpo:
        rows.append({"stage": "grpo", "step": 0, "val/accuracy": 0.25})
        for step in range(1, 5):
            rows.append({"stage": "grpo", "step": step, "train/loss": rng.random() * 0.1,
                         "reward/overall": 0.3 + 0.1 * step, "reward/accuracy": 0.3 + 0.1 * step,
                         "reward/format": 1.0,
                         "actor/kl": 1e-3 * step, "actor/entropy": 1.0 - 0.1 * step,
                         "response/length": 100.0 + step,
                         "response/length_max": 200.0, "perf/tokens_per_s": 5000 + rng.random() * 100})
        rows.append({"stage": "grpo", "step": 4, "val/accuracy": 0.6})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                           + '{"stage": "gr')  # cut line


def test_every_group_renders_a_non_blank_png(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "plots" / f"{g}.png") for g in GROUPS)
    for g in GROUPS:
        with Image.open(tmp_path / "plots" / f"{g}.png") as img:
            img.verify()
        with Image.open(tmp_path / "plots" / f"{g}.png") as img:
            assert img.size[0] > 300 and img.size[1] > 200
            assert max(ImageStat.Stat(img.convert("L")).var) > 0, f"{g}.png is blank"


def test_grpo_steps_continue_after_sft_on_one_axis(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    from rlcs_fast.metrics import read_metrics

    rows = read_metrics(run)
    offsets = stage_offsets(rows)
    assert offsets == {"sft": 0, "grpo": 5}
    acc = series(rows, "val/accuracy", offsets)
    assert acc["sft"] == ([5], [0.2]) and acc["grpo"] == ([5, 9], [0.25, 0.6])


def test_sft_only_run_draws_only_groups_with_data(tmp_path):
    run = tmp_path / "run"
    write_run(run, grpo=False)
    assert main([str(run)]) == 0
    assert sorted(p.stem for p in (run / "plots").glob("*.png")) == ["accuracy", "loss", "throughput"]


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    write_run(run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([str(run)]) == 2
    assert "pip install 'rlcs-fast[plot]'" in capsys.readouterr().err


def test_not_a_run_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _no_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
