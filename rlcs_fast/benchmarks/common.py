"""What the four benchmarks share: answer extraction from ``\\boxed{}``, option letters, edit distance,
loading a split from the hub or a local copy, and the images as the hub stores them.

Extraction is the reward's (:func:`rlcs_fast.rewards.extract_boxed` on the normalised response), never an
LLM: the official MathVista and MathVerse pipelines ask GPT to pull the answer out of free text, so a
response without a final ``\\boxed{}`` is wrong here where a GPT extractor might have read it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..rewards import extract_boxed, is_equivalent, normalize_response

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname|mbox)\s*\{([^{}]*)\}")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|\\circ|\\degree")
_LETTER_FORMS = (
    re.compile(r"^\(([A-Z])\)(?:\s.*)?$", re.DOTALL),  # (B) or (B) text
    re.compile(r"^([A-Z])(?:[.:)]\s*.*|\s*)$", re.DOTALL),  # B, B. text, B: text, B)
)


def boxed_answer(response: str) -> str | None:
    """The last ``\\boxed{}`` of a response, as the reward reads it; None when there is none."""
    return extract_boxed(normalize_response(str(response)))


def clean_latex(text: str) -> str:
    """Plain text from a short LaTeX answer: ``$``, ``\\text{}``, ``\\left``/``\\right``, degrees, ``\\%``,
    a final period."""
    out = text.strip().strip("$").strip()
    for _ in range(3):  # nested wrappers: \text{\textbf{B}}
        out = _TEXT_WRAPPERS.sub(r"\1", out)
    out = _DEGREES.sub("°", out)
    out = out.replace("\\left", "").replace("\\right", "").replace("\\%", "%").replace("\\!", "")
    out = out.replace("\\,", "").replace("\\ ", " ").replace("~", " ")
    return out.strip().rstrip(".").strip()


def option_letter(text: str, n_options: int) -> str | None:
    """The option letter a short answer names (``B``, ``(B)``, ``B.``, ``B: 12``, ``(B) 12``), within the
    first ``n_options`` letters; None otherwise. Lower-case letters are not read (they are variables)."""
    for form in _LETTER_FORMS:
        m = form.match(text.strip())
        if m and ord(m.group(1)) - ord("A") < n_options:
            return m.group(1)
    return None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions cost 1), as MathVista's scorer uses."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def as_float(text: str) -> float | None:
    """A plain decimal number (thousands separators allowed), else None: no parser that evaluates code."""
    t = text.strip().replace(" ", "")
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d*)?", t):
        t = t.replace(",", "")
    try:
        value = float(t)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def strip_unit(text: str, unit: str | None = None) -> str:
    """Drop a trailing unit: the row's own (MathVista's ``unit``) or any word after a number
    (``14 cm``, ``30°``, ``5\\,m^2``)."""
    t = text.strip()
    if unit and t.endswith(unit.strip()) and len(t) > len(unit.strip()):
        t = t[: -len(unit.strip())].strip()
    m = re.fullmatch(r"([+-]?[\d.,]*\d)\s*(?:°|%|[A-Za-z]{1,10}(?:\^?\{?[23]\}?|²|³)?)", t)
    return m.group(1) if m else t


def equivalent(given: str, truth: str) -> bool:
    """The reward's answer checker (mathruler + math_verify), on the raw and the cleaned text (unicode
    ``√``/``π``, as MathVerse writes options, read as LaTeX)."""
    if is_equivalent(given, truth):
        return True
    g, t = (clean_latex(x).replace("√", "\\sqrt").replace("π", "\\pi") for x in (given, truth))
    return (g, t) != (given, truth) and bool(g) and is_equivalent(g, t)


# --- data ----------------------------------------------------------------------------------------------


def load_split(source: str, split: str, config_name: str | None, *, key: str):
    """A split as a ``datasets.Dataset``: a hub id (with its config), or a local parquet/JSONL file or folder
    in the hub's schema (as :func:`rlcs_fast.data.load_table` reads it)."""
    import datasets

    from ..config import ConfigError
    from ..data import load_table

    path = Path(source).expanduser()
    if path.is_dir():
        # the hub's layout (data/test-00000-of-00001.parquet beside data/testmini-…): this split's files
        ours = [f for f in sorted(path.rglob("*")) if f.stem == split or f.stem.startswith(f"{split}-")]
        for fmt, suffixes in (("parquet", (".parquet",)), ("json", (".jsonl", ".json"))):
            files = [str(f) for f in ours if f.suffix in suffixes]
            if files:
                return datasets.load_dataset(fmt, data_files=files, split="train")
    if path.exists() or source.count("/") != 1 or config_name is None:
        return load_table(source, split, kind="rl", key=key)
    try:
        return datasets.load_dataset(source, config_name, split=split)
    except Exception as e:  # the hub or the split is out of reach: say which flag to change
        raise ConfigError(
            f"{key} {source!r}: could not load config {config_name!r} split {split!r} from the hub "
            f"({type(e).__name__}: {e}). Give a local copy in the same schema."
        ) from e


def row_image(row: dict[str, Any], columns: tuple[str, ...], root: Path | None) -> Any:
    """The row's image as the hub stores it (an ``{"bytes", "path"}`` struct or a decoded image) from the
    first of ``columns`` that holds one; a bare relative path (MathVista's ``image``: ``images/1.jpg``)
    is resolved against the local copy's folder."""
    for col in columns:
        value = row.get(col)
        if value is None:
            continue
        if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
            value = value["path"]
        if isinstance(value, str):
            path = Path(value)
            if not path.is_absolute() and root is not None:
                path = root / path
            if not path.is_file():
                continue
            return str(path)
        return value
    return None


def data_root(source: str) -> Path | None:
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent
    return path if path.is_dir() else None


def accuracy_by(targets: list[dict[str, Any]], correct: list[float], keys: Sequence[str],
                order: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Accuracy overall and per value of each metadata key (a list value counts toward each of its
    items, as MathVista's skills do); a key no row carries gives no breakdown. ``order[key]`` lists the
    values in the benchmark's own order (MathVerse's problem versions), else they are sorted."""
    out: dict[str, Any] = {"accuracy": sum(correct) / max(len(correct), 1), "correct": int(sum(correct)),
                           "total": len(correct)}
    for key in keys:
        groups: dict[str, list[float]] = defaultdict(list)
        for t, c in zip(targets, correct):
            values = t.get(key)
            for v in values if isinstance(values, list) else [values]:
                if v is not None:
                    groups[str(v)].append(c)
        if groups:
            values = [v for v in (order or {}).get(key, sorted(groups)) if v in groups]
            out[key] = {v: sum(groups[v]) / len(groups[v]) for v in values}
    return out
