"""Padding-free packed batches for the Qwen VL families: positions, packing, micro-batches, the forward.

Several sequences are concatenated into one row of L tokens with no padding. What keeps them apart:
- ``position_ids`` of shape [4, 1, L]: row 0 holds text positions that restart at 0 per sequence (the
  model reads packing from this row), rows 1-3 the sequence's own 3-D mrope positions. With 2-D or
  3-row positions transformers silently attends across sequences, so ``forward_hidden`` refuses them.
- ``cu_seqlens`` and ``max_seqlen`` computed here on the host and handed to every attention layer
  (``rlcs_fast.attention``), so no layer reads boundaries back from the device.
- The vision tower's window and segment metadata, also computed here from ``image_grid_thw`` when
  ``pack`` gets the vision config, so the ViT does no host syncs either.

mrope positions are computed per sample before packing (``mrope_positions``): transformers'
``get_rope_index`` gives wrong positions for packed attention masks (LlamaFactory#7754).
What depends on the model family (positions, vision inputs, the dummy image) is asked of
``rlcs_fast.families.family_for(config)``; the functions here keep their names and delegate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor, nn

from .families import family_for


@dataclass
class Sample:
    """One tokenized sequence (made by data.py for SFT, by the rollout for GRPO)."""

    input_ids: Tensor  # [T] int64
    target_mask: Tensor  # [T] bool: token t is a training target (predicted from position t-1)
    position_ids: Tensor  # [3, T] int64: this sequence's own Qwen2.5-VL mrope positions
    pixel_values: Tensor | None = None  # [P, 1176] patches of its images, in order
    image_grid_thw: Tensor | None = None  # [I, 3]


@dataclass
class PackedBatch:
    """S sequences packed into one row of L tokens."""

    input_ids: Tensor  # [1, L]
    position_ids: Tensor  # [4, 1, L]: row 0 text positions restarting at 0 per sequence; rows 1-3 mrope
    cu_seqlens: Tensor  # [S+1] int32
    max_seqlen: int
    pixel_values: Tensor | None  # [ΣP, 1176]: each distinct image once, in order of first use
    image_grid_thw: Tensor | None  # [ΣI, 3] of those; kept on the host by `to` (only read there, see `to`)
    targets: Tensor  # [L] int64: next token (input_ids rolled by -1)
    loss_mask: Tensor  # [L] bool: hidden position i predicts a target token of its own sequence
    seq_ids: Tensor  # [L] int64: sequence index 0..S-1 of each token
    seq_lens: list[int] = field(default_factory=list)  # host copy of the S lengths (unpack, no sync)
    num_loss_tokens: int = 0  # host count of loss_mask (loss normalisation without a sync)
    # Precomputed inputs of the vision tower (`image_cu_seqlens`, `image_window_index`, ...), passed to
    # the model as kwargs; empty when pack() had no vision config (the tower then computes them).
    vision_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_index: Tensor | None = None  # [N] int64 positions of loss_mask, made on the host (no nonzero sync)
    # [M] int64: for each <|image_pad|> token in sequence order, its row of the tower's merged output;
    # None when every sequence has images of its own (the rows are then in order)
    image_embed_index: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy on ``device``. ``image_grid_thw`` stays on the host: the model only reads it there
        (``.tolist()`` to split image features), and a device copy would cost a sync per forward."""

        def move(x: Any) -> Any:
            return x.to(device, non_blocking=non_blocking) if isinstance(x, Tensor) else x

        moved = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "image_grid_thw"}
        moved["vision_kwargs"] = {k: move(v) for k, v in self.vision_kwargs.items()}
        return replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        """A copy in page-locked host memory, so that ``to(cuda, non_blocking=True)`` is a true
        asynchronous copy (from pageable memory the driver stages it and the host waits). A no-op
        without CUDA."""
        if not torch.cuda.is_available():
            return self

        def pin(x: Any) -> Any:
            return x.pin_memory() if isinstance(x, Tensor) else x

        pinned = {f.name: pin(getattr(self, f.name)) for f in fields(self) if f.name != "image_grid_thw"}
        pinned["vision_kwargs"] = {k: pin(v) for k, v in self.vision_kwargs.items()}
        return replace(self, **pinned)


def patch_dim(vision_config: Any) -> int:
    """Values per vision patch (one row of ``pixel_values``): channels x temporal patch x patch side²."""
    return vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2


def smallest_image(vision_config: Any) -> tuple[Tensor, Tensor]:
    """(zero pixels [merge², patch_dim], grid [[1, merge, merge]]): the smallest image, one merged token."""
    return family_for(vision_config).smallest_image(vision_config)


def mrope_positions(model_config: Any, input_ids: Tensor, image_grid_thw: Tensor | None) -> Tensor:
    """3-D rope positions of one sequence → [3, T] int64, as the family's ``get_rope_index`` computes them
    (``ModelFamily.mrope_positions``). Images only."""
    return family_for(model_config).mrope_positions(model_config, input_ids, image_grid_thw)


def extend_positions(positions: Tensor, n_new: int) -> Tensor:
    """Append the positions of ``n_new`` generated tokens to a prompt's [3, T] mrope positions →
    [3, T + n_new]. As in generation (``rope_deltas``), token k of the response sits at
    max(prompt positions) + 1 + k on all three rows; a Qwen chat prompt ends in text, so this is the
    prompt's last position + 1."""
    start = positions.max() + 1 if positions.numel() else positions.new_tensor(0)
    new = (start + torch.arange(n_new, device=positions.device, dtype=positions.dtype)).expand(3, n_new)
    return torch.cat([positions, new], dim=1)


def vision_kwargs(vision_config: Any, image_grid_thw: Tensor) -> dict[str, Any]:
    """The ViT's data-dependent inputs for ``image_grid_thw``, computed on the host and named as
    ``get_image_features`` accepts them precomputed (``image_*``); the family says which."""
    return family_for(vision_config).vision_kwargs(vision_config, image_grid_thw)


def pack(samples: list[Sample], vision_config: Any | None = None) -> PackedBatch:
    """Concatenate ``samples`` into one padding-free row. Pass the model's ``config.vision_config``
    to precompute the vision tower's metadata here (no host syncs in the forward).

    Samples that share an image (the same ``pixel_values`` tensor object: a prompt's ``grpo.n``
    responses) carry its pixels once, given the vision config: the tower then runs once on it and its
    output is scattered to every sequence that uses it (``image_embed_index``), and autograd sums the
    gradients. Without the vision config each sample keeps its own copy."""
    if not samples:
        raise ValueError("pack() needs at least one sample")
    for i, s in enumerate(samples):
        t = s.input_ids.numel()
        assert s.input_ids.ndim == 1 and t > 0, (
            f"sample {i}: input_ids must be [T>0], got {tuple(s.input_ids.shape)}"
        )
        assert s.target_mask.shape == (t,), f"sample {i}: target_mask {tuple(s.target_mask.shape)} != ({t},)"
        assert s.position_ids.shape == (3, t), (
            f"sample {i}: position_ids {tuple(s.position_ids.shape)} != (3, {t})"
        )
        assert (s.pixel_values is None) == (s.image_grid_thw is None), (
            f"sample {i}: pixels without grid or back"
        )
        if s.pixel_values is not None:
            patches = int(s.image_grid_thw.prod(-1).sum())
            assert s.pixel_values.shape[0] == patches, (
                f"sample {i}: {s.pixel_values.shape[0]} patch rows, image_grid_thw needs {patches}"
            )

    seq_lens = [s.input_ids.numel() for s in samples]
    lengths = torch.tensor(seq_lens)
    n = int(lengths.sum())
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths, 0)
    seq_ids = torch.repeat_interleave(torch.arange(len(samples)), lengths)  # [L]
    text_positions = torch.arange(n) - cu_seqlens[:-1].long()[seq_ids]  # restart at 0 per sequence

    input_ids = torch.cat([s.input_ids.long() for s in samples])  # [L]
    mrope = torch.cat([s.position_ids.long() for s in samples], dim=1)  # [3, L]
    target_mask = torch.cat([s.target_mask.bool() for s in samples])  # [L]
    is_last = torch.zeros(n, dtype=torch.bool)
    is_last[cu_seqlens[1:].long() - 1] = True
    # Hidden state i predicts token i+1; the last token of a sequence would predict the next
    # sequence's first token, which is not a target of its own sequence.
    loss_mask = torch.roll(target_mask, -1) & ~is_last

    with_images = [s for s in samples if s.pixel_values is not None]
    images, image_embed_index = _distinct_images(with_images, vision_config)
    pixel_values = torch.cat([s.pixel_values for s in images]) if images else None
    image_grid_thw = torch.cat([s.image_grid_thw.long().reshape(-1, 3) for s in images]) if images else None
    vkw = (
        vision_kwargs(vision_config, image_grid_thw) if (image_grid_thw is not None and vision_config) else {}
    )
    return PackedBatch(
        input_ids=input_ids[None],
        position_ids=torch.cat([text_positions[None], mrope])[:, None],
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seq_lens),
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        targets=torch.roll(input_ids, -1),
        loss_mask=loss_mask,
        seq_ids=seq_ids,
        seq_lens=seq_lens,
        num_loss_tokens=int(loss_mask.sum()),
        vision_kwargs=vkw,
        loss_index=loss_mask.nonzero().squeeze(-1),
        image_embed_index=image_embed_index,
    )


def _distinct_images(with_images: list[Sample],
                     vision_config: Any | None) -> tuple[list[Sample], Tensor | None]:
    """(one sample per distinct image set, in order of first use; the merged-token row of each image
    token in sequence order, or None when no set repeats)."""
    if vision_config is None:
        return with_images, None
    slot: dict[int, int] = {}  # id(pixel tensor) → index in `distinct`
    distinct: list[Sample] = []
    uses = []
    for s in with_images:
        key = id(s.pixel_values)
        if key not in slot:
            slot[key] = len(distinct)
            distinct.append(s)
        uses.append(slot[key])
    if len(distinct) == len(with_images):
        return with_images, None
    merge2 = vision_config.spatial_merge_size ** 2
    tokens = [int(s.image_grid_thw.long().prod(-1).sum()) // merge2 for s in distinct]
    starts = [0]
    for t in tokens[:-1]:
        starts.append(starts[-1] + t)
    return distinct, torch.cat([torch.arange(starts[d], starts[d] + tokens[d]) for d in uses])


def unpack(values: Tensor, batch: PackedBatch) -> list[Tensor]:
    """Split per-token ``values`` [L, ...] of a packed batch back into one tensor per sequence."""
    assert values.shape[0] == batch.num_tokens, f"values {tuple(values.shape)} vs {batch.num_tokens} tokens"
    return list(torch.split(values, batch.seq_lens))


def forward_hidden(model: nn.Module, batch: PackedBatch, *, touch_vision: bool | None = None) -> Tensor:
    """Final hidden states (after the last norm) of a Qwen VL ``…ForConditionalGeneration`` on a
    packed batch → [L, H]. (Qwen3-VL's DeepStack features are added inside its text model at the
    image-token positions of the packed row, which hold the images in the order ``pack`` concatenated
    them.) No logits: the fused log-prob kernels take these and ``lm_head.weight``.

    Runs ``model.model`` (FSDP2's ``fully_shard`` keeps that attribute; shard ``model.model`` as its
    own unit, or its parameters stay sharded when it is called directly) with ``attention_mask=None``,
    ``use_cache=False`` and the host-computed ``cu_seq_lens_q/k``/``max_length_q/k``.

    ``touch_vision``: on a batch without images, run a dummy 1-image pass through the vision tower first
    (where a batch with images runs it) and add 0 × its output to the hidden states, so the tower's
    parameters get (zero) gradients. Under FSDP every rank must join
    the tower's gather and gradient reduce-scatter, or a rank whose micro-batch had images waits forever
    for one whose had none (EasyR1 does the same). Default: on when torch.distributed runs >1 rank, and
    in one process whenever gradients are recorded: a step of text-only rows then leaves the tower zero
    gradients, not None, so AdamW moves it (decay, momentum) as it does on 2 ranks: training does not
    depend on the world size."""
    n = batch.num_tokens
    assert batch.position_ids.shape == (4, 1, n), (
        f"packed position_ids must be [4, 1, {n}] (text row + 3 mrope rows), got "
        f"{tuple(batch.position_ids.shape)}: "
        "with 2-D or 3-row positions transformers silently attends across packed sequences"
    )
    assert batch.input_ids.shape == (1, n), f"input_ids must be [1, L], got {tuple(batch.input_ids.shape)}"
    _check_fsdp_root(model)
    inner = model.model
    if touch_vision is None:
        touch_vision = torch.is_grad_enabled() or (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and (torch.distributed.get_world_size() > 1)
        )
    dummy_vision = None
    if touch_vision and batch.pixel_values is None:
        # before the language layers, where a batch with images runs its vision tower: every rank must
        # all-gather the same FSDP units in the same order (and reduce-scatter them in the same order in
        # backward, which runs the nodes made later first)
        dummy_vision = _dummy_vision_output(inner.visual, batch.input_ids.device)
    kwargs: dict[str, Any] = {
        "cu_seq_lens_q": batch.cu_seqlens,
        "cu_seq_lens_k": batch.cu_seqlens,
        "max_length_q": batch.max_seqlen,
        "max_length_k": batch.max_seqlen,
    }
    if batch.pixel_values is not None:
        embeds, visual = _embed_with_images(inner, batch)
        kwargs.update(visual)
    else:
        embeds = inner.get_input_embeddings()(batch.input_ids)  # [1, L, H]
    # the language model itself: what the VL model's forward adds around it (image features, positions)
    # is done here, without its host-syncing placeholder check, and with each image's features once
    out = inner.language_model(
        input_ids=None,
        inputs_embeds=embeds,
        position_ids=batch.position_ids,
        attention_mask=_no_mask(inner),
        use_cache=False,
        **kwargs,
    )
    hidden = out.last_hidden_state[0]
    if dummy_vision is not None:
        hidden = hidden + 0.0 * dummy_vision
    return hidden


def _no_mask(inner: nn.Module) -> dict[str, None] | None:
    """No attention mask. With the packed backend, as the precomputed per-layer-type mapping: the
    backend takes ``cu_seq_lens`` and never reads a mask, and transformers' mask builder would read the
    positions back from the device to look for packing (a host sync per forward)."""
    from .attention import ATTENTION_NAME

    if inner.language_model.config._attn_implementation != ATTENTION_NAME:
        return None  # sdpa/eager: transformers builds the block-diagonal mask from the positions
    if not family_for(inner.config).text_mask_mapping:
        return None  # its text model builds the mask itself, whatever it is given
    return {"full_attention": None, "sliding_attention": None}


def _embed_with_images(inner: nn.Module, batch: PackedBatch) -> tuple[Tensor, dict[str, Any]]:
    """Token embeddings [1, L, H] with the vision tower's output at the image tokens, and the language
    model's visual inputs (Qwen3-VL's DeepStack features at the same tokens; none for Qwen2.5-VL): the
    tower runs once per distinct image of the batch, and ``image_embed_index`` copies an image's rows to
    every sequence that uses it (the same masked scatter as transformers' own forward; backward:
    index_add)."""
    vkw = batch.vision_kwargs
    if not vkw:  # pack() had no vision config: compute on the host, move once
        vkw = {
            k: v.to(batch.pixel_values.device) if isinstance(v, Tensor) else v
            for k, v in vision_kwargs(inner.config.vision_config, batch.image_grid_thw).items()
        }
    features = inner.get_image_features(batch.pixel_values, batch.image_grid_thw, return_dict=True, **vkw)

    def per_token(parts) -> Tensor:  # [image tokens of the packed row, H]
        rows = torch.cat(list(parts))  # [distinct image tokens, H]
        return rows if batch.image_embed_index is None else rows.index_select(0, batch.image_embed_index)

    embeds = inner.get_input_embeddings()(batch.input_ids)  # [1, L, H]
    image_mask = batch.input_ids == inner.config.image_token_id  # [1, L]
    embeds = embeds.masked_scatter(image_mask[..., None], per_token(features.pooler_output).to(embeds.dtype))
    deepstack = getattr(features, "deepstack_features", None)
    if not deepstack:
        return embeds, {}
    return embeds, {"visual_pos_masks": image_mask,
                    "deepstack_visual_embeds": [per_token(level) for level in deepstack]}


def _dummy_vision_output(visual: nn.Module, device: torch.device) -> Tensor:
    """Sum of the vision tower's outputs on one smallest image of zeros (a scalar)."""
    return family_for(visual.config).dummy_vision_output(visual, device)


def _check_fsdp_root(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return
    if isinstance(model, FSDPModule) and not isinstance(model.model, FSDPModule):
        raise RuntimeError(
            "forward_hidden calls model.model directly, which skips the FSDP2 root's hooks: apply "
            "fully_shard to model.model (after its layers, before the root) so its parameters are gathered"
        )
