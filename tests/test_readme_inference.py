"""The README's transformers-5 inference snippet runs as written on the tiny export (only the path, the image
and the token budget swapped), and the class it replaces is indeed rejected."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- inference-snippet -->\n```python\n(.*?)```", text, re.DOTALL)
    assert m, "README lost its inference snippet"
    return m.group(1)


def test_readme_inference_snippet_runs_on_the_tiny_export(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlcs_fast.synthetic import synthetic_dataset
    from rlcs_fast.tiny import tiny_path

    model_dir = str(tiny_path())
    image = tmp_path / "fig.png"
    synthetic_dataset("rl", "val", 1, seed=2)[0]["images"][0].save(image)
    code = snippet()
    for old, new in (('"runs/grpo_7b/grpo/hf"', repr(model_dir)), ('"fig.png"', repr(str(image))),
                     ("max_new_tokens=2048", "max_new_tokens=4")):
        assert old in code
        code = code.replace(old, new)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), scope)
    assert type(scope["model"]).__name__ == "Qwen2_5_VLForConditionalGeneration"
    new_tokens = scope["out"][0, scope["inputs"]["input_ids"].shape[1]:]
    assert 1 <= new_tokens.numel() <= 4 and "image_grid_thw" in scope["inputs"]
    assert out.getvalue().strip() == scope["processor"].decode(new_tokens, skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        AutoModelForCausalLM.from_pretrained(model_dir)
