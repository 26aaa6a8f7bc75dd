"""Model families: everything the trainer needs to know about one multimodal architecture, behind one small
interface, picked from the checkpoint's ``config.json`` (``model_type``).

A family answers: the 3-D rope positions of one sequence (packed sequences keep them per sequence), the
vision tower's precomputed inputs, the smallest (dummy) image, the vision token ids, the FSDP units, the
planner's parameter counts, the image pre-resize factor, and its offline tiny model. Nothing outside
``rlcs_fast/families/`` names a family: packing, the planner, the engines and the tiny builder ask
:func:`family_for`. Qwen2.5-VL (``qwen2_5_vl.py``) and Qwen3-VL dense (``qwen3_vl.py``) are the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ModelFamily

__all__ = ["ModelFamily", "family_for", "family_by_tiny_name", "build_stand_in", "FAMILIES", "TINY_NAMES"]


def _families() -> dict[str, ModelFamily]:
    from . import qwen2_5_vl, qwen3_vl

    return {f.model_type: f for f in (qwen2_5_vl.FAMILY, qwen3_vl.FAMILY)}


FAMILIES: dict[str, ModelFamily] = _families()
TINY_NAMES: dict[str, ModelFamily] = {f.tiny_name: f for f in FAMILIES.values()}


def model_type_of(config: Any) -> str:
    """``model_type`` of an HF config object (or its vision/text sub-config), a ``config.json`` dict, or
    the string itself."""
    if isinstance(config, str):
        model_type = config
    elif isinstance(config, dict):
        model_type = str(config.get("model_type", ""))
    else:
        model_type = str(getattr(config, "model_type", ""))
    # a vision or text sub-config names its family with a suffix (qwen3_vl_vision, qwen2_5_vl_text)
    for suffix in ("_vision", "_text"):
        if model_type.removesuffix(suffix) in FAMILIES:
            return model_type.removesuffix(suffix)
    return model_type


def family_for(config: Any) -> ModelFamily:
    """The family of ``config`` (an HF config, a ``config.json`` dict, or a ``model_type``); a clear
    error naming the supported types otherwise."""
    model_type = model_type_of(config)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported by rlcs_fast; supported: "
                         f"{', '.join(sorted(FAMILIES))}") from None


def family_by_tiny_name(name: str) -> ModelFamily | None:
    """The family whose offline tiny model ``model.path = name`` names (``"tiny"``, ``"tiny-qwen3-vl"``)."""
    return TINY_NAMES.get(name)


def build_stand_in(hub_config: dict[str, Any], out_dir: str | Path, *, seed: int = 0) -> Path:
    """A tiny offline stand-in for the released checkpoint whose ``config.json`` is ``hub_config`` (any
    supported family): real token ids, vocabulary size and ``tie_word_embeddings``, the family's
    processor, tiny weights. The CI rehearsal places it under the hub id in an offline HF cache
    (``ModelFamily.build_stand_in``)."""
    return family_for(hub_config).build_stand_in(hub_config, out_dir, seed=seed)
