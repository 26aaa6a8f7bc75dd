"""The offline tiny Qwen2.5-VL: real architecture, random weights from a seed, a real byte-level BPE
tokenizer trained on shipped text, the stock processor. ``model.path = "tiny"`` resolves here."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

# Qwen2-VL's special tokens, in Qwen's order, right after the base vocabulary as in the real tokenizer
# (there they start at 151643).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BASE_VOCAB = 1000
SPECIAL_IDS = {tok: BASE_VOCAB + i for i, tok in enumerate(SPECIAL_TOKENS)}
VOCAB_SIZE = 1024  # embedding rows: base + specials, padded to a multiple of 64 as the real models are


def tiny_config() -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL config: every architectural feature of the 3B/7B (GQA, mrope, windowed ViT
    with full-attention blocks, patch merger, tied embeddings as in the 3B) at CPU size."""
    hidden, heads = 128, 4
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            tie_word_embeddings=True,
            bos_token_id=SPECIAL_IDS["<|endoftext|>"],
            eos_token_id=SPECIAL_IDS["<|im_end|>"],
            pad_token_id=SPECIAL_IDS["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
            # trained from scratch here (the real models start from a pretrained ViT): at the text tower's
            # 0.02 the random ViT's token-to-token differences are drowned by the merger's learned offset
            # and the LM learns to ignore the image (measured: answers independent of the image after 300
            # SFT steps); at 0.1 the image features carry the counts from the first steps on
            initializer_range=0.1,
        ),
        image_token_id=SPECIAL_IDS["<|image_pad|>"],
        video_token_id=SPECIAL_IDS["<|video_pad|>"],
        vision_start_token_id=SPECIAL_IDS["<|vision_start|>"],
        vision_end_token_id=SPECIAL_IDS["<|vision_end|>"],
        tie_word_embeddings=True,
    )


TINY_VERSION = 1  # bump when the saved directory's format changes in a way the fingerprint cannot see
CORPUS_PATH = Path(__file__).parent / "assets" / "tiny_corpus.txt"
MIN_PIXELS = 28 * 28 * 4  # 4 merged image tokens at least
MAX_PIXELS = 28 * 28 * 256  # 256 merged image tokens at most: the synthetic task's 84/112-px images use 9/16
MODEL_MAX_LENGTH = 32768

# Qwen2.5-VL's released chat template, rewritten with the same output: a default system turn when the
# conversation does not open with one, `<|vision_start|><|image_pad|><|vision_end|>` for each image part
# (`{"type": "image"}`, or any part carrying an `image`/`image_url` key), the video equivalent, optional
# "Picture k: " labels with `add_vision_id`, and `<|im_start|>assistant\n` with `add_generation_prompt`.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)


def build_tokenizer(first_special_id: int = BASE_VOCAB) -> Qwen2Tokenizer:
    """A byte-level BPE of exactly ``BASE_VOCAB`` tokens trained on the shipped corpus with Qwen2's
    normalizer, pre-tokenizer and decoder, then the 14 Qwen special tokens at ``SPECIAL_IDS``.

    ``first_special_id`` > ``BASE_VOCAB`` places the specials where a released checkpoint has them
    (151643 for every Qwen2.5-VL / Qwen3-VL): the ids in between are filler entries that no merge
    produces, so the tokenizer of a stand-in for the real model (``families.build_stand_in``) gives the
    real token ids."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no unk
        special_tokens=[],  # specials are appended after the base vocabulary, as in Qwen's tokenizer
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    assert sorted(vocab.values()) == list(range(BASE_VOCAB)), (
        f"tiny BPE has {len(vocab)} base tokens, expected ids 0..{BASE_VOCAB - 1}: corpus too small?"
    )
    assert first_special_id >= BASE_VOCAB, f"first_special_id {first_special_id} < {BASE_VOCAB}"
    vocab = {**vocab, **{f"<|rlcs_filler_{i}|>": i for i in range(BASE_VOCAB, first_special_id)}}
    # Qwen2Tokenizer rebuilds the same pipeline from vocab + merges. It adds its special tokens in the
    # order unk/eos/pad first, then the extras: `<|endoftext|>` must be the only one of those at that
    # point to land at id 1000, so eos becomes `<|im_end|>` only afterwards.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in model["merges"]],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    want = {tok: first_special_id + i for i, tok in enumerate(SPECIAL_TOKENS)}
    assert got == want and len(tokenizer) == first_special_id + len(SPECIAL_TOKENS), (
        f"special token ids {got} != {want}"
    )
    return tokenizer


def build_processor(
    tokenizer: Qwen2Tokenizer | None = None,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> Qwen2_5_VLProcessor:
    """The stock Qwen2.5-VL processor (fast image processor, stock video processor) around the tiny
    tokenizer, with the chat template set on both."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(*, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """``tiny_config()`` with float32 weights drawn from ``seed``; the caller's RNG state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_config())
    ids = SPECIAL_IDS
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],  # as the released generation_config
        pad_token_id=ids["<|endoftext|>"],
    )
    return model


def build_tiny(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny model as an ordinary Hugging Face directory (safetensors weights, config,
    generation config, tokenizer, processor, chat template). Same seed, same bytes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = build_processor()
    build_model(seed=seed).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _fingerprint() -> str:
    """Changes whenever anything that shapes the built directory changes, so a stale cache is never
    reused after an edit of the config, corpus or template."""
    h = hashlib.sha256()
    parts = (str(TINY_VERSION), tiny_config().to_json_string(), CHAT_TEMPLATE, f"{MIN_PIXELS},{MAX_PIXELS}")
    for part in parts:
        h.update(part.encode())
    h.update(CORPUS_PATH.read_bytes())
    return h.hexdigest()[:10]


def tiny_path(*, seed: int = 0, cache_dir: str | Path | None = None, name: str = "tiny") -> Path:
    """The tiny model ``name`` (``"tiny"``: Qwen2.5-VL; ``"tiny-qwen3-vl"``: Qwen3-VL, built by its family
    module) for ``seed``, built on first use into ``cache_dir`` (default
    ``$RLCS_CACHE``, else ``~/.cache/rlcs_fast``). Safe when several processes (torchrun ranks) race:
    each builds in a private temporary directory and renames it into place; renaming is atomic, so the
    final directory, when it exists, is complete, and a loser of the race drops its copy."""
    from .families import family_by_tiny_name

    family = family_by_tiny_name(name)
    if family is None:
        raise ValueError(f"no tiny model named {name!r}")
    root = Path(cache_dir or os.environ.get("RLCS_CACHE") or Path.home() / ".cache" / "rlcs_fast")
    if name == "tiny":
        final = root / f"tiny-v{TINY_VERSION}.{_fingerprint()}-s{seed}"
    else:  # the other families' tiny models: their own parts, the shared tokenizer corpus
        h = hashlib.sha256()
        for part in (str(TINY_VERSION), *family.tiny_fingerprint_parts()):
            h.update(part.encode())
        h.update(CORPUS_PATH.read_bytes())
        final = root / f"{name}-v{TINY_VERSION}.{h.hexdigest()[:10]}-s{seed}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        family.build_tiny(tmp, seed=seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory once published
        try:
            os.rename(tmp, final)
        except OSError:
            # ENOTEMPTY/EEXIST: another process renamed its complete copy first; use that one
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
