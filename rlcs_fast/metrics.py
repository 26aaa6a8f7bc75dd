"""Metrics: one JSON object per line in ``<run.dir>/metrics.jsonl`` (rank 0), a console progress bar,
and TensorBoard / W&B when configured. Names are slash-grouped (``train/loss``, ``reward/accuracy``)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rlcs_fast")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(level)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Writes rows to metrics.jsonl (appending, so a resumed run continues the same file) and trackers."""

    def __init__(self, run_dir: str | Path, *, rank: int = 0, progress: bool = True,
                 tensorboard: bool = False, wandb_project: str = "", config: dict | None = None):
        self.rank = rank
        self.path = Path(run_dir) / "metrics.jsonl"
        self.progress = progress and rank == 0
        self._bar = None
        self._tb = None
        self._wandb = None
        if rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard = true needs tensorboard: pip install "
                                  "'rlcs-fast[tensorboard]'") from e
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("log.wandb_project needs wandb: pip install 'rlcs-fast[wandb]'") from e
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(run_dir), resume="allow")

    def truncate_after(self, stage: str, step: int) -> None:
        """On resume: drop rows of `stage` past `step` (written after the checkpoint we resume from), so
        the file reads as one uninterrupted run."""
        if self.rank != 0 or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if row.get("stage") == stage and row.get("step", 0) > step:
                continue
            kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        tmp.replace(self.path)

    def log(self, stage: str, step: int, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        row = {"stage": stage, "step": step, "time": round(time.time(), 3)}
        row.update({k: _plain(v) for k, v in values.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(f"{stage}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{stage}/{k}": v for k, v in numeric.items()})

    def start_bar(self, stage: str, total: int, initial: int = 0) -> None:
        if not self.progress:
            return
        from tqdm.auto import tqdm

        self.close_bar()
        self._bar = tqdm(total=total, initial=initial, desc=stage, dynamic_ncols=True, mininterval=0.5)

    def update_bar(self, postfix: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k,
                                   v in postfix.items()},
                                  refresh=False)
            self._bar.update(1)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
