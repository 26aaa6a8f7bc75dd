"""The synthetic counting task: schema, determinism, split disjointness, and answers that are true of the
images (read back from the pixels, independently of the generator)."""

import re

import datasets
import numpy as np
import pytest

from rlcs_fast import synthetic
from rlcs_fast.synthetic import COLORS, FEATURES, save_synthetic, synthetic_dataset
from rlcs_fast.tiny import build_tokenizer

BOXED = re.compile(r"\\boxed\{(\d+)\}")


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def _read_cells(image) -> dict[tuple[int, int], tuple[str, str]]:
    """Occupied 28-px cells → (shape, colour), decoded from pixels alone: the colour is the nearest
    palette entry to the cell's mean ink, the shape follows from how much of its bounding box it fills
    (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2)."""
    px = _pixels(image)
    cells = {}
    for r in range(px.shape[0] // 28):
        for c in range(px.shape[1] // 28):
            cell = px[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28]
            ink = (cell != 255).any(-1)
            if not ink.any():
                continue
            mean = cell[ink].mean(0)
            color = min(COLORS, key=lambda k: float(((np.array(COLORS[k]) - mean) ** 2).sum()))
            rows, cols = np.nonzero(ink)
            fill = ink.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            cells[(r, c)] = (shape, color)
    return cells


def _question(problem: str) -> str:
    """The question of a problem, after checking that what precedes it is known context sentences."""
    assert problem.startswith("<image>"), problem
    *context, question = re.split(r"(?<=\.) ", problem.removeprefix("<image>"))
    assert all(sentence in synthetic.CONTEXT for sentence in context), context
    assert len(set(context)) == len(context)
    return question


def _true_count(problem: str, cells: dict) -> int:
    question = _question(problem)
    if m := re.fullmatch(r"How many (\w+) shapes are in the image\?", question):
        return sum(color == m[1] for _, color in cells.values())
    if m := re.fullmatch(r"How many (circle|square|triangle)s are in the image\?", question):
        return sum(shape == m[1] for shape, _ in cells.values())
    assert question == "How many shapes are in the image?", problem
    return len(cells)


@pytest.mark.parametrize("kind", ["sft", "rl"])
def test_schema_matches_public_sets(kind):
    ds = synthetic_dataset(kind, "train", 20)
    assert ds.features == FEATURES
    assert ds.features["images"] == datasets.Sequence(datasets.Image())
    assert len(ds) == 20
    for row in ds:
        assert len(row["images"]) == 1 and row["problem"].count("<image>") == 1
        w, h = row["images"][0].size
        assert w in synthetic.SIDES and h in synthetic.SIDES and row["images"][0].mode == "RGB"


def test_answers_are_true_of_the_images():
    ds = synthetic_dataset("rl", "train", 120, questions=("color", "total", "shape"))
    counts = []
    for row in ds:
        cells = _read_cells(row["images"][0])
        assert 1 <= len(cells) <= 6  # default difficulty: 1–6 shapes, at most one per cell
        counts.append(int(row["answer"]))
        assert counts[-1] == _true_count(row["problem"], cells), row["problem"]
    assert 0 in counts and max(counts) >= 4  # absent colours are asked, and large counts occur


def test_sft_answers_agree_with_rl_ground_truth():
    sft, rl = synthetic_dataset("sft", "val", 60, seed=7), synthetic_dataset("rl", "val", 60, seed=7)
    assert sft["problem"] == rl["problem"]
    for a, b in zip(sft, rl):
        assert np.array_equal(_pixels(a["images"][0]), _pixels(b["images"][0]))
        response = a["answer"]
        assert re.fullmatch(r"<think>[^<>]+</think> The answer is \\boxed\{\d+\}\.", response), response
        assert BOXED.findall(response) == [b["answer"]]
        assert f"So there {'is' if b['answer'] == '1' else 'are'} {b['answer']} " in response


def test_context_never_names_what_is_counted():
    # the answer depends on the question alone: no context sentence names a colour or a shape kind
    words = set(COLORS) | set(synthetic.SHAPES) | {w + "s" for w in synthetic.SHAPES}
    for sentence in synthetic.CONTEXT:
        assert not words & set(re.findall(r"[a-z]+", sentence.lower())), sentence


def test_problem_lengths_are_skewed_like_real_sets():
    # half the problems are the bare question, the rest carry 1-5 context sentences: a long tail
    problems = synthetic_dataset("rl", "train", 400)["problem"]
    n_context = [len(re.split(r"(?<=\.) ", p)) - 1 for p in problems]
    assert 0.4 < n_context.count(0) / len(problems) < 0.6
    assert set(n_context) == set(range(6))


def test_chain_of_thought_is_short():
    tokenizer = build_tokenizer()
    for count in range(0, 7):
        for things in ["yellow shapes", "shapes", "triangles"]:
            response = synthetic.cot_answer(things, count)
            cot = response[: response.index("</think>") + len("</think>")]
            assert len(tokenizer(cot)["input_ids"]) <= 40, (things, count)


def test_deterministic_per_seed():
    a, b = synthetic_dataset("sft", "train", 30, seed=1), synthetic_dataset("sft", "train", 30, seed=1)
    assert a["problem"] == b["problem"] and a["answer"] == b["answer"]
    assert all(np.array_equal(_pixels(x[0]), _pixels(y[0])) for x, y in zip(a["images"], b["images"]))
    c = synthetic_dataset("sft", "train", 30, seed=2)
    assert not all(np.array_equal(_pixels(x[0]), _pixels(y[0])) for x, y in zip(a["images"], c["images"]))
    # a longer set extends a shorter one: sample i depends on (seed, split, i) only
    assert synthetic_dataset("sft", "train", 10, seed=1)["answer"] == a["answer"][:10]


def test_train_and_val_layouts_are_disjoint():
    # with one colour, one shape and one shape per image there are only 9 layouts, so independent
    # random streams would collide; the content split keeps every layout on one side
    kw = dict(max_shapes=1, colors=["red"], shapes=["circle"])

    def layouts(split: str) -> set:
        ds = synthetic_dataset("rl", split, 150, seed=0, **kw)
        return {(img[0].size, tuple(_read_cells(img[0]))) for img in ds["images"]}

    train, val = layouts("train"), layouts("val")
    assert train and val and not train & val
    assert len(train | val) == 9  # both splits together still cover the whole space


def test_val_images_never_in_train():
    train = {_pixels(x[0]).tobytes() for x in synthetic_dataset("rl", "train", 300)["images"]}
    val = [_pixels(x[0]).tobytes() for x in synthetic_dataset("rl", "val", 300)["images"]]
    assert not train.intersection(val)


def test_difficulty_parameters():
    ds = synthetic_dataset("rl", "train", 80, max_shapes=2, colors=["red", "blue"], questions=["color"])
    for row in ds:
        cells = _read_cells(row["images"][0])
        assert 1 <= len(cells) <= 2
        assert {color for _, color in cells.values()} <= {"red", "blue"}
        assert re.fullmatch(r"How many (red|blue) shapes are in the image\?", _question(row["problem"]))
    for bad in [dict(max_shapes=0), dict(max_shapes=37), dict(colors=["purple"]), dict(questions=[])]:
        with pytest.raises(ValueError):
            synthetic_dataset("rl", "train", 1, **bad)
    with pytest.raises(ValueError):
        synthetic_dataset("dpo", "train", 1)


def test_save_synthetic_parquet_round_trip(tmp_path):
    path = save_synthetic(tmp_path / "sets" / "rl_val.parquet", "rl", "val", 12, seed=3, max_shapes=3)
    loaded = datasets.load_dataset(
        "parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
    )
    original = synthetic_dataset("rl", "val", 12, seed=3, max_shapes=3)
    assert loaded.features == FEATURES
    assert loaded["problem"] == original["problem"] and loaded["answer"] == original["answer"]
    assert all(
        np.array_equal(_pixels(x[0]), _pixels(y[0])) for x, y in zip(loaded["images"], original["images"])
    )
