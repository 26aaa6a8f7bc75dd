"""An offline Hugging Face cache holding tiny models under real hub ids, laid out as ``huggingface_hub``
writes it (``$HF_HOME/hub/models--ORG--NAME/snapshots/<40 hex>/`` plus ``refs/main``), so that with
``HF_HUB_OFFLINE=1`` transformers, ``snapshot_download`` and vLLM resolve ``ORG/NAME`` from it. Used by the
launch tests and by the CI rehearsal (``.ci/rehearsal.py``).

The tiny model under a shipped id keeps what the real checkpoint's ``config.json`` has and the code reads:
the image/video/vision token ids, ``vision_config``, ``tie_word_embeddings`` (true for the small models,
false for the large ones, as Qwen publishes them) and the processor's files (pixel-norm constants, chat
template)."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Callable
from pathlib import Path


def qwen2_5_vl_tiny(out: Path, *, tied: bool, seed: int = 0) -> Path:
    """The family's stand-in for the released 3B (tied) or 7B (untied) config: real token ids and
    vocabulary, tiny weights, the released processor files."""
    from rlcs_fast.families import build_stand_in
    from rlcs_fast.families.qwen2_5_vl import RELEASED

    return build_stand_in(RELEASED["3b" if tied else "7b"], out, seed=seed)


def qwen3_vl_tiny(out: Path, *, tied: bool, seed: int = 0) -> Path:
    """The family's stand-in for the released 4B (tied) or 8B (untied) config: real token ids and
    vocabulary, tiny weights, the released processor files."""
    from rlcs_fast.families import build_stand_in
    from rlcs_fast.families.qwen3_vl import RELEASED

    return build_stand_in(RELEASED["4b" if tied else "8b"], out, seed=seed)


# the family of a hub id (by its name) → the tiny model of that family; a family a shipped config names
# without an entry here stops the rehearsal with that name (add its tiny builder here)
FAMILIES: dict[str, Callable[..., Path]] = {"Qwen2.5-VL": qwen2_5_vl_tiny, "Qwen3-VL": qwen3_vl_tiny}


def tiny_for(repo_id: str) -> tuple[Callable[..., Path], bool]:
    """(builder, tied) for a shipped hub id: the family from the name, tied embeddings below 5B
    parameters (Qwen2.5-VL-3B and Qwen3-VL-4B tie them, the 7B/8B models do not)."""
    name = repo_id.split("/", 1)[1]
    family = next((f for f in sorted(FAMILIES, key=len, reverse=True) if name.startswith(f)), None)
    if family is None:
        raise KeyError(f"no tiny model for the family of {repo_id!r}: add one to FAMILIES in {__file__}")
    size = re.search(r"-(\d+(?:\.\d+)?)B", name)
    tied = size is not None and float(size[1]) < 5
    return FAMILIES[family], tied


def put_in_cache(hf_home: Path, repo_id: str, build: Callable[[Path], Path]) -> Path:
    """Write ``build(dir)``'s model as the cached snapshot of ``repo_id``; returns the snapshot dir."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40 hex digits; fixed per id
    snap = repo / "snapshots" / revision
    if snap.is_dir():
        shutil.rmtree(snap)
    snap.mkdir(parents=True)
    build(snap)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def cache_tiny(hf_home: Path, repo_id: str, *, seed: int = 0) -> Path:
    builder, tied = tiny_for(repo_id)
    return put_in_cache(hf_home, repo_id, lambda d: builder(d, tied=tied, seed=seed))
