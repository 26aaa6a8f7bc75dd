"""MathVista (Lu et al., ICLR 2024), ``AI4Math/MathVista`` split ``testmini`` (1,000 problems).

Schema as the hub stores it: ``pid``, ``question``, ``image`` (a relative path, ``images/1.jpg``),
``decoded_image`` (the image), ``choices`` (list, or None for free-form), ``unit``, ``precision``,
``answer`` (a string; for multiple choice the option's text), ``question_type`` (``multi_choice`` |
``free_form``), ``answer_type`` (``text`` | ``integer`` | ``float`` | ``list``), ``metadata`` (``task``,
``skills``, ``category``, ``context``, ``grade``, ``source``, ``language``, ...) and ``query`` (the
official prompt: hint, question, choices).

Scoring follows ``evaluation/calculate_score.py`` in lupantech/MathVista, applied to the ``\\boxed{}``
answer instead of a GPT extraction: multiple choice maps a letter (``B``, ``(B)``) to its option, else
picks the option nearest in edit distance; integers compare as ``str(int(float(x)))``; floats as
``str(round(float(x), precision))``; lists as their text (normalised to ``[a, b]``); the result must
equal ``answer`` exactly. A free-form answer that is not a plain number (``\\frac{6}{5}``) falls back to
the reward's checker, which is what GPT's extraction into a number stood for.
"""

from __future__ import annotations

import re
from typing import Any

from .common import (
    accuracy_by,
    as_float,
    boxed_answer,
    clean_latex,
    edit_distance,
    equivalent,
    option_letter,
    strip_unit,
)

NAME = "mathvista"
TITLE = "MathVista"
HUB_ID = "AI4Math/MathVista"
CONFIG = "default"
SPLIT = "testmini"
IMAGE_COLUMNS = ("decoded_image", "image")
ID_COLUMN = "pid"
BREAKDOWNS = (
    "question_type",
    "answer_type",
    "task",
    "skills",
    "category",
    "context",
    "grade",
    "source",
    "language",
)


def question(row: dict[str, Any]) -> str:
    return row.get("query") or row["question"]


def target(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata") or {}
    return {
        "answer": str(row["answer"]),
        "choices": list(row.get("choices") or []),
        "question_type": row.get("question_type"),
        "answer_type": row.get("answer_type"),
        "precision": row.get("precision"),
        "unit": row.get("unit"),
        **{k: meta.get(k) for k in BREAKDOWNS if k in meta},
    }


def _list_text(text: str) -> str:
    items = [x.strip() for x in text.strip().strip("[]()").split(",")]
    return "[" + ", ".join(items) + "]"


def normalize(extraction: str, t: dict[str, Any]) -> str | None:
    """The official normalisation of an extracted answer to the answer's type (None: unparseable)."""
    if t["question_type"] == "multi_choice":
        choices = t["choices"]
        text = clean_latex(extraction)
        # the official reads the first "(x)" anywhere as the letter, upper-cased, valid or not; we also
        # read "B", "B." and "B: text"
        in_parens = re.findall(r"\(([a-zA-Z])\)", text)
        letter = in_parens[0].upper() if in_parens else option_letter(text, len(choices))
        if letter is not None and ord("A") <= ord(letter) < ord("A") + len(choices):
            return choices[ord(letter) - ord("A")]
        text = letter or text
        return min(choices, key=lambda c: edit_distance(text, c))  # first of the nearest, as the official
    text = strip_unit(clean_latex(extraction), t.get("unit"))
    if t["answer_type"] == "integer":
        value = as_float(text)
        return None if value is None else str(int(value))
    if t["answer_type"] == "float":
        value = as_float(text)
        return None if value is None else str(round(value, int(t["precision"] or 0)))
    if t["answer_type"] == "list":
        return _list_text(text)
    return text


def prediction(response: str, t: dict[str, Any]) -> str | None:
    extraction = boxed_answer(response)
    return None if extraction is None else normalize(extraction, t)


def judge(response: str, t: dict[str, Any]) -> bool:
    extraction = boxed_answer(response)
    if extraction is None:
        return False
    pred = normalize(extraction, t)
    if pred is not None:
        if t["answer_type"] == "list":
            return pred == _list_text(t["answer"])
        return pred == t["answer"]
    return t["question_type"] != "multi_choice" and equivalent(
        strip_unit(extraction, t.get("unit")), t["answer"]
    )


def metrics(targets: list[dict[str, Any]], correct: list[float]) -> dict[str, Any]:
    """Accuracy overall and per metadata value, as the official score file lists them."""
    return accuracy_by(targets, correct, BREAKDOWNS)
