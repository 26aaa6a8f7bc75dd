"""MATH-Vision (Wang et al., NeurIPS 2024 D&B), ``MathLLMs/MathVision`` split ``test`` (3,040 problems;
``testmini``: 304).

Schema as the hub stores it: ``id``, ``question`` (with ``<image1>`` markers), ``options`` (``[]`` for
free form, else the texts of A–E), ``image`` (a relative path), ``decoded_image`` (the image), ``answer``
(a letter for multiple choice), ``solution``, ``level`` (1–5) and ``subject`` (16 subjects).

Scoring follows ``evaluation/evaluate.py`` in mathllm/MATH-V: the model's answer is correct when it
equals the ground truth or, for multiple choice, the ground-truth option's text, under ``is_equal``
(case-insensitive exact match, then numeric agreement to two decimals). The official code evaluates
``latex2sympy`` output with ``eval``; we use the reward's checker instead (never evaluating model text)
and a plain two-decimal comparison for numbers. Reported per subject and per level.
"""

from __future__ import annotations

import re
from typing import Any

from .common import accuracy_by, as_float, boxed_answer, clean_latex, equivalent, option_letter

NAME = "mathvision"
TITLE = "MathVision"
HUB_ID = "MathLLMs/MathVision"
CONFIG = "default"
SPLIT = "test"
IMAGE_COLUMNS = ("decoded_image", "image")
ID_COLUMN = "id"
LETTERS = "ABCDE"


def question(row: dict[str, Any]) -> str:
    text = re.sub(r"<image\d*>", "", row["question"]).strip()
    options = list(row.get("options") or [])
    if options:
        text += "\n\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        text += "\nAnswer with the option's letter."
    return text


def target(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "answer": str(row["answer"]).strip(),
        "options": list(row.get("options") or []),
        "subject": row.get("subject"),
        "level": row.get("level"),
    }


def is_equal(given: str, truth: str) -> bool:
    """The official ``is_equal``: case-insensitive match, else the same value to two decimals."""
    g, t = given.strip().lower(), truth.strip().lower()
    if not g or not t:
        return False
    if g == t:
        return True
    gv, tv = as_float(g), as_float(t)
    if gv is not None and tv is not None:
        return round(gv, 2) == round(tv, 2)
    return equivalent(given, truth)


def prediction(response: str, t: dict[str, Any]) -> str | None:
    extraction = boxed_answer(response)
    if extraction is None:
        return None
    text = clean_latex(extraction)
    return (option_letter(text, len(t["options"])) if t["options"] else None) or text


def judge(response: str, t: dict[str, Any]) -> bool:
    extraction = boxed_answer(response)
    if extraction is None:
        return False
    text = clean_latex(extraction)
    if t["options"]:
        letter = option_letter(text, len(t["options"]))
        if letter is not None:
            return letter == t["answer"].upper()
        index = ord(t["answer"].upper()) - ord("A")
        value = t["options"][index] if 0 <= index < len(t["options"]) else ""
        return is_equal(text, t["answer"]) or (bool(value) and is_equal(text, clean_latex(value)))
    return is_equal(text, t["answer"]) or is_equal(extraction, t["answer"])


def metrics(targets: list[dict[str, Any]], correct: list[float]) -> dict[str, Any]:
    return accuracy_by(targets, correct, ("subject", "level"))
