"""The paper's benchmarks: MathVista, MathVerse, MathVision and We-Math, loaded in their hub schemas and
scored by their own rules (one module each; :mod:`.suite` runs them).

Each module holds ``NAME``, ``TITLE``, ``HUB_ID``, ``CONFIG``, ``SPLIT``, ``IMAGE_COLUMNS``, ``ID_COLUMN``
and four functions: ``question(row)`` (the prompt text), ``target(row)`` (what scoring needs, JSON-able),
``judge(response, target)`` (correct or not) and ``metrics(targets, correct)`` (accuracy and the
benchmark's own breakdowns). :func:`score` is the ``module:function`` plug-in through which
:class:`rlcs_fast.rewards.RewardScorer` runs ``judge`` in its time-bounded workers: model output is
untrusted text.
"""

from __future__ import annotations

import json
from types import ModuleType

from ..rewards import format_reward, normalize_response
from . import mathverse, mathvision, mathvista, wemath

BENCHMARKS: dict[str, ModuleType] = {m.NAME: m for m in (mathvista, mathverse, mathvision, wemath)}
PAPER_SUITE = ("mathvista", "mathverse", "mathvision", "wemath")
SCORER = "rlcs_fast.benchmarks:score"


def get(name: str) -> ModuleType:
    from ..config import ConfigError

    if name not in BENCHMARKS:
        raise ConfigError(f"--bench {name!r} is not a known benchmark; choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name]


def payload(bench: str, target: dict) -> str:
    """A row's scoring target as the ``answer`` string the reward workers receive."""
    return json.dumps({"bench": bench, "target": target}, ensure_ascii=False)


def score(response: str, answer: str) -> dict[str, float]:
    """Reward-function signature: ``answer`` is a :func:`payload`; accuracy by the benchmark's rules."""
    p = json.loads(answer)
    accuracy = float(BENCHMARKS[p["bench"]].judge(response, p["target"]))
    return {
        "overall": accuracy,
        "accuracy": accuracy,
        "format": format_reward(normalize_response(str(response))),
    }
