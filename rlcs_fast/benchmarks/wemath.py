"""We-Math (Qiao et al., ACL 2025), ``We-Math/We-Math`` split ``testmini`` (1,740 questions: 525 composite
problems, each with its one-step sub-problems).

Schema as the hub stores it: ``ID`` (the problem group, e.g. ``2steps_1``; shared by the group's rows),
``split``, ``knowledge concept``, ``question``, ``option`` (one string, ``A. …;B. …; E. No correct
answer``), ``answer`` (a letter), ``image_path`` (the image), ``key`` (``2steps_1``, ``2steps_2``,
``2steps_multi``, ``3steps_1`` … ``3steps_multi``: which sub-problem, or the composite one),
``question number`` and ``knowledge concept description``.

Scoring follows ``evaluation/four_dimensional_metrics.py`` and ``accuracy.py`` in We-Math/We-Math. An
answer is its option letter (the official reads the first character after the last "Answer"; we read the
``\\boxed{}``). Per composite problem, with its sub-problems:

- IK (insufficient knowledge): a sub-problem wrong and the composite wrong;
- IG (inadequate generalisation): every sub-problem right, the composite wrong;
- CM (complete mastery): strict, every sub-problem right and the composite right; loose, any right;
- RM (rote memorisation): strict, a sub-problem wrong and the composite right; loose, all wrong.

Rates: IK, IG and CM over the problems, RM over CM + RM. Score = (N − 0.5·IG − RM − IK) / N, strict and
loose (N = 525 on testmini). Also one-step (S1: sub-problems), two- and three-step (S2, S3: composite)
accuracy, and plain ``accuracy`` over every question.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .common import accuracy_by, boxed_answer, clean_latex, option_letter

NAME = "wemath"
TITLE = "We-Math"
HUB_ID = "We-Math/We-Math"
CONFIG = "default"
SPLIT = "testmini"
IMAGE_COLUMNS = ("image_path", "image")
ID_COLUMN = "question number"


def question(row: dict[str, Any]) -> str:
    options = "\n".join(o.strip() for o in str(row.get("option") or "").split(";") if o.strip())
    return f"{row['question'].strip()}\n\nOptions:\n{options}\nAnswer with the option's letter."


def target(row: dict[str, Any]) -> dict[str, Any]:
    return {"answer": str(row["answer"]).strip(), "ID": str(row["ID"]), "key": str(row["key"])}


def prediction(response: str, t: dict[str, Any]) -> str | None:
    extraction = boxed_answer(response)
    return None if extraction is None else option_letter(clean_latex(extraction), 8)


def judge(response: str, t: dict[str, Any]) -> bool:
    return prediction(response, t) == t["answer"]


def _groups(targets: list[dict[str, Any]], correct: list[float]) -> list[tuple[list[bool], bool, int]]:
    """(sub-problem results, composite result, steps) of each problem whose rows are all present."""
    by_id: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for t, c in zip(targets, correct):
        steps, _, part = t["key"].partition("_")
        by_id[(steps, t["ID"])][part] = bool(c)
    out = []
    for (steps, _), parts in sorted(by_id.items()):
        n = int(steps[0]) if steps[:1].isdigit() else 0
        subs = [str(i) for i in range(1, n + 1)]
        if n and "multi" in parts and all(s in parts for s in subs):
            out.append(([parts[s] for s in subs], parts["multi"], n))
    return out


def four_dimensional(groups: list[tuple[list[bool], bool, int]]) -> dict[str, Any]:
    """IK, IG, CM, RM (counts and rates) and the strict and loose scores, as the official script."""
    n = len(groups)
    ik = sum(1 for subs, multi, _ in groups if not all(subs) and not multi)
    ig = sum(1 for subs, multi, _ in groups if all(subs) and not multi)
    cm_strict = sum(1 for subs, multi, _ in groups if all(subs) and multi)
    cm_loose = sum(1 for subs, multi, _ in groups if any(subs) and multi)
    rm_strict = sum(1 for subs, multi, _ in groups if not all(subs) and multi)
    rm_loose = sum(1 for subs, multi, _ in groups if not any(subs) and multi)

    def rate(k: int, d: int) -> float:
        return k / d if d else 0.0

    return {
        "problems": n,
        "IK": ik,
        "IG": ig,
        "CM_strict": cm_strict,
        "CM_loose": cm_loose,
        "RM_strict": rm_strict,
        "RM_loose": rm_loose,
        "IK_rate": rate(ik, n),
        "IG_rate": rate(ig, n),
        "CM_strict_rate": rate(cm_strict, n),
        "CM_loose_rate": rate(cm_loose, n),
        "RM_strict_rate": rate(rm_strict, cm_strict + rm_strict),
        "RM_loose_rate": rate(rm_loose, cm_loose + rm_loose),
        "score_strict": rate(n - 0.5 * ig - rm_strict - ik, n),
        "score_loose": rate(n - 0.5 * ig - rm_loose - ik, n),
    }


def metrics(targets: list[dict[str, Any]], correct: list[float]) -> dict[str, Any]:
    groups = _groups(targets, correct)
    subs = [s for g in groups for s in g[0]]
    two, three = [m for _, m, k in groups if k == 2], [m for _, m, k in groups if k == 3]
    return {
        **accuracy_by(targets, correct, ()),
        **four_dimensional(groups),
        "S1": sum(subs) / max(len(subs), 1),
        "S2": sum(two) / max(len(two), 1),
        "S3": sum(three) / max(len(three), 1),
    }
