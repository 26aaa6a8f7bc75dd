"""The shipped tiny task (``data.train = "synthetic"``): count coloured shapes in a drawn image.

Rows use the exact columns of the public RLCS sets (``WaltonFuture/Multimodal-Cold-Start`` and
``WaltonFuture/Multimodal-RL-Data``): ``images`` (a list of images), ``problem`` (with one ``<image>``
placeholder per image, as EasyR1-format sets have) and ``answer``. In the cold-start (``"sft"``) set the
answer is the whole assistant response, a short chain of thought in ``<think>…</think>`` followed by
``The answer is \\boxed{k}.``; in the RL set it is the ground truth ``k``.

Images are 84-px boards of 3 × 3 cells of 28 px, exactly one merged ViT token per cell (patch 14,
merge 2), with at most one filled shape per cell. So the tiny model sees 9 image tokens, each holding at
most one shape, and a count is a sum over a fixed number of tokens, which a 1M-parameter model learns
from scratch in a few hundred steps. Measured with the tiny model: with images of 3 or 4 cells a side
(9, 12 or 16 tokens) it stayed near chance for 400 steps, at one size it counts within 150-250 steps.

Problems come with 0 to 5 sentences of context before the question (none for half of them), which never
name a colour or a shape: the lengths of the set are long-tailed like those of real problem sets, so
padding costs what it costs there (about a third of the positions) and packing has something to save.

The answer is drawn first, uniformly over its range, and the image is built to match: a model that
ignores the image and always says the most frequent count gets about 1 / (max_shapes + 1) right, so
accuracy above that measures looking at the image (with layouts drawn first, "1" and "0" dominate the
colour questions and a constant answer scores ~30%).

Sample ``i`` of a split is a pure function of ``(seed, split, i)`` and of the difficulty arguments, so an
``"sft"`` and an ``"rl"`` set built with the same arguments hold the same images and questions, row by row.
Train and val are disjoint by content, not only by seed: a layout (image size, and the shape, colour and
cell of every shape) belongs to val exactly when its hash falls in a fixed 1/5 bucket, and each split
draws until it gets a layout of its own bucket. No val image is therefore a train image, whatever the
seeds, even for the small layouts that two random streams would both hit.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets
from PIL import Image, ImageDraw

CELL = 28  # one merged Qwen2.5-VL image token covers 28×28 pixels (patch 14 × spatial merge 2)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
QUESTION_KINDS = ("color", "total", "shape")
SIDES = (84,)  # 3 cells a side
FEATURES = datasets.Features(
    {
        "images": datasets.Sequence(datasets.Image()),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
    }
)
_VAL_BUCKETS = 5  # one layout in five belongs to val
# Sentences that may precede the question, as the public sets' problems come with more or less context.
# They say nothing about the colours or shapes present, so the question alone decides the answer.
CONTEXT = (
    "The picture shows a white board of three rows and three columns of cells.",
    "Each cell of the board is either empty or holds exactly one filled figure.",
    "Empty cells are left white.",
    "A figure may be small or large, and it may sit a little off the centre of its cell.",
    "Two figures never share a cell, and no figure spreads over two cells.",
    "Look at every cell of the board, row by row, before you answer.",
    "The white background is not a figure and must not be counted.",
    "The board was drawn for a puzzle book for children.",
    "Give the final answer as a single whole number.",
    "A careful reader checks each row twice.",
)
# How many context sentences precede the question: none for half the problems, then a long tail, so the
# set has the skewed length distribution of real problem sets (padding to the longest in a micro-batch
# wastes about a third of the positions, which packing saves).
_CONTEXT_WEIGHTS = (5, 1, 1, 1, 1, 1)
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
_BACKGROUND = (255, 255, 255)

# (width, height, sorted (row, col, shape, colour) of each shape): the identity of a layout, without jitter.
Layout = tuple[int, int, tuple[tuple[int, int, str, str], ...]]


def _check_choice(name: str, values: Sequence[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(f"synthetic task: {name}={values!r} must be distinct values from {tuple(allowed)}")
    return values


def _layout_is_val(layout: Layout) -> bool:
    digest = hashlib.sha256(repr(layout).encode()).digest()
    return int.from_bytes(digest[:8], "little") % _VAL_BUCKETS == 0


def _sample_item(
    rng: random.Random,
    max_shapes: int,
    kinds: tuple[str, ...],
    colors: tuple[str, ...],
    shapes: tuple[str, ...],
) -> tuple[Layout, str, str, int]:
    """(layout, question, name of the counted things, count), the count drawn first and uniformly."""
    kind = rng.choice(kinds)
    if kind == "color":
        asked = rng.choice(colors)
        others, question, things = [c for c in colors if c
                                    != asked], f"How many {asked} shapes are in the image?", f"{asked} shapes"
    elif kind == "shape":
        asked = rng.choice(shapes)
        others, question, things = [x for x in shapes if x
                                    != asked], f"How many {_PLURAL[asked]} are in the image?", _PLURAL[asked]
    else:
        asked, others, question, things = None, [], "How many shapes are in the image?", "shapes"
    # every image holds at least one shape; distractors need another value of the asked attribute
    count = rng.randint(0 if others else 1, max_shapes)
    total = rng.randint(max(count, 1), max_shapes) if others else count
    while True:
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        if (width // CELL) * (height // CELL) >= total:
            break
    grid_w = width // CELL
    cells = rng.sample(range((width // CELL) * (height // CELL)), total)
    items = []
    for j, cell in enumerate(cells):
        match = j < count
        color = asked if kind == "color" and match else rng.choice(others if kind == "color" else colors)
        shape = asked if kind == "shape" and match else rng.choice(others if kind == "shape" else shapes)
        items.append((cell // grid_w, cell % grid_w, shape, color))
    return (width, height, tuple(sorted(items))), question, things, count


def draw_layout(layout: Layout, rng: random.Random) -> Image.Image:
    """Render a layout; ``rng`` jitters size, position inside the cell and shade, never the cell."""
    width, height, items = layout
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for row, col, shape, color in items:
        half = rng.randint(8, 11)  # the shape spans 16–22 px, so it stays inside its 28-px cell
        cx = col * CELL + CELL // 2 + rng.randint(-2, 2)
        cy = row * CELL + CELL // 2 + rng.randint(-2, 2)
        fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in COLORS[color])
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return image


def cot_answer(things: str, count: int) -> str:
    """The cold-start response: count one by one inside ``<think>``, then the boxed answer."""
    if count == 0:
        steps = "I find none."
    else:
        steps = "Counting them: " + ", ".join(str(k) for k in range(1, count + 1)) + "."
    # "1 red shape", not "1 red shapes": the singular drops the plural "s" of the last word
    noun = things[:-1] if count == 1 else things
    verb = "is" if count == 1 else "are"
    return (
        f"<think>I look for {things}. {steps} So there {verb} {count} {noun}.</think> "
        f"The answer is \\boxed{{{count}}}."
    )


def synthetic_rows(
    kind: Literal["sft", "rl"],
    split: Literal["train", "val"],
    n: int,
    *,
    seed: int = 0,
    max_shapes: int = 4,
    colors: Sequence[str] = ("red", "green", "blue"),
    shapes: Sequence[str] = SHAPES,
    questions: Sequence[str] = ("color", "total"),
) -> dict[str, list]:
    """Columns of the task as plain Python lists (PIL images), the data behind ``synthetic_dataset``."""
    if kind not in ("sft", "rl"):
        raise ValueError(f"synthetic task: kind={kind!r} must be 'sft' or 'rl'")
    if split not in ("train", "val"):
        raise ValueError(f"synthetic task: split={split!r} must be 'train' or 'val'")
    if n < 0:
        raise ValueError(f"synthetic task: n={n} must be >= 0")
    if not 1 <= max_shapes <= (max(SIDES) // CELL) ** 2:
        raise ValueError(f"synthetic task: max_shapes={max_shapes} must be in 1..{(max(SIDES) // CELL) ** 2}")
    colors = _check_choice("colors", colors, tuple(COLORS))
    shapes = _check_choice("shapes", shapes, SHAPES)
    questions = _check_choice("questions", questions, QUESTION_KINDS)
    want_val = split == "val"
    columns: dict[str, list] = {"images": [], "problem": [], "answer": []}
    for i in range(n):
        # str seeds are hashed with SHA-512 by `random`: stable across runs, platforms and PYTHONHASHSEED
        rng = random.Random(f"rlcs-synthetic/{split}/{seed}/{i}")
        layout, question, things, count = _sample_item(rng, max_shapes, questions, colors, shapes)
        while _layout_is_val(layout) != want_val:
            layout, question, things, count = _sample_item(rng, max_shapes, questions, colors, shapes)
        columns["images"].append([draw_layout(layout, rng)])
        k = rng.choices(range(len(_CONTEXT_WEIGHTS)), weights=_CONTEXT_WEIGHTS)[0]
        context = "".join(sentence + " " for sentence in rng.sample(CONTEXT, k))
        columns["problem"].append("<image>" + context + question)
        columns["answer"].append(cot_answer(things, count) if kind == "sft" else str(count))
    return columns


def synthetic_dataset(
    kind: Literal["sft", "rl"],
    split: Literal["train", "val"],
    n: int,
    *,
    seed: int = 0,
    max_shapes: int = 4,
    colors: Sequence[str] = ("red", "green", "blue"),
    shapes: Sequence[str] = SHAPES,
    questions: Sequence[str] = ("color", "total"),
) -> datasets.Dataset:
    """``n`` samples of the counting task in the public sets' schema.

    ``kind="sft"``: the answer is the cold-start response (chain of thought, then ``\\boxed{k}``);
    ``kind="rl"``: the answer is ``k``. Difficulty: ``max_shapes`` (1–16 shapes per image, capped at
    9 on 84-px images), the ``colors`` and ``shapes`` drawn, and the question kinds asked (``"color"``:
    how many red shapes, ``"total"``: how many shapes, ``"shape"``: how many circles).
    """
    rows = synthetic_rows(
        kind, split, n, seed=seed, max_shapes=max_shapes, colors=colors, shapes=shapes, questions=questions
    )
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def save_synthetic(
    path: str | Path,
    kind: Literal["sft", "rl"],
    split: Literal["train", "val"],
    n: int,
    *,
    seed: int = 0,
    **difficulty,
) -> Path:
    """Write a synthetic set as one parquet file (images embedded as PNG bytes), readable with
    ``datasets.load_dataset("parquet", data_files=...)`` like a local copy of the public sets."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic_dataset(kind, split, n, seed=seed, **difficulty).to_parquet(str(path))
    return path
