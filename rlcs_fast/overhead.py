"""What a 7B GRPO step wastes besides the GPU's own work, counted on the CPU: before (the trainer of the
base revision) and after issue 22, side by side in one run.

    python -m rlcs_fast.profile --overhead --model 7b [--out bench/results/overhead_7b_cpu.json]

The step is the recipe's (``configs/grpo_<model>.toml``): ``rollout_batch_size`` prompts × ``n`` responses,
``mini_batch_size`` per update, on ``--ranks`` simulated data-parallel ranks, ``max_tokens_per_microbatch``,
the old-policy pass (several updates per step) and the reference pass (``kl_coef > 0``), activation
checkpointing (a second forward in the backward). Sampled, with a fixed seed:
- images: pixel count log-uniform between the recipe's ``min_pixels`` and ``max_pixels``, a 28-multiple
  grid (``smart_resize``'s factor), so 4 patches per merged token;
- prompt text: uniform 60-300 tokens (system prompt and problem) besides the image tokens;
- responses: log-normal with median ``--response-median`` (500) tokens and σ ``--response-sigma`` (0.8),
  clipped to [16, ``max_response_length``]: a long tail to the cap, as GRPO length curves show.

Figures:
- FLOPs per step, counted from Qwen2.5-VL's real widths (``profile.RELEASED``): linear layers 2·params per
  token, causal attention 2·L²·H per layer and sequence, the head 2·H·V per loss token, the tower per
  patch (windowed attention of 64 patches, 4 full-attention blocks) and merger; backward 2× forward,
  checkpointing +1 forward. Before: the tower on every response's copy of its image, planned by
  first-fit decreasing on lengths alone, short ranks rerunning their largest micro-batch; after: once per
  distinct image of a micro-batch, groups packed together, 3-token fillers.
- host→device bytes per step per rank: the packed tensors of every micro-batch of every pass
  (:func:`batch_bytes`, checked against real ``pack`` output in the tests), pixels float32.
- host syncs per update and per log-prob pass: counted by ``bench/sync_count.py`` (tiny model, 1 and 8
  micro-batches) in this checkout and in the base revision's.
- host seconds per step and rank by phase: ``encode`` (the stock Qwen2.5-VL image processor on images of
  the sampled sizes), ``pack`` (``packing.pack`` on a real micro-batch, scaled by bytes), ``copy`` (the
  host-blocking part of host→device copies: pageable copies block for a host memcpy of their bytes,
  pinned ones are queued; measured memcpy rate), ``reward`` (the default math reward).
- rank imbalance: max over mean tokens per rank, worst mini-batch of the step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .schedule import balance_groups, plan_microbatches, rank_imbalance

REPO = Path(__file__).resolve().parent.parent
PATCH_VALUES = 3 * 2 * 14 * 14  # float32 values per patch row: channels x temporal patch x 14²
FULL_ATTENTION_BLOCKS = 4  # Qwen2.5-VL's fullatt_block_indexes (7, 15, 23, 31); the others window 8x8 patches
WINDOW_PATCHES = 64


@dataclass
class Rollout:
    group: int  # step-wide prompt index
    prompt_text: int
    patches: int  # of its prompt's image
    response: int

    @property
    def tokens(self) -> int:
        return self.prompt_text + self.patches // 4 + self.response


def sample_step(prompts: int, n: int, min_pixels: int, max_pixels: int, max_response: int, median: float,
                sigma: float, seed: int) -> list[Rollout]:
    rng = random.Random(seed)
    out = []
    for g in range(prompts):
        pixels = math.exp(rng.uniform(math.log(min_pixels), math.log(max_pixels)))
        side = max(round(math.sqrt(pixels) / 28), 1)  # a square 28-multiple grid of that area
        patches = 4 * side * side
        text = rng.randint(60, 300)
        for _ in range(n):
            length = int(min(max(rng.lognormvariate(math.log(median), sigma), 16), max_response))
            out.append(Rollout(g, text, patches, length))
    return out


# --- counted figures --------------------------------------------------------------------------------------

def lm_flops_per_token(cfg: dict[str, Any]) -> float:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return 2.0 * layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def tower_flops(patches: int, vision: dict[str, Any], out_width: int) -> float:
    c, inter, depth = vision["hidden_size"], vision["intermediate_size"], vision["depth"]
    linear = 2.0 * patches * (PATCH_VALUES * c + depth * (4 * c * c + 3 * c * inter))
    attention = 4.0 * c * patches * (FULL_ATTENTION_BLOCKS * patches
                                     + (depth - FULL_ATTENTION_BLOCKS) * min(WINDOW_PATCHES, patches))
    merger = 2.0 * (patches // 4) * (4 * c * 4 * c + 4 * c * out_width)
    return linear + attention + merger


def batch_bytes(seq_tokens: list[int], loss_tokens: int, image_patches: list[int], image_tokens_used: int,
                shared: bool, per_token_inputs: int) -> int:
    """Bytes of one packed micro-batch as ``PackedBatch.to`` moves it: input_ids, 4 position rows, targets,
    seq_ids (int64), loss_mask (bool), cu_seqlens (int32), loss_index (int64, after), the tower's inputs
    (pixels float32; per patch its (h, w) position ids and, per merged token, its window index, int64;
    cu_seqlens int32 per image), image_embed_index (int64 per image token, when images are shared),
    and ``per_token_inputs`` float32 values per loss token (old, advantage, reference log-probs)."""
    tokens = sum(seq_tokens)
    out = tokens * (8 + 4 * 8 + 8 + 8 + 1) + 4 * (len(seq_tokens) + 1)
    patches = sum(image_patches)
    out += patches * (PATCH_VALUES * 4 + 2 * 8) + (patches // 4) * 8 + 2 * 4 * (len(image_patches) + 1)
    out += 4 * per_token_inputs * loss_tokens
    if shared:
        out += 8 * loss_tokens + (8 * image_tokens_used if image_tokens_used else 0)
    return out


@dataclass
class PassCost:
    flops: float = 0.0
    tower_flops: float = 0.0
    bytes: int = 0
    pixel_bytes: int = 0
    micro_batches: int = 0


def plan_rank(rollouts: list[Rollout], budget: int, grouped: bool) -> list[list[Rollout]]:
    plan = plan_microbatches([r.tokens for r in rollouts], budget,
                             [r.group for r in rollouts] if grouped else None)
    return [[rollouts[i] for i in mb] for mb in plan]


def pass_cost(ranks: list[list[Rollout]], budget: int, after: bool, cfg: dict, vision: dict,
              multiplier: float, per_token_inputs: int) -> list[PassCost]:
    """One pass (a log-prob pass or an update) over each rank's rollouts → its cost per rank, the
    micro-batch count lined up over ranks (after: 3-token fillers; before: the largest rerun)."""
    plans = [plan_rank(r, budget, grouped=after) for r in ranks]
    count = max(len(p) for p in plans)
    per_token = lm_flops_per_token(cfg)
    head = 2.0 * cfg["hidden_size"] * cfg["vocab_size"]
    costs = []
    for plan in plans:
        cost = PassCost(micro_batches=count)
        padded = plan + ([[]] * (count - len(plan)) if after else [plan[0]] * (count - len(plan)))
        for mb in padded:
            if not mb:  # the filler: 3 tokens, one merged token of 4 patches
                cost.flops += multiplier * (3 * per_token + tower_flops(4, vision, cfg["hidden_size"]))
                cost.tower_flops += multiplier * tower_flops(4, vision, cfg["hidden_size"])
                cost.bytes += batch_bytes([3], 0, [4], 0, after, 0)
                cost.pixel_bytes += 4 * PATCH_VALUES * 4
                continue
            # after: the tower once per distinct image; before: once per response's copy
            images = {r.group: r.patches for r in mb} if after else dict(enumerate(r.patches for r in mb))
            tower = sum(tower_flops(p, vision, cfg["hidden_size"]) for p in images.values())
            attention = 2.0 * cfg["num_hidden_layers"] * cfg["hidden_size"]  # x L² per causal sequence
            lm = sum(r.tokens * per_token + attention * r.tokens ** 2 + r.response * head for r in mb)
            cost.flops += multiplier * (lm + tower)
            cost.tower_flops += multiplier * tower
            loss = sum(r.response for r in mb)
            cost.bytes += batch_bytes([r.tokens for r in mb], loss, list(images.values()),
                                      sum(r.patches // 4 for r in mb), after, per_token_inputs)
            cost.pixel_bytes += sum(images.values()) * PATCH_VALUES * 4
        costs.append(cost)
    return costs


def step_costs(rollouts: list[Rollout], *, world: int, n_mini: int, budget: int, after: bool, cfg: dict,
               vision: dict, old_pass: bool, ref_pass: bool, grad_ckpt: bool) -> dict[str, Any]:
    groups = sorted({r.group for r in rollouts})
    by_group: dict[int, list[Rollout]] = {}
    for r in rollouts:
        by_group.setdefault(r.group, []).append(r)
    owner = {g: i % world for i, g in enumerate(groups)}  # rank_share: a stride over prompts
    minis: list[list[list[Rollout]]] = []  # [mini-batch][rank] rollouts
    imbalance = []
    per_rank_groups = [[g for g in groups if owner[g] == r] for r in range(world)]
    for m in range(n_mini):
        in_mini = [gs[m * len(gs) // n_mini:(m + 1) * len(gs) // n_mini] for gs in per_rank_groups]
        flat = [g for gs in in_mini for g in gs]
        tokens = [sum(r.tokens for r in by_group[g]) for g in flat]
        owners = [r for r, gs in enumerate(in_mini) for _ in gs]
        new = balance_groups(tokens, owners, world) if after else owners
        ranks = [[r for g, o in zip(flat, new) if o == rank for r in by_group[g]] for rank in range(world)]
        minis.append(ranks)
        imbalance.append(rank_imbalance([sum(r.tokens for r in rk) for rk in ranks]))
    whole = [[r for mini in minis for r in mini[rank]] for rank in range(world)]
    passes: dict[str, list[PassCost]] = {}
    if old_pass:
        passes["old"] = pass_cost(whole, budget, after, cfg, vision, 1.0, 0)
    if ref_pass:
        passes["ref"] = pass_cost(whole, budget, after, cfg, vision, 1.0, 0)
    train_mult = 4.0 if grad_ckpt else 3.0
    update = [pass_cost(mini, budget, after, cfg, vision, train_mult, 2 + ref_pass) for mini in minis]
    passes["update"] = [PassCost(*(sum(getattr(u[r], f) for u in update) for f in
                                   ("flops", "tower_flops", "bytes", "pixel_bytes", "micro_batches")))
                        for r in range(world)]
    total = sum(c.flops for costs in passes.values() for c in costs)
    tower = sum(c.tower_flops for costs in passes.values() for c in costs)
    per_rank_bytes = [sum(passes[p][r].bytes for p in passes) for r in range(world)]
    per_rank_pixels = [sum(passes[p][r].pixel_bytes for p in passes) for r in range(world)]
    return {"flops": total, "tower_flops": tower, "tower_share": tower / total,
            "h2d_bytes_per_rank": sum(per_rank_bytes) / world,
            "h2d_pixel_bytes_per_rank": sum(per_rank_pixels) / world, "rank_imbalance": max(imbalance),
            "micro_batches_per_update": [u[0].micro_batches for u in update]}


# --- measured figures -------------------------------------------------------------------------------------

def sync_counts() -> dict[str, Any]:
    """bench/sync_count.py here and in the base revision's checkout (a temporary git worktree)."""
    script = REPO / "bench" / "sync_count.py"
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = subprocess.run(["git", "-C", str(REPO), "merge-base", "HEAD", "main"], capture_output=True,
                              text=True).stdout.strip()
        tree = Path(tmp) / "base"
        checkouts = {"after": None}
        if base and subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), base],
                                   capture_output=True).returncode == 0:
            checkouts["before"] = tree
        try:
            for label, root in checkouts.items():
                env = None if root is None else {**__import__("os").environ, "PYTHONPATH": str(root)}
                result = Path(tmp) / f"{label}.json"
                proc = subprocess.run([sys.executable, str(script), str(result)], cwd=tmp, env=env,
                                      capture_output=True, text=True, timeout=600)
                out[label] = json.loads(result.read_text()) if proc.returncode == 0 else None
            out["base_revision"] = base
        finally:
            if "before" in checkouts:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    return out


def host_seconds(rollouts: list[Rollout], world: int, min_pixels: int, max_pixels: int,
                 before: dict, after: dict, seed: int) -> dict[str, dict[str, float]]:
    """Host seconds per step and rank by phase (see the module docstring)."""
    from PIL import Image

    from .model import load_processor, resolve_model_path
    from .packing import Sample, pack
    from .rewards import compute_score

    rng = random.Random(seed)
    groups = sorted({r.group: r for r in rollouts}.values(), key=lambda r: r.group)
    prompts_per_rank = len(groups) / world
    processor = load_processor(resolve_model_path("tiny"), min_pixels=min_pixels, max_pixels=max_pixels)
    sample = groups[:6]
    t0 = time.perf_counter()
    for r in sample:
        side = int(math.sqrt(r.patches // 4)) * 28
        image = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        processor.image_processor(images=[image], return_tensors="pt")
    encode = (time.perf_counter() - t0) / len(sample) * prompts_per_rank

    # pack: a real micro-batch of about the recipe's budget, with and without per-response pixel copies
    group = [r for r in rollouts if r.group == groups[0].group]
    pixels = torch.randn(groups[0].patches, PATCH_VALUES)
    grid = torch.tensor([[1, int(math.isqrt(groups[0].patches)), int(math.isqrt(groups[0].patches))]])

    def samples(copies: bool) -> list[Sample]:
        out = []
        for r in group:
            n = r.tokens
            out.append(Sample(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                              torch.zeros(3, n, dtype=torch.long), pixels.clone() if copies else pixels,
                              grid))
        return out

    times = {}
    for label, copies in (("before", True), ("after", False)):
        items = samples(copies)
        t0 = time.perf_counter()
        batch = pack(items)
        times[label] = (time.perf_counter() - t0, batch.pixel_values.numel() * 4)
    # memcpy rate: what a pageable host→device copy costs the host before the DMA
    buf = torch.empty(64 * 2**20, dtype=torch.uint8)
    t0 = time.perf_counter()
    for _ in range(5):
        buf.clone()
    memcpy = 5 * buf.numel() / (time.perf_counter() - t0)
    responses = ["<think>" + "x " * 40 + "</think> The answer is \\boxed{" + str(i % 7) + "}"
                 for i in range(64)]
    t0 = time.perf_counter()
    for i, text in enumerate(responses):
        compute_score(text, str(i % 5))
    reward = (time.perf_counter() - t0) / len(responses) * len(rollouts) / world
    out = {}
    for label, costs in (("before", before), ("after", after)):
        seconds, nbytes = times[label]
        out[label] = {"encode": encode, "pack": seconds / nbytes * costs["h2d_pixel_bytes_per_rank"],
                      "copy": costs["h2d_bytes_per_rank"] / memcpy if label == "before" else 0.0,
                      "reward": reward}
    out["after"]["pack_on_worker"] = True
    return out


def run(model: str, *, ranks: int, response_median: float, response_sigma: float, seed: int,
        with_syncs: bool = True, with_host: bool = True) -> dict[str, Any]:
    from .config import load_config
    from .profile import RELEASED, RELEASED_VISION, environment

    cfg = load_config(REPO / "configs" / f"grpo_{model}.toml", {})
    g, d = cfg.grpo, cfg.data
    rollouts = sample_step(g.rollout_batch_size, g.n, d.min_pixels, d.max_pixels, g.max_response_length,
                           response_median, response_sigma, seed)
    n_mini = g.rollout_batch_size // g.mini_batch_size
    common = dict(world=ranks, n_mini=n_mini, budget=g.max_tokens_per_microbatch, cfg=RELEASED[model],
                  vision=RELEASED_VISION, old_pass=n_mini * g.epochs > 1, ref_pass=g.kl_coef > 0,
                  grad_ckpt=cfg.model.gradient_checkpointing)
    before = step_costs(rollouts, after=False, **common)
    after = step_costs(rollouts, after=True, **common)
    report: dict[str, Any] = {
        "generated_by": "rlcs_fast.overhead", "model": model, "environment": environment(),
        "recipe": {"prompts": g.rollout_batch_size, "n": g.n, "ranks": ranks, "updates_per_step": n_mini,
                   "max_tokens_per_microbatch": g.max_tokens_per_microbatch, "min_pixels": d.min_pixels,
                   "max_pixels": d.max_pixels, "old_pass": common["old_pass"], "ref_pass": common["ref_pass"],
                   "gradient_checkpointing": common["grad_ckpt"]},
        "assumptions": {"images": "pixels log-uniform in [min_pixels, max_pixels], square 28-multiple grid",
                        "prompt_text_tokens": "uniform 60-300",
                        "responses": f"log-normal, median {response_median}, sigma {response_sigma}, "
                                     f"clipped to [16, {g.max_response_length}]", "seed": seed},
        "before": before, "after": after}
    if with_syncs:
        report["syncs"] = sync_counts()
    if with_host:
        report["host_seconds"] = host_seconds(rollouts, ranks, d.min_pixels, d.max_pixels, before, after,
                                              seed)
    report["table"] = table_rows(report)
    return report


def table_rows(r: dict[str, Any]) -> list[list[str]]:
    b, a = r["before"], r["after"]

    def ratio(x: float, y: float) -> str:
        return f"{x / y:.1f}x" if y else "–"

    rows = [["FLOPs per step (all ranks)", f"{b['flops']:.3g}", f"{a['flops']:.3g}",
             ratio(b["flops"], a["flops"])],
            ["vision tower FLOPs per step", f"{b['tower_flops']:.3g} ({b['tower_share']:.1%})",
             f"{a['tower_flops']:.3g} ({a['tower_share']:.1%})", ratio(b["tower_flops"], a["tower_flops"])],
            ["host→device bytes per step per rank", f"{b['h2d_bytes_per_rank'] / 1e9:.2f} GB",
             f"{a['h2d_bytes_per_rank'] / 1e9:.2f} GB",
             ratio(b["h2d_bytes_per_rank"], a["h2d_bytes_per_rank"])],
            ["  of which pixels", f"{b['h2d_pixel_bytes_per_rank'] / 1e9:.2f} GB",
             f"{a['h2d_pixel_bytes_per_rank'] / 1e9:.2f} GB",
             ratio(b["h2d_pixel_bytes_per_rank"], a["h2d_pixel_bytes_per_rank"])],
            ["rank imbalance (max/mean tokens, worst mini-batch)", f"{b['rank_imbalance']:.3f}",
             f"{a['rank_imbalance']:.3f}", ""]]
    s = r.get("syncs") or {}
    if s.get("before") and s.get("after"):
        for key, what in (("update", "update"), ("logprob_pass", "log-prob pass")):
            rows.append([f"host syncs per {what}, 1 → 8 micro-batches",
                         f"{s['before'][key + '_one']} → {s['before'][key + '_many']}",
                         f"{s['after'][key + '_one']} → {s['after'][key + '_many']}", ""])
    h = r.get("host_seconds")
    if h:
        for phase in ("encode", "pack", "copy", "reward"):
            note = " (worker thread)" if phase == "pack" else ""
            rows.append([f"host s per step per rank: {phase}", f"{h['before'][phase]:.2f}",
                         f"{h['after'][phase]:.2f}{note}", ""])
    return rows


def markdown(r: dict[str, Any]) -> str:
    lines = ["| figure | before | after | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(row)} |" for row in r["table"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlcs_fast.profile --overhead",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--overhead", action="store_true")
    p.add_argument("--model", default="7b", choices=["3b", "7b"])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--response-median", type=float, default=500.0)
    p.add_argument("--response-sigma", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-syncs", action="store_true", help="skip the two sync-count subprocesses")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    report = run(args.model, ranks=args.ranks, response_median=args.response_median,
                 response_sigma=args.response_sigma, seed=args.seed, with_syncs=not args.no_syncs)
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


# --- the same figures measured on a real step (bench/gpu_check.py's GRPO step) --------------------------

class OverheadCounter:
    """Counts, on the calling thread, what a GRPO update costs besides compute: host syncs (aten
    ``_local_scalar_dense``/``item``/``nonzero``, device→host copies), host→device bytes, and the patches
    the vision tower processes with gradients. Python on every op: use it on an untimed extra update.
    ``optimizer``: its step is left out (AdamW reads its per-parameter step counters, CPU tensors, with
    ``.item()``: not device syncs)."""

    def __init__(self, policy, optimizer=None) -> None:
        self.visual = policy.model.model.visual
        self.optimizer = optimizer
        self.syncs = 0
        self.h2d_bytes = 0
        self.grad_patches = 0

    def __enter__(self) -> OverheadCounter:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func.overloadpacket.__name__
                if name in ("_local_scalar_dense", "item", "nonzero"):
                    counter.syncs += 1
                elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
                    src = args[1] if name == "copy_" else args[0]
                    dst = args[0].device if name == "copy_" else kwargs.get("device", src.device)
                    if src.device.type == "cpu" and torch.device(dst).type != "cpu":
                        counter.h2d_bytes += src.numel() * src.element_size()
                    elif src.device.type != "cpu" and torch.device(dst).type == "cpu":
                        counter.syncs += 1
                return func(*args, **kwargs)

        def hook(module, args):
            if torch.is_grad_enabled():
                counter.grad_patches += args[0].shape[0]

        if self.optimizer is not None:
            from torch.utils._python_dispatch import _disable_current_modes

            step = self._step = self.optimizer.step

            def uncounted(*args, **kwargs):
                with _disable_current_modes():
                    return step(*args, **kwargs)

            self.optimizer.step = uncounted
        self._mode = _Mode()
        self._mode.__enter__()
        self._hook = self.visual.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        self._mode.__exit__(*exc)
        if self.optimizer is not None:
            self.optimizer.step = self._step

    def figures(self, rollouts: list) -> dict[str, float]:
        return {"host_syncs_per_update": self.syncs, "h2d_bytes_per_update": self.h2d_bytes,
                "tower_patches_with_grad_per_response": self.grad_patches / max(len(rollouts), 1)}
