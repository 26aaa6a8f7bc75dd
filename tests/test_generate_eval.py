"""`rlcs_fast.eval` and `rlcs_fast.generate` on the tiny model: eval reproduces the val/accuracy a training
run logged for the same checkpoint, its metrics are the documented ones, and generate streams the answer
the model gives to the training prompt."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlcs_fast import eval as rl_eval
from rlcs_fast import generate

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny.toml")

# A response-dependent score: each response maps to a pseudo-random value in [0, 1), so a mean over the
# val set matches only if eval produced the very same responses to the very same rows as training did.
SCORER = '''
import zlib

def score(response, answer):
    acc = zlib.crc32(f"{response}|{answer}".encode()) % 1000 / 1000
    return {"overall": acc, "format": float(len(response) % 2 == 0), "accuracy": acc}
'''


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    (root / "plug").mkdir()
    (root / "plug" / "crc_reward.py").write_text(SCORER)
    env = dict(os.environ, PYTHONPATH=str(root / "plug"), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "rlcs_fast.train", "--cfg", CONFIG, "--run.dir", str(root / "run"),
           "--run.stages", '["sft"]', "--sft.steps", "2", "--log.progress", "false",
           "--data.synthetic_train_size", "32", "--data.synthetic_val_size", "6",
           "--sft.global_batch_size", "8",
           "--sft.max_tokens_per_microbatch", "600", "--grpo.max_response_length", "12",
           "--reward.num_workers", "1", "--reward.function", "crc_reward:score", "--rollout.batch_size", "4",
           "--grpo.val_temperature", "0", "--grpo.val_n", "1"]  # greedy, as eval's default
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.slow
def test_eval_reproduces_the_logged_val_accuracy(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(trained_run / "plug"))  # the run's reward.function, for eval's scorer
    rows = [json.loads(x) for x in (trained_run / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in rows if "val/accuracy" in r)
    out = tmp_path / "out"
    assert rl_eval.main(["--model", str(trained_run / "run" / "sft" / "hf"), "--data", "synthetic",
                         "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())["run-sft"]["overall"]
    assert summary["prompts"] == 6 and summary["skipped"] == 0
    assert 0 < logged["val/accuracy"] < 1
    assert summary["mean@1"] == pytest.approx(logged["val/accuracy"], abs=1e-12)
    assert summary["pass@1"] == pytest.approx(logged["val/accuracy"], abs=1e-12)
    assert summary["format"] == pytest.approx(logged["val/format"], abs=1e-12)
    answers = [json.loads(x) for x in (out / "run-sft.jsonl").read_text().splitlines()]
    assert [a["index"] for a in answers] == list(range(6)) and all(a["response_tokens"] <= 12
                                                                   for a in answers)
    table = capsys.readouterr().out
    assert "| metric | run-sft |" in table and (out / "summary.md").read_text().count("| pass@1 |") == 1


def _records(acc: list[list[float]]) -> list[dict]:
    return [{"index": i, "sample": k, "accuracy": a, "format": 1.0} for i, row in enumerate(acc) for k,
            a in enumerate(row)]


def test_pass_and_mean_at_k():
    # prompt 0: first sample wrong, one of three right; prompt 1: all right; prompt 2: none
    s = rl_eval.summarize(_records([[0, 1, 0], [1, 1, 1], [0, 0, 0]]), 3,
                          {0: "geometry", 1: "algebra", 2: "algebra"})
    o = s["overall"]
    assert o["pass@1"] == pytest.approx(1 / 3) and o["mean@3"] == pytest.approx((1 / 3 + 1) / 3)
    assert o["pass@3"] == pytest.approx(2 / 3) and o["prompts"] == 3
    assert s["categories"]["algebra"]["mean@3"] == pytest.approx(0.5)
    assert s["categories"]["geometry"]["pass@3"] == pytest.approx(1.0)
    md = rl_eval.comparison_markdown({"a": s, "b": rl_eval.summarize(_records([[1, 1, 1]] * 3), 3)}, 3)
    assert "| mean@3 | 44.4 | 100.0 |" in md and "| algebra mean@3 | 50.0 | – |" in md


@pytest.mark.slow
def test_eval_benchmark_columns_categories_and_two_models(tmp_path, monkeypatch):
    import datasets

    from rlcs_fast.synthetic import synthetic_dataset
    from rlcs_fast.tiny import tiny_path

    src = synthetic_dataset("rl", "val", 4, seed=5).to_list()
    rows = [{"image": r["images"][0], "question": r["problem"].replace("<image>", ""), "answer": r["answer"],
             "category": "color" if "color" in r["problem"] or any(c in r["problem"] for c in ("red", "blue",
                                                                                               "green",
                                                                                               "yellow"))
             else "other"}
            for r in src]
    feats = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                               "answer": datasets.Value("string"), "category": datasets.Value("string")})
    path = tmp_path / "bench" / "test.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(path))
    model = str(tiny_path())
    out = tmp_path / "out"
    assert rl_eval.main(["--model", model, "--model", model, "--data", str(path), "--out", str(out),
                         "--n", "2", "--temperature", "1.0", "--max-new-tokens", "6", "--limit", "3",
                         "--reward-workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    names = list(summary)
    assert len(names) == 2 and names[1] == names[0] + "-2"
    assert summary[names[0]]["overall"] == summary[names[1]]["overall"]  # same model, same seed: same answers
    assert summary[names[0]]["overall"]["prompts"] == 3 and "pass@2" in summary[names[0]]["overall"]
    assert set(summary[names[0]]["categories"]) == {r["category"] for r in rows[:3]}
    lines = (out / f"{names[0]}.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {json.loads(x)["sample"] for x in lines} == {0, 1}


def test_eval_rejects_n_without_sampling():
    with pytest.raises(SystemExit):
        rl_eval.parse_args(["--model", "x", "--data", "synthetic", "--n", "4"])


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    from rlcs_fast.synthetic import synthetic_dataset

    path = tmp_path_factory.mktemp("img") / "shapes.png"
    synthetic_dataset("rl", "val", 1, seed=2)[0]["images"][0].save(path)
    return path


@pytest.mark.slow
def test_generate_streams_the_models_greedy_answer_to_the_training_prompt(trained_run, image_file):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from rlcs_fast.config import load_config
    from rlcs_fast.data import Columns, Encoder
    from rlcs_fast.model import load_processor

    model_dir = str(trained_run / "run" / "sft" / "hf")
    out = io.StringIO()
    assert generate.main(["--model", model_dir, "--image", str(image_file), "--question",
                          "How many shapes are in the image?", "--max-new-tokens", "7"], stdout=out) == 0
    # the reference: the training encoder's prompt (run config: template, system prompt, pixels), greedy
    cfg = load_config(trained_run / "run" / "config.toml")
    d = cfg.data
    processor = load_processor(model_dir, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    enc = Encoder(processor, model.config, Columns(), template=d.prompt_template,
                  system_prompt=d.system_prompt,
                  min_pixels=d.min_pixels, max_pixels=d.max_pixels, max_length=4096)
    p = enc.prompt({"images": [str(image_file)], "problem": "How many shapes are in the image?",
                    "answer": "1"})
    with torch.no_grad():
        ids = model.generate(input_ids=p.prompt_ids[None], attention_mask=torch.ones_like(p.prompt_ids[None]),
                             pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                             mm_token_type_ids=(p.prompt_ids == model.config.image_token_id).int()[None],
                             do_sample=False,
                             max_new_tokens=7,
                             eos_token_id=processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             suppress_tokens=[model.config.image_token_id, model.config.video_token_id,
                                              model.config.vision_start_token_id,
                                              model.config.vision_end_token_id])
    expected = processor.tokenizer.decode(ids[0, p.prompt_ids.numel():], skip_special_tokens=True)
    assert expected and out.getvalue() == expected + "\n"


@pytest.mark.slow
def test_generate_interactive_answers_each_line_and_exits_on_eof(trained_run, image_file):
    model_dir = str(trained_run / "run" / "sft" / "hf")
    stdin = io.StringIO(f"{image_file} How many red shapes?\n\n/no/such/image.png What?\n{image_file} Count "
                        "them.\n")
    out = io.StringIO()
    assert generate.main(["--model", model_dir, "--interactive", "--max-new-tokens", "4"], stdin=stdin,
                         stdout=out) == 0
    # one answer per usable line; the bad path is reported, skipped
    assert len(out.getvalue().splitlines()) == 2


@pytest.mark.slow
def test_generate_cli_needs_a_question_or_interactive():
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", "x", "--image", "y.png"])
    proc = subprocess.run([sys.executable, "-m", "rlcs_fast.generate", "--model", "/no/such/model",
                           "--image", "a.png",
                           "--question", "q"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rlcs_fast.generate" in proc.stderr
