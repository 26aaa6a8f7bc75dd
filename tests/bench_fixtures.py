"""Small local copies of the four benchmarks in their hub schemas (column names, dtypes, image structs as
the hub's parquet stores them), written at test time; rows taken from each benchmark's documented
examples, with tiny generated images."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
from PIL import Image, ImageDraw

S = datasets.Value("string")
I64 = datasets.Value("int64")


def png(seed: int, size: int = 56) -> dict:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.rectangle([4 + seed % 7, 6, 30 + seed % 11, 40], outline=(200, 30, 30), width=3)
    d.ellipse([28, 20 + seed % 5, 50, 46], outline=(30, 30, 200), width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{seed}.png"}


def _meta(task: str, skills: list[str]) -> dict:
    return {
        "category": "math-targeted-vqa",
        "context": "geometry diagram",
        "grade": "high school",
        "img_height": 56,
        "img_width": 56,
        "language": "english",
        "skills": skills,
        "source": "GeoQA+",
        "split": "testmini",
        "task": task,
    }


MATHVISTA_FEATURES = datasets.Features(
    {
        "pid": S,
        "question": S,
        "image": S,
        "decoded_image": datasets.Image(),
        "choices": datasets.Sequence(S),
        "unit": S,
        "precision": datasets.Value("float64"),
        "answer": S,
        "question_type": S,
        "answer_type": S,
        "metadata": {
            "category": S,
            "context": S,
            "grade": S,
            "img_height": I64,
            "img_width": I64,
            "language": S,
            "skills": datasets.Sequence(S),
            "source": S,
            "split": S,
            "task": S,
        },
        "query": S,
    }
)

MATHVISTA_ROWS = [
    {
        "pid": "1",
        "question": "By what distance d is the spring compressed?",
        "image": "images/1.jpg",
        "choices": None,
        "unit": None,
        "precision": 1.0,
        "answer": "1.2",
        "question_type": "free_form",
        "answer_type": "float",
        "metadata": _meta("textbook question answering", ["scientific reasoning"]),
        "query": "Hint: Please answer the question requiring a floating-point number with one decimal place "
        "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.\nQuestion: By what distance d is the "
        "spring compressed?",
    },
    {
        "pid": "2",
        "question": "As shown in the figure, what is the angle?",
        "image": "images/2.jpg",
        "choices": ["135°", "140°", "145°", "150°"],
        "unit": None,
        "precision": None,
        "answer": "145°",
        "question_type": "multi_choice",
        "answer_type": "text",
        "metadata": _meta("geometry problem solving", ["geometry reasoning", "algebraic reasoning"]),
        "query": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, "
        "at the end.\nQuestion: As shown in the figure, what is the angle?\nChoices:\n(A) 135°\n(B) 140°\n"
        "(C) 145°\n(D) 150°",
    },
    {
        "pid": "3",
        "question": "How many objects are in the image?",
        "image": "images/3.jpg",
        "choices": None,
        "unit": None,
        "precision": None,
        "answer": "2",
        "question_type": "free_form",
        "answer_type": "integer",
        "metadata": _meta("visual question answering", ["arithmetic reasoning"]),
        "query": "Hint: Please answer the question requiring an integer answer and provide the final value, "
        "e.g., 1, 2, 3, at the end.\nQuestion: How many objects are in the image?",
    },
    {
        "pid": "4",
        "question": "Which years have the same value?",
        "image": "images/4.jpg",
        "choices": None,
        "unit": None,
        "precision": None,
        "answer": "[2014, 2016]",
        "question_type": "free_form",
        "answer_type": "list",
        "metadata": _meta("figure question answering", ["statistical reasoning"]),
        "query": "Hint: Please answer the question requiring a Python list as an answer and provide the "
        "final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n"
        "Question: Which years have the same value?",
    },
]

MATHVERSE_FEATURES = datasets.Features(
    {
        "sample_index": S,
        "problem_index": S,
        "problem_version": S,
        "question": S,
        "image": datasets.Image(),
        "answer": S,
        "question_type": S,
        "metadata": {"split": S, "source": S, "subject": S, "subfield": S},
        "query_wo": S,
        "query_cot": S,
        "question_for_eval": S,
    }
)

_CIRCLE = (
    "As shown in the figure, circle O has a radius 1.0, if angle BAC = 60.0, then the length of BC is ()\n"
    "Choices:\nA:2\nB:2\u221a{3}\nC:\u221a{3}\nD:2\u221a{2}"
)
_CAN = "A soft drink can has a height of 13 cm and a radius of 3 cm. Find L, rounded down to the nearest cm."


def _verse(i: int, problem: str, version: str, question: str, answer: str, qtype: str, subject: str) -> dict:
    cot = (
        "Please first conduct reasoning, and then answer the question and provide the correct option letter, "
        "e.g., A, B, C, D, at the end.\nQuestion: "
        if qtype == "multi-choice"
        else "Please first conduct reasoning, and then answer the question and provide the final value, "
        "e.g., 1, 2.5, 300, at the end.\nQuestion: "
    ) + question
    return {
        "sample_index": str(i),
        "problem_index": problem,
        "problem_version": version,
        "question": question,
        "answer": answer,
        "question_type": qtype,
        "metadata": {"split": "testmini", "source": "GeoQA", "subject": subject, "subfield": "Length"},
        "query_wo": question,
        "query_cot": cot,
        "question_for_eval": question,
    }


MATHVERSE_ROWS = [
    _verse(1, "1", "Text Dominant", _CIRCLE, "C", "multi-choice", "Plane Geometry"),
    _verse(
        2,
        "1",
        "Vision Only",
        "According to the question shown in the image, please directly answer.",
        "C",
        "multi-choice",
        "Plane Geometry",
    ),
    _verse(3, "2", "Text Lite", _CAN, "14", "free-form", "Solid Geometry"),
    _verse(4, "2", "Vision Intensive", _CAN, "14", "free-form", "Solid Geometry"),
]

MATHVISION_FEATURES = datasets.Features(
    {
        "id": S,
        "question": S,
        "options": datasets.Sequence(S),
        "image": S,
        "decoded_image": datasets.Image(),
        "answer": S,
        "solution": S,
        "level": I64,
        "subject": S,
    }
)

MATHVISION_ROWS = [
    {
        "id": "4",
        "question": "How many different digits can you find in this picture?\n<image1>",
        "options": [],
        "image": "images/4.jpg",
        "answer": "6",
        "solution": None,
        "level": 1,
        "subject": "counting",
    },
    {
        "id": "6",
        "question": "In which picture can we see the kittens of Misty?\n<image1>",
        "options": ["A", "B", "C", "D", "E"],
        "image": "images/6.jpg",
        "answer": "D",
        "solution": None,
        "level": 3,
        "subject": "logic",
    },
    {
        "id": "8",
        "question": "Which number is hidden behind the square?\n<image1>",
        "options": ["1", "2", "3", "4", "5"],
        "image": "images/8.jpg",
        "answer": "C",
        "solution": None,
        "level": 2,
        "subject": "arithmetic",
    },
]

WEMATH_FEATURES = datasets.Features(
    {
        "ID": S,
        "split": S,
        "knowledge concept": S,
        "question": S,
        "option": S,
        "answer": S,
        "image_path": datasets.Image(),
        "key": S,
        "question number": I64,
        "knowledge concept description": S,
    }
)


def _we(n: int, gid: str, key: str, answer: str) -> dict:
    return {
        "ID": gid,
        "split": "testmini",
        "knowledge concept": "Conversion Rates Between Length Units",
        "question": f"According to the diagram: OA = ( ) m, AB = ( ) m (question {n})",
        "option": "A. 300, 400;B. 400, 300;C. 3000, 4000;D. 4000, 3000; E. No correct answer",
        "answer": answer,
        "key": key,
        "question number": n,
        "knowledge concept description": "1 kilometer (km) = 1000 meters (m).",
    }


WEMATH_ROWS = [
    _we(1, "2steps_1", "2steps_1", "C"),
    _we(2, "2steps_1", "2steps_2", "A"),
    _we(3, "2steps_1", "2steps_multi", "B"),
    _we(4, "3steps_1", "3steps_1", "A"),
    _we(5, "3steps_1", "3steps_2", "D"),
    _we(6, "3steps_1", "3steps_3", "B"),
    _we(7, "3steps_1", "3steps_multi", "C"),
]

SPECS = {
    "mathvista": (MATHVISTA_ROWS, MATHVISTA_FEATURES, "decoded_image", "testmini"),
    "mathverse": (MATHVERSE_ROWS, MATHVERSE_FEATURES, "image", "testmini"),
    "mathvision": (MATHVISION_ROWS, MATHVISION_FEATURES, "decoded_image", "test"),
    "wemath": (WEMATH_ROWS, WEMATH_FEATURES, "image_path", "testmini"),
}


def write_fixtures(root: Path) -> dict[str, Path]:
    """One folder per benchmark holding ``<split>.parquet``; returns {bench: folder}."""
    out = {}
    for k, (name, (rows, features, image_col, split)) in enumerate(SPECS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        full = [dict(r, **{image_col: png(10 * k + i)}) for i, r in enumerate(rows)]
        datasets.Dataset.from_list(full, features=features).to_parquet(str(folder / f"{split}.parquet"))
        out[name] = folder
    return out
