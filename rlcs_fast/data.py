"""Data: loading the public sets' schema (hub id, local parquet/JSONL file or folder, or the synthetic
task), chat template and format instruction, image pre-resizing, assistant-only targets, and the
deterministic, resumable order of samples.

Both public sets (`WaltonFuture/Multimodal-Cold-Start`, `WaltonFuture/Multimodal-RL-Data`) have the
columns `images` (list of images), `problem` (with one `<image>` marker per image) and `answer` (the full
chain-of-thought response for SFT; the ground truth for RL). A row that cannot be used is skipped and
counted by kind, with one warning per kind; a run never dies on one bad sample.
"""

from __future__ import annotations

import io
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import ConfigError
from .families import family_for
from .packing import Sample, mrope_positions

log = logging.getLogger("rlcs_fast")

IMAGE_MARKER = "<image>"
IMAGE_FACTOR = 28  # patch 14 x spatial merge 2


class SkipSample(Exception):
    """A row that cannot be used; `kind` names the reason for the counters."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class SkipCounter:
    """Counts skipped rows by kind (each row once, however many epochs meet it) and warns once per kind."""

    def __init__(self) -> None:
        self.rows: dict[str, set] = {}

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(keys) for kind, keys in self.rows.items()}

    def add(self, kind: str, detail: str = "", where: str = "", key: object = None) -> None:
        if kind not in self.rows:
            log.warning("skipping a sample%s (%s): %s; further skips of this kind are only counted "
                        "(metrics: data/skipped)", f" of {where}" if where else "", kind, detail)
        self.rows.setdefault(kind,
                             set()).add((where, key if key is not None else len(self.rows.get(kind, ()))))

    def state(self) -> dict[str, list]:
        return {kind: sorted(keys, key=repr) for kind, keys in self.rows.items()}

    def load_state(self, state: dict[str, list]) -> None:
        for kind, keys in state.items():
            self.rows.setdefault(kind, set()).update(tuple(k) for k in keys)

    @property
    def total(self) -> int:
        return sum(len(keys) for keys in self.rows.values())

    def metrics(self) -> dict[str, float]:
        """`data/skipped` and `data/skipped/<kind>` summed over ranks (collective: every rank calls it)."""
        from . import dist

        by_kind: dict[str, int] = {}
        for counts in dist.all_gather_object(self.counts):
            for kind, n in counts.items():
                by_kind[kind] = by_kind.get(kind, 0) + n
        return {"data/skipped": float(sum(by_kind.values())),
                **{f"data/skipped/{kind}": float(n) for kind, n in sorted(by_kind.items())}}


@dataclass(frozen=True)
class Columns:
    images: str = "images"
    problem: str = "problem"
    answer: str = "answer"


# --- loading -----------------------------------------------------------------------------------------

def _local_files(path: Path) -> tuple[str, list[str]]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    by_kind = {"parquet": [f for f in files if f.suffix == ".parquet"],
               "json": [f for f in files if f.suffix in (".jsonl", ".json")]}
    for kind, found in by_kind.items():
        if found:
            return kind, [str(f) for f in found]
    raise ConfigError(f"data path {str(path)!r} holds no .parquet, .jsonl or .json file.")


def load_table(source: str, split: str, *, kind: str, seed: int = 0, synthetic_size: int = 0,
               key: str = "data.train"):
    """A `datasets.Dataset` from a hub id, a local file or folder, or `"synthetic"` (the shipped task)."""
    import datasets

    if source == "synthetic":
        from .synthetic import synthetic_dataset

        return synthetic_dataset(kind, "val" if split in ("val", "validation", "test") else "train",
                                 synthetic_size, seed=seed)
    path = Path(source).expanduser()
    if path.exists():
        fmt, files = _local_files(path)
        ds = datasets.load_dataset(fmt, data_files=files, split="train")
        if split not in ("train", "val", "validation", "test") or path.is_dir():
            # a folder with split-named files: keep the files of this split when there are any
            chosen = [f for f in files if Path(f).stem.startswith(split) or f"/{split}/" in f]
            if chosen and len(chosen) < len(files):
                ds = datasets.load_dataset(fmt, data_files=chosen, split="train")
        return ds
    if source.count("/") == 1 and not source.startswith((".", "/")):
        try:
            return datasets.load_dataset(source, split=split)
        except Exception as e:  # the hub or the split is out of reach: say which key to change
            raise ConfigError(f"config key `{key}` = {source!r}: could not load split {split!r} from the hub "
                              f"({type(e).__name__}: {e}). Use a local parquet/JSONL path or "
                              "\"synthetic\".") from e
    raise ConfigError(f"config key `{key}` = {source!r} is neither an existing path, a hub id (owner/name), "
                      "nor \"synthetic\".")


def check_columns(ds, columns: Columns, *, source: str, need_answer: bool = True) -> None:
    names = set(ds.column_names)
    needed = {"data.image_column": columns.images, "data.problem_column": columns.problem}
    if need_answer:
        needed["data.answer_column"] = columns.answer
    for key, col in needed.items():
        if col not in names:
            raise ConfigError(f"data set {source!r} has no column {col!r} (it has {sorted(names)}); set "
                              f"`{key}` to the right column name.")


def lazy_images(ds, column: str):
    """Keep images undecoded, so one unreadable image skips one row instead of failing the data set."""
    import datasets

    feat = ds.features.get(column)
    if isinstance(feat, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(getattr(feat, "feature", None), datasets.Image):
        return ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


# --- images ------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, min_pixels: int, max_pixels: int,
                 factor: int = IMAGE_FACTOR) -> tuple[int, int]:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as _smart_resize

    return _smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


# A row's image is refused above this many pixels before its pixels are decoded: Pillow's own bomb limit
# (about 89 MP, 256 MiB of RGB), which Pillow itself only enforces at twice the value. The header alone
# tells the size, so a 1 KB PNG claiming 100k x 100k pixels costs nothing.
MAX_DECODE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
ORIENTATION = 0x0112  # the EXIF tag


def _open(obj: Any) -> Image.Image:
    """Open lazily (header only) what a data set row holds: PIL, {"bytes", "path"}, bytes or a path."""
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, dict):
        if obj.get("bytes"):
            return Image.open(io.BytesIO(obj["bytes"]))
        if obj.get("path"):
            return Image.open(obj["path"])
        raise ValueError("image entry has neither bytes nor path")
    if isinstance(obj, (bytes, bytearray)):
        return Image.open(io.BytesIO(obj))
    if isinstance(obj, str):
        return Image.open(obj)
    raise ValueError(f"unsupported image value of type {type(obj).__name__}")


def open_image(obj: Any) -> Image.Image:
    """An RGB image from a row's value: the first frame of an animation, turned upright by its EXIF
    orientation (as the camera meant it), alpha composited on white (as qwen-vl-utils does), 16-bit
    scaled to 8-bit (a plain conversion would clip it to white). Refuses an image above
    `MAX_DECODE_PIXELS` before decoding it (`SkipSample("image_too_large")`)."""
    try:
        img = _open(obj)
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", str(e)) from e
    if img.width * img.height > MAX_DECODE_PIXELS:
        raise SkipSample("image_too_large", f"{img.width}x{img.height} pixels > {MAX_DECODE_PIXELS}")
    img.load()
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        pass
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[3])
        return bg
    return img.convert("RGB")


def prepare_image(obj: Any, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR) -> Image.Image:
    """Decode and pre-resize once (to multiples of ``factor``: the family's patch x merge, 28 for
    Qwen2.5-VL, 32 for Qwen3-VL), so the trainer's and vLLM's processors both see an image whose resize is
    the identity and agree on the number of image tokens."""
    img = open_image(obj)
    h, w = smart_resize(img.height, img.width, min_pixels, max_pixels, factor=factor)
    return img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.BICUBIC)


# --- prompts -----------------------------------------------------------------------------------------

@dataclass
class Prompt:
    """One RL / validation prompt, tokenized, with its images ready for either rollout engine."""

    prompt_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [3, T] mrope
    pixel_values: torch.Tensor | None  # [P, 1176]
    image_grid_thw: torch.Tensor | None  # [I, 3]
    images: list[Image.Image]  # pre-resized, for vLLM
    answer: str  # ground truth
    index: int = -1  # row index in its table


def _text(value: Any, column: str) -> Any:
    """A text cell as str. Bytes must be UTF-8 and a str must encode back to it (lone surrogates from a
    lenient decoder make the tokenizer raise): otherwise the row is skipped as `bad_text`."""
    try:
        if isinstance(value, (bytes, bytearray)):
            return bytes(value).decode("utf-8")
        if isinstance(value, str):
            value.encode("utf-8")
    except UnicodeError as e:
        raise SkipSample("bad_text", f"column {column!r} is not valid UTF-8 ({e.reason})") from e
    return value


def row_fields(row: dict[str, Any], columns: Columns, *,
               need_answer: bool = True) -> tuple[list[Any], str, str]:
    images = row.get(columns.images)
    problem = _text(row.get(columns.problem), columns.problem)
    answer = _text(row.get(columns.answer), columns.answer)
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]
    if not isinstance(problem, str) or not problem.strip():
        raise SkipSample("missing_problem", f"column {columns.problem!r} is empty")
    if need_answer and (not isinstance(answer, str) or not answer.strip()):
        if answer is None or not str(answer).strip():
            raise SkipSample("missing_answer", f"column {columns.answer!r} is empty")
        answer = str(answer)
    return images, problem, answer or ""


def build_messages(problem: str, n_images: int, *, template: str, system_prompt: str = "",
                   answer: str | None = None) -> list[dict[str, Any]]:
    """Chat messages with the images placed at the `<image>` markers (or first, when there are none)."""
    text = template.replace("{problem}", problem)
    markers = text.count(IMAGE_MARKER)
    if markers and markers != n_images:
        raise SkipSample("image_mismatch", f"{markers} {IMAGE_MARKER} markers for {n_images} images")
    content: list[dict[str, Any]] = []
    if markers:
        pieces = text.split(IMAGE_MARKER)
        for i, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if i < n_images:
                content.append({"type": "image"})
    else:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text.strip()}]
    messages = [{"role": "system",
                 "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


class Encoder:
    """Turns rows into `Sample`s (SFT) and `Prompt`s (RL, validation); picklable for data-loader workers."""

    def __init__(self, processor, model_config, columns: Columns, *, template: str, system_prompt: str,
                 min_pixels: int, max_pixels: int, max_length: int, max_images: int | None = None):
        self.processor = processor
        self.model_config = model_config
        self.columns = columns
        self.template = template
        self.system_prompt = system_prompt
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.max_length = max_length
        self.max_images = max_images  # per prompt sent to a rollout engine (None: no limit)
        self.eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self._slot = f"\ue000{uuid.uuid4().hex}\ue001"  # brackets a data text in the rendered template
        self.factor = family_for(model_config).image_factor(model_config.vision_config)

    def _images(self, raw: list[Any]) -> list[Image.Image]:
        try:
            return [prepare_image(x, self.min_pixels, self.max_pixels, self.factor) for x in raw]
        except SkipSample:
            raise
        except Exception as e:  # PIL raises many types for corrupt or truncated files, smart_resize for
            raise SkipSample("unreadable_image", f"{type(e).__name__}: {e}") from e  # extreme aspect ratios

    def _prompt_inputs(self, problem: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """``input_ids`` [1, T] (each image's pad expanded to its merged-token run), ``pixel_values`` and
        ``image_grid_thw``, as the processor gives them, except that text from the data is tokenized with
        its special tokens split: a problem holding ``<|im_end|>`` or ``<|image_pad|>`` is text, never a
        turn or an image (only the chat template's own markers are control tokens)."""
        messages = build_messages(problem, len(images), template=self.template,
                                  system_prompt=self.system_prompt)
        texts: list[str] = []
        for message in messages:  # every text part becomes a placeholder the template passes through
            for part in message["content"]:
                if part.get("type") == "text":
                    texts.append(part["text"])
                    part["text"] = f"{self._slot}{len(texts) - 1}{self._slot}"
        rendered = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out: dict[str, torch.Tensor] = {}
        runs: list[int] = []
        if images:
            vision = self.processor.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vision["pixel_values"], image_grid_thw=vision["image_grid_thw"])
            merge = self.processor.image_processor.merge_size
            runs = (vision["image_grid_thw"].prod(-1) // merge**2).tolist()
        tok, pad = self.processor.tokenizer, self.model_config.image_token_id
        ids: list[int] = []
        for i, piece in enumerate(rendered.split(self._slot)):
            if i % 2:  # text from the data
                ids += tok(texts[int(piece)], add_special_tokens=False,
                           split_special_tokens=True)["input_ids"]
                continue
            for t in tok(piece, add_special_tokens=False)["input_ids"]:  # the template: markers special
                if t == pad:
                    if not runs:
                        raise SkipSample("image_mismatch", "more image places in the prompt than images")
                    ids += [t] * runs.pop(0)
                else:
                    ids.append(t)
        if runs:
            raise SkipSample("image_mismatch", f"{len(runs)} image(s) without a place in the prompt")
        out["input_ids"] = torch.tensor([ids], dtype=torch.long)
        return out

    def prompt(self, row: dict[str, Any], index: int = -1, max_length: int | None = None) -> Prompt:
        raw, problem, answer = row_fields(row, self.columns)
        if self.max_images is not None and len(raw) > self.max_images:
            # the engine refuses such a prompt inside generate (vLLM: "At most 4 image(s)"), killing the rank
            raise SkipSample("too_many_images", f"{len(raw)} images > rollout.max_images_per_prompt "
                             f"{self.max_images}")
        images = self._images(raw)
        enc = self._prompt_inputs(problem, images)
        ids = enc["input_ids"][0]
        limit = max_length or self.max_length
        if ids.numel() > limit:
            raise SkipSample("too_long", f"prompt of {ids.numel()} tokens > limit {limit}")
        grid = enc.get("image_grid_thw")
        return Prompt(ids, mrope_positions(self.model_config, ids, grid), enc.get("pixel_values"), grid,
                      images, answer, index)

    def sft(self, row: dict[str, Any]) -> Sample:
        raw, problem, answer = row_fields(row, self.columns)
        images = self._images(raw)
        enc = self._prompt_inputs(problem, images)
        prompt_ids = enc["input_ids"][0]
        # special tokens split: an answer holding <|im_end|> would teach the model to stop mid-answer
        completion = self.processor.tokenizer(answer.strip(), add_special_tokens=False,
                                              split_special_tokens=True)["input_ids"] + [self.eos]
        ids = torch.cat([prompt_ids, torch.tensor(completion, dtype=torch.long)])
        if ids.numel() > self.max_length:
            raise SkipSample("too_long", f"{ids.numel()} tokens > data.max_length {self.max_length}")
        target_mask = torch.zeros(ids.numel(), dtype=torch.bool)
        target_mask[prompt_ids.numel():] = True  # assistant tokens only, the closing <|im_end|> included
        grid = enc.get("image_grid_thw")
        return Sample(input_ids=ids, target_mask=target_mask,
                      position_ids=mrope_positions(self.model_config, ids, grid),
                      pixel_values=enc.get("pixel_values"), image_grid_thw=grid)


# --- order -------------------------------------------------------------------------------------------

def global_indices(n: int, start: int, count: int, seed: int) -> list[int]:
    """Positions [start, start + count) of an endless stream of reshuffled epochs over n rows. The same
    for any number of processes, so a step's global batch does not depend on the world size and a resumed
    run continues exactly where it stopped."""
    out = []
    pos = start
    perm, perm_epoch = None, -1
    while len(out) < count:
        epoch = pos // n
        if epoch != perm_epoch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, perm_epoch = torch.randperm(n, generator=g).tolist(), epoch
        out.append(perm[pos % n])
        pos += 1
    return out


def read_row(table, i: int) -> dict[str, Any] | SkipSample:
    """Row ``i``, or the reason it cannot be read: a string column holding invalid UTF-8 (the bytes a
    non-checking writer leaves in parquet) fails in the Arrow-to-Python conversion of that row only."""
    try:
        return table[i]
    except UnicodeDecodeError as e:
        return SkipSample("bad_text", f"row {i} holds text that is not valid UTF-8 ({e.reason})")


def encode_many(fn, rows_and_idx, counter: SkipCounter, where: str) -> list:
    """Apply `fn` to each (row, index), skipping and counting bad rows (a row given as a `SkipSample`,
    from :func:`read_row`, is counted as it is)."""
    out = []
    for row, idx in rows_and_idx:
        if isinstance(row, SkipSample):
            counter.add(row.kind, row.detail, where, key=idx)
            continue
        try:
            out.append(fn(row, idx))
        except SkipSample as s:
            counter.add(s.kind, s.detail, where, key=idx)
    return out
