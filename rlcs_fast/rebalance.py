"""Even out a GRPO step's tokens over the data-parallel ranks after generation.

Response lengths run from tens to thousands of tokens, and rollouts stay on the rank that generated them:
the step waits for the most loaded rank. Here the step's groups (a prompt's responses, which share its
image) move between ranks by :func:`rlcs_fast.schedule.balance_groups` (Karmarkar-Karp), separately for
each mini-batch, so that every update sees the same set of rollouts as without balancing (same losses
and gradients, up to the order of float sums). Advantages are computed before: they travel with the
rollouts. The exchange is point to point, pair by pair in one global order (deadlock-free: the earliest
unfinished pair always has both ranks waiting on it), and a group's pixels travel once (pickle keeps
the responses' shared tensor shared).
"""

from __future__ import annotations

import torch

from . import dist
from .schedule import balance_groups, rank_imbalance, split_groups


def _tokens(rollouts) -> int:
    return sum(r.sample.input_ids.numel() for r in rollouts)


def balance_minibatches(rollouts: list, n_mini: int, rank: int, world: int) -> tuple[list[list], dict]:
    """This rank's share of each of the ``n_mini`` global mini-batches, balanced in tokens over ranks,
    and the metrics ``perf/rank_imbalance`` (max over mean tokens per rank, after) and
    ``perf/rank_imbalance_before``. ``rollouts`` must come in runs of equal ``group`` (a group's
    responses together, as ``build_rollouts`` makes them); on return every rollout's ``group`` is the
    step-wide id of its group. A collective: every rank calls it at the same point."""
    spans = split_groups([r.group for r in rollouts], n_mini)
    mine = [[rollouts[k] for k in span] for span in spans]  # [mini-batch] this rank's rollouts
    local = [_groups(part) for part in mine]  # [mini-batch][group] rollouts
    counts = dist.all_gather_object([[_tokens(g) for g in part] for part in local])  # [rank][mb][group]
    before = [sum(sum(c) for c in counts[r]) for r in range(world)]
    out, after = [], [0] * world
    base = 0
    for m in range(len(spans)):
        tokens = [t for r in range(world) for t in counts[r][m]]  # groups of every rank, rank-major
        owners = [r for r in range(world) for _ in counts[r][m]]
        first = [sum(len(counts[q][m]) for q in range(r)) for r in range(world)]  # step-wide id offsets
        for g, group in enumerate(local[m]):
            for ro in group:
                ro.group = base + first[rank] + g
        new = balance_groups(tokens, owners, world) if world > 1 else owners
        for g, r in enumerate(new):
            after[r] += tokens[g]
        out.append(_exchange(local[m], new, owners, first[rank], rank, world))
        base += len(tokens)
    return out, {"perf/rank_imbalance": rank_imbalance(after),
                 "perf/rank_imbalance_before": rank_imbalance(before)}


def _groups(rollouts: list) -> list[list]:
    out: list[list] = []
    for r in rollouts:
        if out and out[-1][0].group == r.group:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _exchange(groups: list[list], new_owner: list[int], owner: list[int], first: int, rank: int,
              world: int) -> list:
    """Send this rank's groups that move, receive those that come; return this rank's rollouts in
    step-wide group order (the same order whatever the world size or arrival)."""
    kept = {first + g: group for g, group in enumerate(groups) if new_owner[first + g] == rank}
    for src in range(world):
        for dst in range(world):
            moving = [g for g in range(len(owner)) if owner[g] == src and new_owner[g] == dst]
            if src == dst or not moving:
                continue
            if rank == src:
                _send([groups[g - first] for g in moving], dst)
            elif rank == dst:
                for g, group in zip(moving, _recv(src)):
                    kept[g] = group
    return [ro for g in sorted(kept) for ro in kept[g]]


def _send(obj, dst: int) -> None:
    import torch.distributed as tdist

    tdist.send_object_list([obj], dst=dst, device=_object_device())


def _recv(src: int):
    import torch.distributed as tdist

    box = [None]
    tdist.recv_object_list(box, src=src, device=_object_device())
    return box[0]


def _object_device() -> torch.device:
    """NCCL moves the pickled bytes through the GPU; gloo through the CPU."""
    import torch.distributed as tdist

    if "gloo" in str(tdist.get_backend()) or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())
