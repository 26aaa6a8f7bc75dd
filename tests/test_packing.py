"""Packed training equals one-sequence-at-a-time training on the tiny Qwen2.5-VL (CPU, fp32)."""

from __future__ import annotations

import copy
import random
import warnings

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from rlcs_fast import schedule
from rlcs_fast.attention import apply_attention
from rlcs_fast.packing import (
    PackedBatch,
    Sample,
    extend_positions,
    forward_hidden,
    mrope_positions,
    pack,
    unpack,
)
from rlcs_fast.schedule import plan_microbatches
from rlcs_fast.tiny import SPECIAL_IDS, tiny_config

IMAGE, V_START, V_END = (SPECIAL_IDS[t] for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
CFG = tiny_config()


def make_sample(gen: torch.Generator, grids: list[list[int]], n_text: int = 6) -> Sample:
    """Text, then each image framed by vision start/end and followed by a little text; the targets are
    the tokens after the first half (a prompt/response split, as SFT and GRPO have)."""
    rand = lambda k: torch.randint(0, 1000, (k,), generator=gen).tolist()  # noqa: E731
    ids = rand(n_text)
    for t, h, w in grids:
        ids += [V_START] + [IMAGE] * (t * h * w // 4) + [V_END] + rand(3)
    ids += rand(n_text)
    input_ids = torch.tensor(ids)
    target_mask = torch.zeros(len(ids), dtype=torch.bool)
    target_mask[len(ids) // 2 :] = True
    grid = torch.tensor(grids) if grids else None
    pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=gen) if grids else None
    return Sample(input_ids, target_mask, mrope_positions(CFG, input_ids, grid), pixels, grid)


def build_models() -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration]:
    """The stock model (transformers' own sdpa) and an identical copy on the packed backend."""
    torch.manual_seed(0)
    ref = Qwen2_5_VLForConditionalGeneration(CFG)
    assert ref.config.text_config.attention_dropout == 0.0  # train mode must be deterministic
    packed = copy.deepcopy(ref)
    apply_attention(packed, "sdpa_packed")
    return ref, packed


def unpacked_logprobs(model: Qwen2_5_VLForConditionalGeneration, s: Sample) -> torch.Tensor:
    """log p(token t | <t) for t = 1..T-1, from a plain ``model(...)`` call that computes its own
    mrope positions (from ``mm_token_type_ids``) and its own causal mask."""
    kw = {}
    if s.pixel_values is not None:
        kw = dict(
            pixel_values=s.pixel_values,
            image_grid_thw=s.image_grid_thw,
            mm_token_type_ids=(s.input_ids == IMAGE).int()[None],
        )
    logits = model(input_ids=s.input_ids[None], use_cache=False, **kw).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, s.input_ids[1:, None])[:, 0]


def packed_logprobs(model: Qwen2_5_VLForConditionalGeneration, batch: PackedBatch) -> torch.Tensor:
    hidden = forward_hidden(model, batch)  # [L, H]
    logits = hidden @ model.lm_head.weight.T
    return torch.log_softmax(logits.float(), -1).gather(-1, batch.targets[:, None])[:, 0]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


GRID_SETS = {
    "text": [[], [], []],
    "images": [[[1, 4, 6]], [[1, 8, 4], [1, 4, 4]], [[1, 6, 8], [1, 4, 4], [1, 8, 8]]],
    "mixed": [[[1, 8, 4]], [], [[1, 4, 6], [1, 6, 4]]],
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("grid_set", list(GRID_SETS))
def test_packed_equals_one_by_one(grid_set: str, train: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    samples = [make_sample(gen, g, n_text=5 + 4 * i) for i, g in enumerate(GRID_SETS[grid_set])]
    ref, model = build_models()
    ref.train(train)
    model.train(train)
    batch = pack(samples, CFG.vision_config)
    total = batch.num_loss_tokens

    ref_lp = []
    for s in samples:
        lp = unpacked_logprobs(ref, s)
        (-(lp * s.target_mask[1:]).sum() / total).backward()
        ref_lp.append(lp.detach())
    lp = packed_logprobs(model, batch)
    (-(lp * batch.loss_mask).sum() / total).backward()

    # Per-token log-probs of every predicted position of every sequence.
    for i, (got, want) in enumerate(zip(unpack(lp.detach(), batch), ref_lp)):
        torch.testing.assert_close(got[:-1], want, rtol=0, atol=2e-5, msg=f"sequence {i}")
    g_ref, g_packed = grads(ref), grads(model)
    # a text-only batch under grad gives the vision tower zero gradients (not None), as on 2 ranks: AdamW
    # then moves it the same whatever the world size
    untouched = {n for n, g in g_ref.items() if g is None}
    assert untouched == {n for n, g in g_packed.items() if g is None or (n.startswith("model.visual.")
                                                                          and not g.any())}
    assert all(g_packed[n] is not None for n in untouched if n.startswith("model.visual.")) or not train
    if grid_set != "text":
        assert g_packed["model.visual.blocks.0.attn.qkv.weight"] is not None
    for name, g in g_ref.items():
        if g is not None:
            torch.testing.assert_close(g_packed[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_vision_tower_runs_one_varlen_call_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packed backend must replace transformers' per-window Python loop in the ViT."""
    from rlcs_fast import attention

    calls: list[tuple[bool, int]] = []
    real = attention.varlen_attention

    def spy(q, k, v, cu_q, *args, causal, **kw):
        calls.append((causal, cu_q.numel() - 1))
        return real(q, k, v, cu_q, *args, causal=causal, **kw)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    gen = torch.Generator().manual_seed(2)
    samples = [make_sample(gen, [[1, 8, 8]]), make_sample(gen, [[1, 4, 6], [1, 8, 4]])]
    _, model = build_models()
    forward_hidden(model, pack(samples, CFG.vision_config))
    vision = [c for c in calls if not c[0]]
    text = [c for c in calls if c[0]]
    assert len(vision) == CFG.vision_config.depth  # one call per block, not one per window
    assert max(n for _, n in vision) > 3  # ...that covers many windows at once
    assert text == [(True, 2)] * CFG.text_config.num_hidden_layers


def test_unpacked_positions_silently_do_not_pack() -> None:
    """Regression guard: transformers reads packing only from a 4-row position tensor. With 2-D or
    3-row positions nothing fails, sequences just attend to each other; forward_hidden refuses them."""
    gen = torch.Generator().manual_seed(3)
    samples = [make_sample(gen, [], n_text=12), make_sample(gen, [], n_text=9)]
    ref, model = build_models()
    batch = pack(samples)
    want = torch.cat([ref.model(input_ids=s.input_ids[None]).last_hidden_state[0] for s in samples])
    good = ref.model(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=None, use_cache=False
    ).last_hidden_state[0]
    torch.testing.assert_close(good, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(forward_hidden(model, batch), want, rtol=0, atol=1e-5)
    first = batch.seq_lens[0]
    for bad_positions in (batch.position_ids[0], batch.position_ids[1:]):  # [1, L] and [3, 1, L]
        for m in (ref, model):
            bad = m.model(
                input_ids=batch.input_ids, position_ids=bad_positions, attention_mask=None, use_cache=False
            ).last_hidden_state[0]
            torch.testing.assert_close(bad[:first], want[:first], rtol=0, atol=1e-5)  # first sequence fine
            assert (bad[first:] - want[first:]).abs().max() > 1e-2  # second one saw the first
        with pytest.raises(AssertionError, match="4, 1"):
            forward_hidden(model, PackedBatch(**{**batch.__dict__, "position_ids": bad_positions}))


@pytest.mark.slow
def test_step_gradient_independent_of_token_budget() -> None:
    """Summing micro-batch gradients of a loss normalised by the step's loss-token count gives one
    step gradient, whatever the budget and rank split."""
    gen = torch.Generator().manual_seed(4)
    grid_choices = [[], [[1, 4, 4]], [[1, 4, 6]], [[1, 8, 4], [1, 4, 4]]]
    samples = [make_sample(gen, grid_choices[i % 4], n_text=3 + 5 * (i % 3)) for i in range(7)]
    lengths = [s.input_ids.numel() for s in samples]
    total = sum(int(s.target_mask[1:].sum()) for s in samples)
    results = []
    _, initial = build_models()
    for budget, world in [(10_000, 1), (max(lengths) + 5, 1), (max(lengths) // 2, 1), (max(lengths), 2)]:
        model = copy.deepcopy(initial)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the smallest budget is below the longest sample
            # the trainer's split: a strided share per rank, each planned on its own
            shares = [list(range(len(samples)))[r::world] for r in range(world)]
            plan = [[[share[j] for j in micro] for micro in plan_microbatches([lengths[i] for i in share],
                                                                              budget)]
                    for share in shares]
        for rank in plan:
            for micro in rank:
                batch = pack([samples[i] for i in micro], CFG.vision_config)
                lp = packed_logprobs(model, batch)
                (-(lp * batch.loss_mask).sum() / total).backward()
        results.append((len(plan[0]), grads(model)))
    assert results[2][0] > results[1][0] > results[0][0] == 1  # the budgets really split differently
    base = results[0][1]
    for _, g in results[1:]:
        for name, want in base.items():
            if want is not None:
                torch.testing.assert_close(g[name], want, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_plan_microbatches_properties(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    lengths = [rng.choice([rng.randint(1, 60), rng.randint(100, 600)]) for _ in range(n)]
    max_tokens = rng.randint(80, 700)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = plan_microbatches(lengths, max_tokens)
        assert plan == plan_microbatches(lengths, max_tokens)  # deterministic
    flat = [i for micro in plan for i in micro]
    assert sorted(flat) == list(range(n))  # every sample exactly once
    for micro in plan:
        tokens = sum(lengths[i] for i in micro)
        assert tokens <= max_tokens or len(micro) == 1  # budget, or one oversized sample alone


def test_plan_microbatches_warns_once_for_oversized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schedule, "_warned_oversized", False)
    with pytest.warns(UserWarning, match="exceeds max_tokens"):
        plan = plan_microbatches([50, 300, 20, 400], 100)
    assert [300] in [[sum([50, 300, 20, 400][i] for i in m)] for m in plan]
    assert [[3], [1], [0, 2]] == plan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_microbatches([500], 100)


def test_pack_unpack_round_trip() -> None:
    gen = torch.Generator().manual_seed(5)
    samples = [
        make_sample(gen, g, n_text=4 + i) for i, g in enumerate([[[1, 4, 4]], [], [[1, 8, 4], [1, 4, 6]]])
    ]
    batch = pack(samples, CFG.vision_config)
    assert batch.num_seqs == 3 and batch.num_tokens == sum(s.input_ids.numel() for s in samples)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.max_seqlen == max(batch.seq_lens)
    assert batch.position_ids.shape == (4, 1, batch.num_tokens)
    per_ids = unpack(batch.input_ids[0], batch)
    per_pos = unpack(batch.position_ids[:, 0].T, batch)
    per_seq = unpack(batch.seq_ids, batch)
    per_tgt, per_mask = unpack(batch.targets, batch), unpack(batch.loss_mask, batch)
    for i, s in enumerate(samples):
        torch.testing.assert_close(per_ids[i], s.input_ids)
        torch.testing.assert_close(per_pos[i][:, 1:].T, s.position_ids)
        torch.testing.assert_close(per_pos[i][:, 0], torch.arange(s.input_ids.numel()))
        assert (per_seq[i] == i).all()
        torch.testing.assert_close(per_tgt[i][:-1], s.input_ids[1:])  # next token within the sequence
        torch.testing.assert_close(per_mask[i][:-1], s.target_mask[1:])
        assert not per_mask[i][-1]  # the last position predicts another sequence's token
    assert batch.num_loss_tokens == int(batch.loss_mask.sum())
    torch.testing.assert_close(
        batch.pixel_values, torch.cat([s.pixel_values for s in samples if s.pixel_values is not None])
    )
    torch.testing.assert_close(batch.image_grid_thw, torch.tensor([[1, 4, 4], [1, 8, 4], [1, 4, 6]]))
    moved = batch.to("cpu")
    assert moved.seq_lens == batch.seq_lens and moved.vision_kwargs.keys() == batch.vision_kwargs.keys()


def test_vision_kwargs_fallback_matches_precomputed() -> None:
    """pack() without the vision config still gives the same result (computed in the forward)."""
    gen = torch.Generator().manual_seed(6)
    samples = [make_sample(gen, [[1, 8, 8]]), make_sample(gen, [[1, 4, 6]])]
    _, model = build_models()
    with_cfg, without = pack(samples, CFG.vision_config), pack(samples)
    assert with_cfg.vision_kwargs and not without.vision_kwargs
    torch.testing.assert_close(
        forward_hidden(model, without), forward_hidden(model, with_cfg), rtol=0, atol=0
    )


@pytest.mark.parametrize("grids", [[], [[1, 4, 6]], [[1, 8, 4], [1, 4, 4], [1, 6, 10]], [[2, 4, 4]]])
def test_mrope_positions_match_get_rope_index(grids: list[list[int]]) -> None:
    gen = torch.Generator().manual_seed(7)
    s = make_sample(gen, grids, n_text=3)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(CFG)
    if grids:
        want, _ = model.model.get_rope_index(
            s.input_ids[None],
            mm_token_type_ids=(s.input_ids == IMAGE).int()[None],
            image_grid_thw=torch.tensor(grids),
        )
        want = want[:, 0]
    else:
        want = torch.arange(s.input_ids.numel()).expand(3, -1)
    torch.testing.assert_close(s.position_ids, want)
    with pytest.raises(ValueError, match="image_pad"):
        mrope_positions(CFG, s.input_ids, torch.tensor([[1, 4, 2]]) if grids else torch.tensor([[1, 2, 2]]))


@pytest.mark.parametrize("grids", [[], [[1, 4, 6], [1, 8, 4]]])
def test_extend_positions_equals_generation(grids: list[list[int]]) -> None:
    """Response positions as ``model.generate`` feeds them to the language model step by step."""
    gen = torch.Generator().manual_seed(8)
    s = make_sample(gen, grids)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(CFG).eval()
    seen: list[torch.Tensor] = []
    model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["position_ids"][1:, 0].clone()), with_kwargs=True
    )
    kw = {}
    if grids:
        kw = dict(
            pixel_values=s.pixel_values,
            image_grid_thw=s.image_grid_thw,
            mm_token_type_ids=(s.input_ids == IMAGE).int()[None],
        )
    n_new = 6
    model.generate(
        input_ids=s.input_ids[None],
        attention_mask=torch.ones_like(s.input_ids)[None],
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        **kw,
    )
    fed = torch.cat(seen, dim=1)  # prompt, then one position per decoded token (the last is not fed)
    torch.testing.assert_close(fed, extend_positions(s.position_ids, n_new - 1))
    torch.testing.assert_close(fed, extend_positions(s.position_ids, n_new)[:, :-1])


def test_touch_vision_gives_zero_vision_grads_and_same_hidden() -> None:
    """Text-only micro-batches under FSDP must still run the vision tower (same collectives on every
    rank) without changing the result."""
    gen = torch.Generator().manual_seed(9)
    batch = pack([make_sample(gen, []), make_sample(gen, [], n_text=9)], CFG.vision_config)
    _, model = build_models()
    plain = forward_hidden(model, batch, touch_vision=False)
    touched = forward_hidden(model, batch, touch_vision=True)
    torch.testing.assert_close(touched, plain, rtol=0, atol=0)
    touched.pow(2).sum().backward()
    vision = [p.grad for n, p in model.named_parameters() if n.startswith("model.visual.")]
    assert vision and all(g is not None and not g.any() for g in vision)
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad.any()
