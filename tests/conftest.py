"""Test setup shared by every test file.

Triton kernels run under the interpreter on machines without a GPU: ``TRITON_INTERPRET`` must be set
before any module that defines ``@triton.jit`` kernels is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every collective of rlcs_fast.dist (here and in the torchrun workers, which inherit it) is checked
# against the process group a CUDA run has: gloo alone would accept tensors that NCCL cannot reduce
os.environ.setdefault("RLCS_DIST_CHECK", "cuda")
