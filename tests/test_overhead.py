"""The overhead benchmark's counted figures (``python -m rlcs_fast.profile --overhead``): its byte model is
the real packed batch's, and at the 7B recipe's shapes the tower's FLOPs and the pixel bytes fall by about
the group size while the ranks end up within 5% of each other."""

from __future__ import annotations

import torch

from rlcs_fast.overhead import PATCH_VALUES, batch_bytes, run
from rlcs_fast.packing import Sample, pack
from rlcs_fast.tiny import tiny_config


def _nbytes(batch) -> int:
    tensors = [batch.input_ids, batch.position_ids, batch.targets, batch.seq_ids, batch.loss_mask,
               batch.cu_seqlens, batch.loss_index, batch.pixel_values]
    tensors += [v for v in batch.vision_kwargs.values() if isinstance(v, torch.Tensor)]
    if batch.image_embed_index is not None:
        tensors.append(batch.image_embed_index)
    return sum(t.numel() * t.element_size() for t in tensors)


def test_batch_bytes_matches_a_real_packed_batch():
    cfg = tiny_config()
    image = cfg.image_token_id
    grid = torch.tensor([[1, 4, 4]])  # 16 patches, 4 merged tokens
    pixels = torch.randn(16, PATCH_VALUES)
    samples = []
    for k in range(3):  # three responses sharing one image
        ids = torch.tensor([5, cfg.vision_start_token_id] + [image] * 4 + [cfg.vision_end_token_id]
                           + [7] * (3 + k))
        target = torch.zeros(ids.numel(), dtype=torch.bool)
        target[7:] = True
        from rlcs_fast.packing import mrope_positions

        samples.append(Sample(ids, target, mrope_positions(cfg, ids, grid), pixels, grid))
    batch = pack(samples, cfg.vision_config)
    model = batch_bytes(batch.seq_lens, batch.num_loss_tokens, [16], 3 * 4, True, 0)
    # window metadata rounds differ by a few int64 entries per image; pixels dominate
    assert abs(_nbytes(batch) - model) <= 64 + 8 * 16, (_nbytes(batch), model)


def test_recipe_7b_tower_and_pixels_cut_and_ranks_balanced():
    r = run("7b", ranks=8, response_median=500.0, response_sigma=0.8, seed=0, with_syncs=False,
            with_host=False)
    b, a = r["before"], r["after"]
    # n = 10, but a group of ~17k tokens is cut over 2 micro-batches of 16,384, each running the tower
    assert b["tower_flops"] / a["tower_flops"] >= 5
    assert b["h2d_pixel_bytes_per_rank"] / a["h2d_pixel_bytes_per_rank"] >= 5
    assert a["rank_imbalance"] <= 1.05 < b["rank_imbalance"]
    assert a["flops"] < b["flops"]
