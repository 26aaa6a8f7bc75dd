"""A model named by hub id becomes one local snapshot directory, resolved once at the start of a run (or
of ``eval``) and handed to everything that reads the model: the trainer, the rollout engine and eval.

Why not pass the hub id along: vLLM and the trainer's own readers (``config.json`` for the vision token
ids, the preprocessor's pixel-norm constants) each resolve a name their own way, and a reader that only
looks at local directories silently gets nothing for a hub id (the vLLM engine then ran without its
image settings and crashed at the first image). One directory, one truth.

``huggingface_hub.snapshot_download`` does the resolving: with ``HF_HUB_OFFLINE=1`` it answers from the
local cache (``$HF_HOME/hub/models--ORG--NAME/snapshots/<rev>/``, ``refs/main``), otherwise it downloads
what is missing. Under torchrun rank 0 downloads first and the others then read the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import dist

# weights in formats the trainer never reads (the Qwen repos ship safetensors)
IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx", "*.gguf", "original/*"]
SMALL_FILES = ["*.json", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(path: str) -> bool:
    """``ORG/NAME`` that is not an existing local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def snapshot_dir(repo_id: str, *, key: str = "model.path", files_only: bool = False,
                 local_only: bool = False) -> str:
    """The local snapshot directory of ``repo_id`` (downloaded if the hub is reachable and allowed);
    ``files_only``: just the small files (configs, tokenizer, template), as a dry run needs."""
    from huggingface_hub import constants, snapshot_download

    from .config import ConfigError

    try:
        patterns = {"allow_patterns": SMALL_FILES} if files_only else {"ignore_patterns": IGNORE_PATTERNS}
        return snapshot_download(repo_id=repo_id, local_files_only=local_only, **patterns)
    except Exception as e:  # offline cache miss, no network, unknown repo, gated repo: one message
        where = f"the Hugging Face cache {constants.HF_HUB_CACHE}"
        why = ("HF_HUB_OFFLINE is set, so only that cache is read" if constants.HF_HUB_OFFLINE
               else "and the hub did not give it")
        raise ConfigError(
            f"config key `{key}` = {repo_id!r}: not in {where}, {why} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Fix: `huggingface-cli download {repo_id}` on a "
            "machine with access (same HF_HOME), or give a local Hugging Face directory.") from e


def resolve_model_path(path: str, *, tiny_seed: int = 0, key: str = "model.path") -> str:
    """`"tiny"` / `"tiny-qwen3-vl"` → the offline tiny model of that family (built once into the cache); a
    local directory → itself; a hub id → its local snapshot directory. Collective under torchrun (every rank
    calls it)."""
    from .families import family_by_tiny_name

    if family_by_tiny_name(path) is not None:
        from .tiny import tiny_path

        if dist.is_dist():  # one rank builds, the others wait, so they never race on the cache
            if dist.rank() == 0:
                tiny_path(seed=tiny_seed, name=path)
            dist.barrier()
        return str(tiny_path(seed=tiny_seed, name=path))
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if not is_hub_id(path):
        from .config import ConfigError

        raise ConfigError(f"config key `{key}` = {path!r} is neither a local directory nor a hub id "
                          "(ORG/NAME): give an exported Hugging Face directory, a hub id, or \"tiny\".")
    if dist.is_dist() and dist.rank() != 0:
        dist.barrier()  # rank 0 downloads, then the others find everything in the cache (or fail alike)
        return snapshot_dir(path, key=key)
    try:
        return snapshot_dir(path, key=key)
    finally:
        if dist.is_dist():
            dist.barrier()
