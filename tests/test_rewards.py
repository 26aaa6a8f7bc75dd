"""The recipe's math reward: EasyR1 parity, answer equivalence, untrusted input, bounded time."""

import builtins
import importlib
import math
import os
import random
import re
import time

import pytest
from mathruler.grader import grade_answer
from sympy.parsing import sympy_parser

from rlcs_fast import rewards
from rlcs_fast.rewards import (
    RewardScorer,
    compute_score,
    extract_boxed,
    format_reward,
    is_equivalent,
    load_reward_function,
    normalize_response,
)

TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(timeout_s=TIMEOUT_S, num_workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def plugin_scorer():
    with RewardScorer("test_rewards:misbehaving_scorer", timeout_s=1.0, num_workers=2) as s:
        yield s


# Plug-ins, imported by name in the workers (pytest puts tests/ on sys.path, the workers inherit it).


def misbehaving_scorer(response: str, answer: str) -> dict:
    if response == "sleep":
        time.sleep(60)
    if response == "raise":
        raise ZeroDivisionError("scorer bug")
    if response == "nan":
        return {"overall": math.nan}
    if response == "not a dict":
        return 1.0  # type: ignore[return-value]
    if response == "crash":
        os._exit(3)
    return {"overall": float(response == answer), "accuracy": float(response == answer), "format": 1.0}


def weighted_scorer(response: str, answer: str, *, format_weight: float) -> dict:
    return {"overall": format_weight}


def answer(boxed: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{boxed}}}."


# ------------------------------------------------------------------ format and extraction (EasyR1 parity)


def easyr1_format(response: str) -> float:
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    return (
        1.0 if re.fullmatch(re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL), response) else 0.0
    )


def test_format_and_normalization_equal_easyr1_regexes_on_random_text() -> None:
    rng = random.Random(0)
    pieces = [
        "<think>",
        "</think>",
        "\\boxed{",
        "}",
        "{",
        "x",
        " ",
        "\n",
        "<",
        ">",
        "/",
        "< think >",
        "</ think>",
    ]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert normalize_response(text) == re.sub(r"\s*(<|>|/)\s*", r"\1", text), repr(text)
        assert format_reward(normalize_response(text)) == easyr1_format(text), repr(text)


def test_format_cases() -> None:
    assert format_reward("<think>a</think>\\boxed{1}") == 1.0
    assert format_reward(normalize_response("\n< think >a</ think >\n\\boxed{1}")) == 1.0
    assert format_reward("\\boxed{1}") == 0.0  # no reasoning block
    assert format_reward("<think>a\\boxed{1}</think>") == 0.0  # the box must come after </think>
    assert format_reward("x<think>a</think>\\boxed{1}") == 0.0  # nothing before <think>


def test_linear_time_on_long_whitespace_runs() -> None:
    text = "<think>" + " " * 300_000 + "x" + " " * 300_000  # EasyR1's regex is quadratic here
    start = time.perf_counter()
    assert format_reward(normalize_response(text)) == 0.0
    assert time.perf_counter() - start < 1.0


def test_extract_boxed() -> None:
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert extract_boxed("\\boxed{ 42 }") == "42"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{1} \\boxed{\\frac{1}{2}") is None  # truncated last box: no answer


# ------------------------------------------------------------------ answer equivalence

EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac12", "\\frac{1}{2}"),
    ("1+2x", "2x+1"),
    ("(B)", "B"),
    ("B", "(B)"),
    ("\\text{(B)}", "B"),
    ("5 \\text{ cm}", "5"),
    ("5", "5\\text{cm}"),
    ("45^\\circ", "45"),
    ("1,000", "1000"),
    ("10^{3}", "1000"),
    ("2.0", "2"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"),
    ("2\\pi", "2 \\pi"),
    ("x=3", "3"),
    ("2^{2022} \\cdot 2", "2^{2023}"),
    ("(1,2)", "(1, 2)"),
    ("50\\%", "0.5"),  # math_verify reads a percent as a fraction; mathruler alone says no
    ("\\infty", "\\infty"),
]
DIFFERENT = [
    ("C", "B"),
    ("2", "3"),
    ("-1", "1"),
    ("x^2", "x^3"),
    ("0.33", "\\frac{1}{3}"),
    ("6.28", "2\\pi"),
    ("[1,2)", "(1,2)"),
    ("(1,2)", "(1,2,3)"),
    ("2x+2", "2x+1"),
    ("", "0"),
    ("None", "1"),
]


@pytest.mark.parametrize(("given", "truth"), EQUIVALENT)
def test_equivalent_answers_score_one(given: str, truth: str) -> None:
    assert compute_score(answer(given), truth) == {"overall": 1.0, "format": 1.0, "accuracy": 1.0}
    assert compute_score(answer(given), f"\\boxed{{{truth}}}")["accuracy"] == 1.0  # boxed ground truth


@pytest.mark.parametrize(("given", "truth"), DIFFERENT)
def test_different_answers_score_zero(given: str, truth: str) -> None:
    assert compute_score(answer(given), truth) == pytest.approx(
        {"overall": 0.1, "format": 1.0, "accuracy": 0.0}
    )


def test_guarded_grader_agrees_with_mathruler_on_benign_answers() -> None:
    # EasyR1 calls mathruler's grade_answer: on ordinary answers our guarded copy must not change a verdict.
    for given, truth in EQUIVALENT + DIFFERENT + [("\\frac{2}{4}", "\\frac12"), ("x^2+2x+1", "(x+1)^2")]:
        if given:
            assert rewards._mathruler_equal(given, truth) == grade_answer(given, truth), (given, truth)


def test_overall_mixes_format_and_accuracy() -> None:
    assert compute_score("\\boxed{7}", "7") == pytest.approx({"overall": 0.9, "format": 0.0, "accuracy": 1.0})
    assert compute_score(answer("7"), "7", format_weight=0.5)["overall"] == 1.0
    assert compute_score("<think>a</think>\\boxed{8}", "7", format_weight=0.5)["overall"] == 0.5
    assert compute_score("no answer at all", "7") == {"overall": 0.0, "format": 0.0, "accuracy": 0.0}


# ------------------------------------------------------------------ untrusted input never evaluated


def payloads(marker: str) -> list[str]:
    return [
        f"__import__('os').system('touch {marker}')",
        "().__class__.__bases__[0].__subclasses__()",
        f"open('{marker}', 'w').write('x')",
        f"eval(\"__import__('os').system('touch {marker}')\")",
        "9**9**9**9",  # passes mathruler's own filter; sympy would evaluate it for ever
        "ff(9^9,9^9)",  # two letters: mathruler would hand sympy a falling factorial of 387 million terms
        "((9^99)^99)^99",
        "lambda: 0",
    ]


def test_payloads_never_reach_an_evaluating_parser(tmp_path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    # sympy.simplify imports sympy.physics.units lazily, and that module sympifies its own constant
    # names ("yotta", ...): import it before the spy, which would otherwise see and refuse them.
    importlib.import_module("sympy.physics.units")
    assert rewards._mathruler_equal("1+2x", "2x+1") and rewards._math_verify_equal("1+2x", "2x+1")
    parsed: list[str] = []
    evaluated: list[str] = []
    real_parse_expr, real_eval = sympy_parser.parse_expr, builtins.eval
    number_token = re.compile(r"[0-9.,\s]*")

    def parse_expr_spy(s, *args, **kwargs):
        parsed.append(s)
        # Only latex2sympy's NUMBER tokens may be parsed; anything else is recorded and refused, so a
        # regression fails the assertion below instead of hanging in (or running) the payload.
        if not number_token.fullmatch(s):
            raise RuntimeError("blocked by the test")
        return real_parse_expr(s, *args, **kwargs)

    monkeypatch.setattr(sympy_parser, "parse_expr", parse_expr_spy)
    monkeypatch.setattr(
        builtins, "eval", lambda c, *a, **k: evaluated.append(str(c)) or real_eval(c, *a, **k)
    )

    for payload in payloads(str(marker)):
        assert compute_score(answer(payload), "1")["accuracy"] == 0.0
        assert compute_score(answer("1"), payload)["accuracy"] == 0.0  # as the ground truth
        assert not is_equivalent(payload, "0")
        # The checker internals, called directly: the paths a future refactor might wire differently.
        assert not rewards._mathruler_equal(payload, "1")
        assert not rewards._equal_under_sympy(payload.lower().replace(" ", ""), "1")
        assert not rewards._math_verify_equal(payload, "1")

    assert not marker.exists()
    # What reached sympy's eval-based parser: NUMBER tokens from latex2sympy, nothing from a payload.
    assert all(number_token.fullmatch(s) for s in parsed), [
        s for s in parsed if not number_token.fullmatch(s)
    ]
    assert not any(
        word in code for code in evaluated for word in ("__", "import", "open", "system", "lambda")
    )


@pytest.mark.slow
def test_payloads_through_the_worker_pool(scorer, tmp_path) -> None:
    marker = tmp_path / "pwned"
    batch = payloads(str(marker))
    results = scorer.score(
        [answer(p) for p in batch] + [answer("1")] * len(batch), ["1"] * len(batch) + batch
    )
    assert all(r["accuracy"] == 0.0 for r in results)
    assert not marker.exists()


def test_sympy_allow_list() -> None:
    safe = rewards._safe_for_sympy_parse
    assert safe("(2x+1)-(1+2x)") and safe("(sqrt(2)/2)-(1/sqrt2)") and safe("(x^2)-(pi*x^-1)")
    assert safe("(0.5)-(.5)") and safe("(2.25x)-(9x/4)")
    for expr in (
        "9**9",
        "ff(9)",
        "re(x)",
        "x_1",
        "'1'",
        "[1]",
        "a.b",
        "x^99^9",
        "9^(9)",
        "pi.n(99)",
        "(1).n",
        "1.5.n",
        "((9^99)^99)^99",
        "1" * 300,
    ):
        assert not safe(expr), expr


# ------------------------------------------------------------------ worker pool: bounded time, isolation


@pytest.mark.slow
def test_scorer_matches_in_process_scores_in_order(scorer) -> None:
    pairs = EQUIVALENT + DIFFERENT
    responses = [answer(g) if i % 3 else f"\\boxed{{{g}}}" for i, (g, _) in enumerate(pairs)]
    answers = [t for _, t in pairs]
    assert scorer.score(responses, answers) == [compute_score(r, a) for r, a in zip(responses, answers)]
    assert scorer.score([], []) == []


@pytest.mark.slow
def test_pathological_answers_are_bounded_in_time(scorer) -> None:
    nested_frac = "1"
    for _ in range(40):
        nested_frac = f"\\frac{{{nested_frac}}}{{2}}"
    pathological = [
        "9^{9^{9^{9^{9}}}}",
        "+".join(["1"] * 50_000),  # 100k characters
        nested_frac,
        "{" * 30 + "2" + "}" * 30,
        "(10^{100})!",  # evades the cheap pre-filters: only the deadline stops it
    ]
    good = [("\\frac{3}{4}", "0.75"), ("2x+1", "1+2x")]
    responses = [answer(p) for p in pathological] + [answer(g) for g, _ in good]
    answers = ["1"] * len(pathological) + [t for _, t in good]
    timeouts_before = scorer.num_timeouts
    start = time.perf_counter()
    results = scorer.score(responses, answers)
    elapsed = time.perf_counter() - start

    assert elapsed < 4 * TIMEOUT_S + 5, elapsed
    assert scorer.num_timeouts >= timeouts_before + 1
    for r in results[: len(pathological)]:  # accuracy 0, the format still counts
        assert r == pytest.approx({"overall": 0.1, "format": 1.0, "accuracy": 0.0})
    assert all(r["accuracy"] == 1.0 for r in results[len(pathological) :])
    # The replaced worker serves the next batch.
    assert (
        scorer.score([answer("3")] * 6, ["3"] * 6) == [{"overall": 1.0, "format": 1.0, "accuracy": 1.0}] * 6
    )


@pytest.mark.slow
def test_plugin_failures_score_zero_and_are_counted(plugin_scorer) -> None:
    responses = ["a", "sleep", "b", "raise", "c", "nan", "not a dict", "crash", "d"]
    answers = ["a", "x", "b", "x", "x", "x", "x", "x", "d"]
    timeouts, errors = plugin_scorer.num_timeouts, plugin_scorer.num_errors
    results = plugin_scorer.score(responses, answers)
    overall = [r["overall"] for r in results]
    # a NaN is passed on, not scored 0: the GRPO step sees it and is skipped (reward/non_finite)
    assert math.isnan(overall[5]) and overall[:5] + overall[6:] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert plugin_scorer.num_timeouts - timeouts == 1  # "sleep"
    assert plugin_scorer.num_errors - errors == 3  # "raise", "not a dict", "crash"
    assert plugin_scorer.score(["e", "f"], ["e", "g"])[0]["overall"] == 1.0


def test_plugin_loading() -> None:
    fn = load_reward_function("test_rewards:weighted_scorer", format_weight=0.3)
    assert fn("r", "a") == {"overall": 0.3}  # format_weight passed only to functions that accept it
    assert load_reward_function("test_rewards:misbehaving_scorer")("a", "a")["overall"] == 1.0
    assert load_reward_function(None, 0.5)(answer("1"), "2")["overall"] == 0.5
    for bad in [
        "",
        "no_colon",
        "a:b:c",
        "os.system",
        "1mod:fn",
        "mod:fn()",
        "__import__('os'):system",
        " math:sqrt",
    ]:
        with pytest.raises(ValueError, match=r"reward\.function.*'module:function'"):
            load_reward_function(bad)
    for missing in ["no_such_module_xyz:fn", "math:no_such_function", "math:pi"]:
        with pytest.raises(ValueError, match=r"reward\.function"):
            load_reward_function(missing)
    with pytest.raises(ValueError, match=r"reward\.function"):
        RewardScorer("math:pi")  # stops the run before any worker starts


@pytest.mark.slow
def test_scorer_argument_errors_and_close() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        RewardScorer(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        RewardScorer(num_workers=0)
    s = RewardScorer(num_workers=1)
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        s.score(["a", "b"], ["a"])
    pid = s._workers[0].process.pid
    s.close()
    s.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="after close"):
        s.score(["a"], ["a"])
