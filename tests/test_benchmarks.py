"""The four benchmarks' scoring rules on hand-written cases from their documented examples (MathVista's
testmini pids, MathVerse's judge prompt, MATH-V's evaluate.py, We-Math's four-dimensional metrics), and
their loaders on local copies in the hub schemas."""

from __future__ import annotations

import pytest
from bench_fixtures import MATHVERSE_ROWS, MATHVISION_ROWS, MATHVISTA_ROWS, write_fixtures

from rlcs_fast.benchmarks import BENCHMARKS, mathverse, mathvision, mathvista, payload, score, wemath
from rlcs_fast.benchmarks.common import edit_distance, option_letter


def boxed(x: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{x}}}."


@pytest.mark.parametrize(
    "row, response, correct",
    [
        # pid 1: float with precision 1: the official rounds the prediction to the precision
        (0, "1.2", True),
        (0, "1.23", True),
        (0, "1.26", False),
        (0, "1.20", True),
        (0, "\\frac{6}{5}", True),
        # pid 2-style multiple choice: letter, "(C) text", the option text, the nearest option, a wrong letter
        (1, "C", True),
        (1, "(C) 145°", True),
        (1, "145^\\circ", True),
        (1, "145", True),
        (1, "B", False),
        (1, "(B)", False),
    (1, "the answer is (c)", True),
        (1, "140°", False),
        # integer: str(int(float(x))), thousands separators and units dropped
        (2, "2", True),
        (2, "2.0", True),
        (2, "2 objects", True),
        (2, "3", False),
        (2, "two", False),
        # list: the text of the list, brackets normalised
        (3, "[2014, 2016]", True),
        (3, "2014, 2016", True),
        (3, "[2014,2016]", True),
        (3, "[2016, 2014]", False),
    ],
)
def test_mathvista_rules(row, response, correct):
    t = mathvista.target(MATHVISTA_ROWS[row])
    assert mathvista.judge(boxed(response), t) is correct


def test_mathvista_no_box_is_wrong_and_nearest_option_is_the_first_of_ties():
    t = mathvista.target(MATHVISTA_ROWS[1])
    assert mathvista.judge("The answer is C.", t) is False
    assert mathvista.normalize("1", {**t, "choices": ["10", "12"]}) == "10"  # both at distance 1: the first
    assert edit_distance("kitten", "sitting") == 3 and edit_distance("", "abc") == 3


@pytest.mark.parametrize(
    "row, response, correct",
    [
        (0, "C", True),
        (0, "(C)", True),
        (0, "\\sqrt{3}", True),
        (0, "√{3}", True),
        (0, "B:2√{3}", False),
        (0, "B", False),
        (1, "C", True),
        (1, "D", False),
        (2, "14", True),
        (2, "14 cm", True),
        (2, "14.0", True),
        (2, "15", False),
        (3, "\\text{14}", True),
    ],
)
def test_mathverse_rules(row, response, correct):
    t = mathverse.target(MATHVERSE_ROWS[row])
    assert mathverse.judge(boxed(response), t) is correct


def test_mathverse_reads_the_choices_in_the_question():
    assert mathverse.choices_in(MATHVERSE_ROWS[0]["question"]) == {
        "A": "2",
        "B": "2√{3}",
        "C": "√{3}",
        "D": "2√{2}",
    }


@pytest.mark.parametrize(
    "row, response, correct",
    [
        (0, "6", True),
        (0, "6.001", True),
        (0, "\\frac{12}{2}", True),
        (0, "7", False),
        (0, "6.01", False),
        (1, "D", True),
        (1, "d", True),
        (1, "(D)", True),
        (1, "E", False),
        (2, "C", True),
        (2, "3", True),
        (2, "(C) 3", True),
        (2, "4", False),
        (2, "B", False),
    ],
)
def test_mathvision_rules(row, response, correct):
    t = mathvision.target(MATHVISION_ROWS[row])
    assert mathvision.judge(boxed(response), t) is correct


def test_option_letter_forms():
    assert [option_letter(x, 4) for x in ("B", "(B)", "B.", "B: 12", "(B) 12", "B)", "b", "E", "Bob")] == [
        "B",
        "B",
        "B",
        "B",
        "B",
        "B",
        None,
        None,
        None,
    ]


def _group(gid: str, steps: int, subs: list[bool], multi: bool) -> tuple[list[dict], list[float]]:
    keys = [f"{steps}steps_{i}" for i in range(1, steps + 1)] + [f"{steps}steps_multi"]
    return [{"ID": gid, "key": k, "answer": "A"} for k in keys], [float(c) for c in subs + [multi]]


def test_wemath_four_dimensional_metrics():
    cases = [
        ("2steps_1", 2, [False, True], False),  # IK
        ("2steps_2", 2, [True, True], False),  # IG
        ("2steps_3", 2, [True, True], True),  # CM (strict and loose)
        ("3steps_1", 3, [False, False, False], True),  # RM (strict and loose)
        ("3steps_2", 3, [True, False, True], True),
    ]  # RM strict, CM loose
    targets, correct = [], []
    for case in cases:
        t, c = _group(*case)
        targets += t
        correct += c
    targets.append({"ID": "2steps_4", "key": "2steps_1", "answer": "A"})  # incomplete group: not a problem
    correct.append(1.0)
    m = wemath.metrics(targets, correct)
    assert (
        m["problems"],
        m["IK"],
        m["IG"],
        m["CM_strict"],
        m["CM_loose"],
        m["RM_strict"],
        m["RM_loose"],
    ) == (5, 1, 1, 1, 2, 2, 1)
    assert m["score_strict"] == pytest.approx((5 - 0.5 * 1 - 2 - 1) / 5)
    assert m["score_loose"] == pytest.approx((5 - 0.5 * 1 - 1 - 1) / 5)
    assert m["RM_strict_rate"] == pytest.approx(2 / 3) and m["RM_loose_rate"] == pytest.approx(1 / 3)
    assert m["IK_rate"] == pytest.approx(0.2) and m["CM_loose_rate"] == pytest.approx(0.4)
    assert m["S2"] == pytest.approx(1 / 3) and m["S3"] == pytest.approx(1.0)
    assert m["S1"] == pytest.approx(7 / 12)
    assert m["accuracy"] == pytest.approx(sum(correct) / len(correct))


def test_wemath_reads_the_letter():
    t = {"ID": "2steps_1", "key": "2steps_1", "answer": "C"}
    assert wemath.judge(boxed("C"), t) and wemath.judge(boxed("C. 3000, 4000"), t)
    assert not wemath.judge(boxed("3000, 4000"), t) and not wemath.judge("Answer: C", t)


def test_score_plugin_runs_each_benchmarks_rule():
    t = mathvista.target(MATHVISTA_ROWS[1])
    assert score(boxed("C"), payload("mathvista", t)) == {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
    assert score("C", payload("mathvista", t))["accuracy"] == 0.0


def test_loaders_read_the_hub_schemas(tmp_path):
    from rlcs_fast.benchmarks.common import row_image
    from rlcs_fast.benchmarks.suite import load_bench, targets_of
    from rlcs_fast.data import open_image

    for name, folder in write_fixtures(tmp_path).items():
        bench = BENCHMARKS[name]
        table, root = load_bench(bench, str(folder), None)
        assert len(table) >= 3
        for i in range(len(table)):
            assert open_image(row_image(table[i], bench.IMAGE_COLUMNS, root)).size == (56, 56)
            assert bench.question(table[i]).strip()
        assert all(t["answer"] for t in targets_of(bench, table))
