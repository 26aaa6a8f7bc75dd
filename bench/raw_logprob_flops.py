"""FLOPs the T != 1 raw log-probs cost, before and after they moved into the fused kernel's pass (counted,
not timed; runs on the CPU in seconds).

At a rollout temperature != 1 (the 7B recipe samples at 0.7) ``rollout/logprob_diff`` needs the old
policy's log-probs at T = 1 too, since engines report raw log-probs. The trainer used to run one more
lm-head pass for them, without gradient: 2·N·H·V FLOPs. Now the kernel folds the same logit tiles into a
second log-sum-exp: a few elementwise operations per logit, no GEMM.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul FLOPs) on meta tensors, through the
heads the trainer calls (``rlcs_fast.grpo.logprob_head`` for the old-policy pass, ``grpo_head`` for the
on-policy update), at Qwen2.5-VL-7B's widths; "before" is the two-pass composition those heads ran. The
step's FLOPs per response token come from the 7B config's parameter shapes (``rlcs_fast.plan``), for
the recipe's step (``configs/grpo_7b.toml``: an old-policy pass, a reference pass, and the update with
gradient checkpointing, whose backward recomputes the decoder layers), and against the customary 6·P:
matmul FLOPs only (attention's score term, prompt tokens and the vision tower are left out: each would
add to the step, so the fractions are upper bounds). The counter does not see the in-place ``addmm_`` that
accumulates dW over token chunks, so the update head's own totals are low; the before/after difference,
one [N, H] × [H, V] GEMM, is exact.

``python bench/raw_logprob_flops.py [--tokens N] [--out bench/results/raw_logprob_flops.json]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from rlcs_fast.kernels import fused_linear_grpo_loss, fused_linear_logprob
from torch.utils.flop_counter import FlopCounterMode

from rlcs_fast.config import GRPOConfig
from rlcs_fast.grpo import grpo_head, logprob_head
from rlcs_fast.plan import model_arch
from rlcs_fast.profile import released_config

TEMPERATURE = 0.7  # configs/grpo_7b.toml


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def head_flops(n: int, hidden: int, vocab: int) -> dict[str, int]:
    """Matmul FLOPs of the old-policy head and the on-policy update head (forward + backward) for ``n``
    response tokens, with the T = 1 log-probs from a second pass (before) and from the same pass (after)."""
    meta = torch.device("meta")
    h = torch.empty(n, hidden, device=meta)
    w = torch.empty(vocab, hidden, device=meta)
    targets = torch.zeros(n, dtype=torch.long, device=meta)
    adv, mask = torch.empty(n, device=meta), torch.ones(n, dtype=torch.bool, device=meta)
    seq_ids = torch.zeros(n, dtype=torch.long, device=meta)
    grpo = dataclasses.replace(GRPOConfig(), temperature=TEMPERATURE, kl_coef=0.0)
    lp_out, raw_out = torch.empty(n, device=meta), torch.empty(n, device=meta)

    def old_before():  # what logprob_head(with_raw=True) ran: the pass at T, then one at T = 1
        with torch.no_grad():
            fused_linear_logprob(h, w, targets, temperature=TEMPERATURE, impl="torch")
            fused_linear_logprob(h, w, targets, temperature=1.0, impl="torch")

    def old_after():
        with torch.no_grad():
            logprob_head(targets, TEMPERATURE, "torch", with_raw=True)(h, w)

    def update(raw_in_kernel: bool):
        hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
        if raw_in_kernel:
            head = grpo_head(grpo, targets, None, adv, mask, None, seq_ids, None, 1, "torch", lp_out, raw_out)
            loss, _ = head(hg, wg)
        else:  # what grpo_head(raw_out=...) ran: a no-grad pass at T = 1 beside the loss
            with torch.no_grad():
                raw_out.copy_(fused_linear_logprob(h, w, targets, temperature=1.0, impl="torch"))
            loss, _ = fused_linear_grpo_loss(hg, wg, targets, None, adv, mask, temperature=TEMPERATURE,
                                             num_seqs=1, seq_ids=seq_ids, with_entropy=True, impl="torch",
                                             logprobs_out=lp_out)  # fmt: skip
        loss.backward()

    return {"old_pass_before": _flops(old_before), "old_pass_after": _flops(old_after),
            "update_before": _flops(lambda: update(False)), "update_after": _flops(lambda: update(True))}


def step_flops_per_response_token(arch) -> dict[str, float]:
    """Matmul FLOPs per response token of the 7B recipe's GRPO step, from the parameter shapes."""
    head = arch.vocab * arch.hidden  # lm_head (untied at 7B)
    embed = arch.vocab * arch.hidden
    layers = arch.text_params - embed - (0 if arch.tied else head) - arch.hidden  # decoder layers
    fwd = 2 * (layers + head)
    # old-policy pass + reference pass + update (forward, recompute of the layers, backward = 2 forwards)
    recipe = fwd + fwd + (fwd + 2 * layers + 2 * fwd)
    return {"forward": fwd, "recipe_step": recipe, "six_p": 6 * (layers + head)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="response tokens of one micro-batch")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    arch = model_arch(released_config("7b"))
    n, hd, v = args.tokens, arch.hidden, arch.vocab
    heads = head_flops(n, hd, v)
    saved_per_token = (heads["old_pass_before"] - heads["old_pass_after"]) / n
    step = step_flops_per_response_token(arch)
    report = {
        "generated_by": "bench/raw_logprob_flops.py", "model": "Qwen2.5-VL-7B", "hidden": hd, "vocab": v,
        "tokens": n, "temperature": TEMPERATURE, "head_flops": heads,
        "saved_per_response_token": saved_per_token, "lm_head_pass_per_token": 2 * hd * v,
        "step_flops_per_response_token": step,
        "saved_fraction_of_recipe_step": saved_per_token / step["recipe_step"],
        "saved_fraction_of_6P": saved_per_token / step["six_p"],
    }
    print(f"Qwen2.5-VL-7B head (H={hd}, V={v}), {n} response tokens, T={TEMPERATURE}: matmul GFLOP")
    old = heads["old_pass_before"] - heads["old_pass_after"]
    upd = heads["update_before"] - heads["update_after"]
    print(f"  old-policy pass  {heads['old_pass_before'] / 1e9:.1f} -> {heads['old_pass_after'] / 1e9:.1f}")
    print(f"  on-policy update saves {upd / 1e9:.1f} (the old-policy pass {old / 1e9:.1f})")
    print(f"  saved per response token: {saved_per_token / 1e9:.3f} GFLOP (2·H·V = {2 * hd * v / 1e9:.3f})")
    print(f"  of the recipe's step ({step['recipe_step'] / 1e9:.1f} GFLOP/token): "
          f"{report['saved_fraction_of_recipe_step']:.2%}; of 6·P ({step['six_p'] / 1e9:.1f}): "
          f"{report['saved_fraction_of_6P']:.2%}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
