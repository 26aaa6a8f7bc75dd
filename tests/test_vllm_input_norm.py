"""vLLM (>= 0.32) can normalise Qwen2.5-VL's raw pixels on the device through persistent `weight`/`bias`
buffers that a dummy load randomises and a weight push never restores. The engine turns that off and,
after every load, writes the processor's constants into any such module: here, without vLLM, the
constants reproduce the processor's own normalisation, and the restore reaches nested modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rlcs_fast.model import load_processor
from rlcs_fast.rollout.vllm_engine import pixel_norm_constants, restore_input_norm
from rlcs_fast.tiny import tiny_path


def test_constants_reproduce_the_processor_normalisation():
    path = str(tiny_path(seed=0))
    weight, bias = pixel_norm_constants(path)
    ip = load_processor(path, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).image_processor
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))
    normalised = ip(images=[img], return_tensors="pt")["pixel_values"]
    raw = ip(images=[img], do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
    patches = raw.shape[0]
    w, b = torch.tensor(weight)[None, :, None], torch.tensor(bias)[None, :, None]
    fused = raw.reshape(patches, 3, -1) * w + b
    torch.testing.assert_close(fused.reshape(patches, -1), normalised, atol=1e-5, rtol=0)


class FusedMMInputNorm(torch.nn.Module):  # vLLM's class name: the restore matches modules by it
    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.randn(3))  # what the dummy loader leaves
        self.register_buffer("bias", torch.randn(3))


def test_restore_writes_the_constants_into_every_device_norm():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(FusedMMInputNorm()))
    constants = ([1.0, 2.0, 3.0], [-0.5, 0.0, 0.5])
    assert restore_input_norm(model, constants) == 1
    norm = model[1][0]
    assert norm.weight.tolist() == constants[0] and norm.bias.tolist() == constants[1]
    assert restore_input_norm(torch.nn.Linear(2, 2), None) == 0  # text models: nothing to do
    with pytest.raises(RuntimeError, match="image_mean"):
        restore_input_norm(model, None)
