"""Answer a question about an image with a trained model.

``python -m rlcs_fast.generate --model DIR --image PATH --question TEXT [--max-new-tokens N]
[--temperature T] [--engine auto|hf|vllm] [--interactive]``

The prompt is built exactly as in training: the run's prompt template and system prompt, the image
pre-resized with the run's pixel bounds (read from the run's ``config.toml`` beside the model directory;
``--prompt-template``, ``--system-prompt``, ``--min-pixels`` and ``--max-pixels`` override it or stand in
when there is none). The transformers engine streams tokens to stdout as they are generated; vLLM's
offline API returns whole answers, printed when done. ``--interactive`` reads one ``IMAGE_PATH QUESTION``
per line from stdin until end of input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TextIO

import torch

from .config import ConfigError
from .eval_model import run_settings
from .rollout.build import banned_token_ids, build_engine
from .rollout.engine import SamplingParams

log = logging.getLogger("rlcs_fast")


@dataclass
class PromptSettings:
    template: str
    system_prompt: str
    min_pixels: int
    max_pixels: int


def prompt_settings(model_dir: str, args: argparse.Namespace) -> PromptSettings:
    cfg, _ = run_settings(model_dir)
    d = cfg.data
    return PromptSettings(
        template=d.prompt_template if args.prompt_template is None else args.prompt_template,
        system_prompt=d.system_prompt if args.system_prompt is None else args.system_prompt,
        min_pixels=d.min_pixels if args.min_pixels is None else args.min_pixels,
        max_pixels=d.max_pixels if args.max_pixels is None else args.max_pixels)


def build_prompt(processor, settings: PromptSettings, image_path: str, question: str):
    """(chat text, pre-resized image) as the training encoder builds them."""
    from .data import build_messages, prepare_image

    ip = processor.image_processor  # patch x merge: the model family's pre-resize factor (28 or 32)
    image = prepare_image(image_path, settings.min_pixels, settings.max_pixels, ip.patch_size * ip.merge_size)
    messages = build_messages(question, 1, template=settings.template, system_prompt=settings.system_prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, image


class Generator:
    """Answers with the rollout engine of training and eval (``build_engine``, the same banned vision tokens):
    the transformers engine's model streams its tokens to ``out`` as they come; other engines (vLLM's offline
    API) return whole answers, written when done."""

    def __init__(self, engine, processor, model_config):
        self.engine, self.processor = engine, processor
        self.banned = banned_token_ids(model_config)  # a generated vision placeholder opens no image

    @torch.no_grad()
    def answer(self, text: str, image, *, max_new_tokens: int, temperature: float, out: TextIO) -> str:
        from .rollout.hf_engine import HFEngine

        tok = self.processor.tokenizer
        enc = self.processor(text=[text], images=[image], return_tensors="pt")
        if isinstance(self.engine, HFEngine):
            return self._stream(enc, max_new_tokens=max_new_tokens, temperature=temperature, out=out)
        request = SimpleNamespace(prompt_ids=enc["input_ids"][0], pixel_values=enc["pixel_values"],
                                  image_grid_thw=enc["image_grid_thw"], images=[image])
        sampling = SamplingParams(temperature=temperature, top_p=1.0, max_tokens=max_new_tokens,
                                  banned_token_ids=self.banned)
        (completion,) = self.engine.generate([request], sampling)
        answer = tok.decode(completion.response_ids, skip_special_tokens=True)
        out.write(answer + "\n")
        out.flush()
        return answer

    def _stream(self, enc, *, max_new_tokens: int, temperature: float, out: TextIO) -> str:
        engine, tok = self.engine, self.processor.tokenizer
        enc = enc.to(engine.device)
        greedy = temperature == 0
        generated = engine.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None, top_k=None, eos_token_id=engine.eos, pad_token_id=engine.pad,
            suppress_tokens=list(self.banned), streamer=make_streamer(tok, out))
        return tok.decode(generated[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_streamer(tokenizer, out: TextIO):
    """transformers' ``TextStreamer`` (answer only, special tokens dropped) writing to ``out``, flushed per
    chunk so a terminal sees tokens as they come."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def read_requests(stream: TextIO) -> Iterator[tuple[str, str]]:
    """``IMAGE_PATH QUESTION`` per line (the path first, the rest of the line the question); blank lines
    are skipped; ends at end of input."""
    for line in stream:
        line = line.strip()
        if not line:
            continue
        path, _, question = line.partition(" ")
        if not question.strip():
            print(f"rlcs_fast.generate: no question after the image path in {line!r}", file=sys.stderr)
            continue
        yield path, question.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (an exported <run.dir>/<stage>/hf)")
    p.add_argument("--image", help="image path")
    p.add_argument("--question", help="question about the image")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto",
                   help="auto: vLLM on GPU when installed")
    p.add_argument("--interactive", action="store_true",
                   help="read 'IMAGE_PATH QUESTION' lines from stdin until EOF")
    p.add_argument("--prompt-template", default=None, help="default: the run's data.prompt_template")
    p.add_argument("--system-prompt", default=None, help="default: the run's data.system_prompt")
    p.add_argument("--min-pixels", type=int, default=None, help="default: the run's data.min_pixels")
    p.add_argument("--max-pixels", type=int, default=None, help="default: the run's data.max_pixels")
    args = p.parse_args(argv)
    if not args.interactive and (args.image is None or args.question is None):
        p.error("give --image and --question, or --interactive")
    if args.temperature < 0 or args.max_new_tokens < 1:
        p.error("--temperature must be >= 0 and --max-new-tokens >= 1")
    if args.prompt_template is not None and "{problem}" not in args.prompt_template:
        p.error('--prompt-template must contain "{problem}" where the question goes')
    return args


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    from transformers import AutoConfig

    from .data import SkipSample
    from .model import load_processor

    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        from .eval_model import resolve_eval_model

        args.model = resolve_eval_model(args.model)  # a hub id: its local snapshot, for every reader below
        settings = prompt_settings(args.model, args)
        processor = load_processor(args.model, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    except (ConfigError, OSError) as e:
        print(f"rlcs_fast.generate: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, _ = run_settings(args.model)
    engine = build_engine(cfg.rollout, args.model, tokenizer=processor.tokenizer, device=device,
                          kind=args.engine,
                          max_model_len=32768, seed=cfg.run.seed, min_pixels=settings.min_pixels,
                          max_pixels=settings.max_pixels, from_disk=True)
    generator = Generator(engine, processor, AutoConfig.from_pretrained(args.model))
    requests: Any = read_requests(stdin) if args.interactive else [(args.image, args.question)]
    for image_path, question in requests:
        try:
            text, image = build_prompt(processor, settings, image_path, question)
        except (OSError, ValueError, SkipSample) as e:  # a bad path or image: say so, keep the session going
            print(f"rlcs_fast.generate: cannot use image {image_path!r}: {e}", file=sys.stderr)
            if not args.interactive:
                return 1
            continue
        generator.answer(text, image, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, out=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
