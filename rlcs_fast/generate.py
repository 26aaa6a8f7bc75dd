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
from typing import Any, TextIO

import torch

from .config import ConfigError

log = logging.getLogger("rlcs_fast")


@dataclass
class PromptSettings:
    template: str
    system_prompt: str
    min_pixels: int
    max_pixels: int


def prompt_settings(model_dir: str, args: argparse.Namespace) -> PromptSettings:
    from .eval import run_settings

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

    image = prepare_image(image_path, settings.min_pixels, settings.max_pixels)
    messages = build_messages(question, 1, template=settings.template, system_prompt=settings.system_prompt)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, image


class HFGenerator:
    """transformers ``generate`` with a ``TextStreamer`` on stdout."""

    def __init__(self, model_dir: str, processor, device: torch.device):
        from transformers import Qwen2_5_VLForConditionalGeneration

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        self.processor, self.device = processor, device
        c = self.model.config
        # a generated vision placeholder would not match any image: never sample one (as in training)
        self.banned = [c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id]

    @torch.no_grad()
    def answer(self, text: str, image, *, max_new_tokens: int, temperature: float, out: TextIO) -> str:
        tok = self.processor.tokenizer
        enc = self.processor(text=[text], images=[image], return_tensors="pt").to(self.device)
        streamer = make_streamer(tok, out)
        greedy = temperature == 0
        gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=not greedy,
                                  temperature=None if greedy else temperature, top_p=None, top_k=None,
                                  eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                                  suppress_tokens=self.banned, streamer=streamer)
        return tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_streamer(tokenizer, out: TextIO):
    """transformers' ``TextStreamer`` (answer only, special tokens dropped) writing to ``out``, flushed per
    chunk so a terminal sees tokens as they come."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class VLLMGenerator:
    """vLLM's offline engine; the image goes in as pre-resized PIL, the prompt as the chat text."""

    def __init__(self, model_dir: str, settings: PromptSettings, max_model_len: int):
        from vllm import LLM

        self.llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": 1, "video": 0},
                       mm_processor_kwargs={"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels})

    def answer(self, text: str, image, *, max_new_tokens: int, temperature: float, out: TextIO) -> str:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0)
        result = self.llm.generate({"prompt": text, "multi_modal_data": {"image": image}}, params, use_tqdm=False)
        answer = result[0].outputs[0].text
        out.write(answer + "\n")
        out.flush()
        return answer


def make_generator(engine: str, model_dir: str, processor, settings: PromptSettings, device: torch.device,
                   max_model_len: int):
    if engine in ("auto", "vllm"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            if engine == "vllm":
                log.warning("--engine vllm but vllm is not installed (pip install 'rlcs-fast[vllm]'): using transformers")
        else:
            if device.type == "cuda":
                return VLLMGenerator(model_dir, settings, max_model_len)
    return HFGenerator(model_dir, processor, device)


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
    p.add_argument("--engine", choices=("auto", "hf", "vllm"), default="auto", help="auto: vLLM on GPU when installed")
    p.add_argument("--interactive", action="store_true", help="read 'IMAGE_PATH QUESTION' lines from stdin until EOF")
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
    from .data import SkipSample
    from .model import load_processor

    args = parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    try:
        settings = prompt_settings(args.model, args)
        processor = load_processor(args.model, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    except (ConfigError, OSError) as e:
        print(f"rlcs_fast.generate: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = make_generator(args.engine, args.model, processor, settings, device,
                               max_model_len=32768)
    requests: Any = read_requests(stdin) if args.interactive else [(args.image, args.question)]
    for image_path, question in requests:
        try:
            text, image = build_prompt(processor, settings, image_path, question)
        except (OSError, ValueError, SkipSample) as e:  # a bad path or image: say so, keep the session going
            print(f"rlcs_fast.generate: cannot use image {image_path!r}: {e}", file=sys.stderr)
            if not args.interactive:
                return 1
            continue
        generator.answer(text, image, max_new_tokens=args.max_new_tokens, temperature=args.temperature, out=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
