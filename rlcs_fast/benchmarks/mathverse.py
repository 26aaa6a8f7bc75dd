"""MathVerse (Zhang et al., ECCV 2024), ``AI4Math/MathVerse`` config ``testmini`` (3,940 rows: 788
problems in five versions, from text dominant to vision only; the sixth, text only, is its own config
``testmini_text_only`` and has no image).

Schema as the hub stores it: ``sample_index``, ``problem_index``, ``problem_version`` (``Text Dominant``,
``Text Lite``, ``Vision Intensive``, ``Vision Dominant``, ``Vision Only``), ``question`` (multiple-choice
options inside, ``Choices:\\nA:…``), ``image``, ``answer`` (an option letter or a free-form value),
``question_type`` (``multi-choice`` | ``free-form``), ``metadata`` (``split``, ``source``, ``subject``,
``subfield``), ``query_wo`` and ``query_cot`` (the official prompts without / with chain of thought).

Scoring: the official ``score_answer_s2.py`` asks GPT whether the extracted answer is consistent with the
standard answer ("only when the model answer completely matches the standard answer" for multiple
choice; the same meaning for free form). Without a judge: multiple choice is correct when the boxed
answer names the right letter or is the right option's text; free form when it equals the answer
exactly (the official quick match) or under the reward's checker, units dropped. Reported: accuracy over
all rows (the paper's "overall" on the five versions), per problem version and per subject.
"""

from __future__ import annotations

import re
from typing import Any

from .common import accuracy_by, boxed_answer, clean_latex, equivalent, option_letter, strip_unit

NAME = "mathverse"
TITLE = "MathVerse"
HUB_ID = "AI4Math/MathVerse"
CONFIG = "testmini"
SPLIT = "testmini"
IMAGE_COLUMNS = ("image",)
ID_COLUMN = "sample_index"
VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only")
_CHOICE_LINE = re.compile(r"^\s*\(?([A-H])\)?\s*[:.：]\s*(.+?)\s*$")


def question(row: dict[str, Any]) -> str:
    return row.get("query_cot") or row["question"]


def choices_in(question_text: str) -> dict[str, str]:
    """Options written in the question (``Choices:\\nA:2\\nB:2√{3}``), letter → text."""
    _, sep, tail = question_text.rpartition("Choices")
    if not sep:
        return {}
    found = {}
    for line in tail.splitlines():
        m = _CHOICE_LINE.match(line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def target(row: dict[str, Any]) -> dict[str, Any]:
    meta = row.get("metadata") or {}
    return {
        "answer": str(row["answer"]).strip(),
        "question_type": row.get("question_type"),
        "choices": choices_in(row.get("question") or ""),
        "problem_version": row.get("problem_version"),
        "subject": meta.get("subject"),
        "subfield": meta.get("subfield"),
    }


def _is_choice(t: dict[str, Any]) -> bool:
    return t["question_type"] == "multi-choice" or bool(re.fullmatch(r"[A-H]", t["answer"]))


def prediction(response: str, t: dict[str, Any]) -> str | None:
    extraction = boxed_answer(response)
    if extraction is None:
        return None
    text = clean_latex(extraction)
    if _is_choice(t):
        return option_letter(text, 8) or text
    return text


def judge(response: str, t: dict[str, Any]) -> bool:
    extraction = boxed_answer(response)
    if extraction is None:
        return False
    text, answer = clean_latex(extraction), t["answer"]
    if extraction.strip() == answer or text == answer:
        return True
    if _is_choice(t):
        letter = option_letter(text, 8)
        if letter is not None:
            return letter == answer
        option = t["choices"].get(answer)
        return option is not None and (text == option or equivalent(text, option))
    return equivalent(extraction, answer) or equivalent(strip_unit(text), strip_unit(clean_latex(answer)))


def metrics(targets: list[dict[str, Any]], correct: list[float]) -> dict[str, Any]:
    return accuracy_by(targets, correct, ("problem_version", "subject"), order={"problem_version": VERSIONS})
