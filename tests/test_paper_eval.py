"""``eval --suite paper`` on the tiny model and local copies of the four benchmarks: the paper's table,
the answers and the chart come out; a stopped run resumes without generating done rows again; answers
produced elsewhere are scored by the same rules."""

from __future__ import annotations

import json

import pytest
from bench_fixtures import write_fixtures

from rlcs_fast import eval as rl_eval
from rlcs_fast.rollout.hf_engine import HFEngine

BENCHES = ("mathvista", "mathverse", "mathvision", "wemath")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return write_fixtures(tmp_path_factory.mktemp("benchmarks"))


def _argv(fixtures, out, limit):
    argv = [
        "--suite",
        "paper",
        "--model",
        "tiny",
        "--out",
        str(out),
        "--max-new-tokens",
        "3",
        "--limit",
        str(limit),
        "--no-progress",
        "--reward-workers",
        "1",
        "--chunk",
        "2",
    ]
    for name, folder in fixtures.items():
        argv += ["--data", f"{name}={folder}"]
    return argv


@pytest.mark.slow
def test_suite_writes_the_table_and_resumes(fixtures, tmp_path, monkeypatch):
    generated: list[int] = []
    generate = HFEngine.generate

    def counted(self, prompts, sampling):
        generated.extend(p.index for p in prompts)
        return generate(self, prompts, sampling)

    monkeypatch.setattr(HFEngine, "generate", counted)
    out = tmp_path / "out"
    # a run stopped after two rows of each benchmark ...
    assert rl_eval.main(_argv(fixtures, out, 2)) == 0
    assert len(generated) == 2 * 4
    first = {b: (out / "tiny" / f"{b}.jsonl").read_text() for b in BENCHES}
    # ... and killed while writing a line of We-Math's answers
    with (out / "tiny" / "wemath.jsonl").open("a") as f:
        f.write('{"index": 2, "respon')
    generated.clear()
    assert rl_eval.main(_argv(fixtures, out, 0)) == 0
    sizes = {"mathvista": 4, "mathverse": 4, "mathvision": 3, "wemath": 7}
    assert sorted(generated) == sorted(i for b in BENCHES for i in range(2, sizes[b]))  # only the new rows
    for b in BENCHES:
        text = (out / "tiny" / f"{b}.jsonl").read_text()
        assert text.startswith(first[b])
        recs = [json.loads(x) for x in text.splitlines() if x.startswith('{"index"') and x.endswith("}")]
        assert sorted(r["index"] for r in recs) == list(range(sizes[b]))
        assert all("response" in r and "prediction" in r and r["accuracy"] in (0.0, 1.0) for r in recs)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tiny"]) == set(BENCHES)
    for b in BENCHES:
        m = summary["tiny"][b]
        assert 0.0 <= m["accuracy"] <= 1.0 and m["answered"] == m["rows"] == sizes[b]
    assert set(summary["tiny"]["mathverse"]["problem_version"]) == {
        "Text Dominant",
        "Vision Only",
        "Text Lite",
        "Vision Intensive",
    }
    assert summary["tiny"]["wemath"]["problems"] == 2 and "score_strict" in summary["tiny"]["wemath"]
    assert "task" in summary["tiny"]["mathvista"] and "level" in summary["tiny"]["mathvision"]
    md = (out / "summary.md").read_text()
    assert "| model | MathVista | MathVerse | MathVision | We-Math | Avg. |" in md and "| tiny |" in md
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/wemath/accuracy"] == summary["tiny"]["wemath"]["accuracy"]


def test_score_only_scores_given_answers(fixtures, tmp_path):
    answers = tmp_path / "gpt.jsonl"
    lines = [
        {"index": 0, "response": "\\boxed{1.2}"},
        {"pid": "2", "response": "<think>x</think>\\boxed{(C) 145°}"},
        {"id": "3", "response": "\\boxed{3}"},
        {"index": 3, "response": "\\boxed{[2014, 2016]}"},
    ]
    answers.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert (
        rl_eval.main(
            [
                "--bench",
                "mathvista",
                "--data",
                str(fixtures["mathvista"]),
                "--score-only",
                str(answers),
                "--out",
                str(out),
                "--reward-workers",
                "1",
            ]
        )
        == 0
    )
    m = json.loads((out / "summary.json").read_text())["gpt"]["mathvista"]
    assert m["accuracy"] == pytest.approx(0.75) and m["correct"] == 3 and m["total"] == 4
    assert m["answer_type"] == {"float": 1.0, "integer": 0.0, "list": 1.0, "text": 1.0}
    recs = [json.loads(x) for x in (out / "gpt" / "mathvista.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in recs] == ["1.2", "145°", "3", "[2014, 2016]"]


def test_suite_flags_are_checked():
    with pytest.raises(SystemExit):
        rl_eval.parse_args(["--bench", "mathvista", "--model", "x", "--n", "2", "--temperature", "1"])
    with pytest.raises(SystemExit):
        rl_eval.parse_args(["--suite", "paper", "--score-only", "a.jsonl"])
    assert rl_eval.main(["--bench", "nope", "--model", "tiny"]) == 2


def test_benchmark_flags_and_the_base_models_settings(tmp_path):
    from rlcs_fast.benchmarks.cli import per_bench, resolve_model, shared_run_config
    from rlcs_fast.config import ConfigError

    given = per_bench(["mathvista=a", "wemath=b"], list(BENCHES), "--data")
    assert given == {"mathvista": "a", "wemath": "b"}
    assert per_bench(["a"], ["mathvision"], "--data") == {"mathvision": "a"}
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        per_bench(["a"], list(BENCHES), "--data")
    with pytest.raises(ConfigError, match="does not evaluate"):
        per_bench(["wemath=a"], ["mathvista"], "--split")
    export = tmp_path / "run" / "sft" / "hf"
    export.mkdir(parents=True)
    (tmp_path / "run" / "config.toml").write_text("")
    # the base model (a hub id, no run config) is prompted with the trained model's run settings; the id
    # itself resolves to its local snapshot (tests/test_launch.py), here it is in no cache (offline)
    with pytest.raises(ConfigError, match="huggingface-cli download"):
        resolve_model("Qwen/Qwen2.5-VL-7B-Instruct")
    assert shared_run_config(["Qwen/Qwen2.5-VL-7B-Instruct", str(export)]) == tmp_path / "run" / "config.toml"
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_model(str(tmp_path / "missing"))
