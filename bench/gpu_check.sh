#!/usr/bin/env bash
# The one command a lent GPU runs: python -m bench.gpu_check (see its docstring for the steps), after
# installing the wheels the bare device image lacks. Results: gpu_check.json + gpu_check.md (+ each
# step's JSON and log) in $OUT on the device machine, else bench/results/gpu_check/.
#
# The device (one H200, bare image: torch 2.11, triton 3.6, transformers 5.17, pytest, pytest-benchmark;
# no vLLM, flash-attn, liger-kernel, datasets; no network) allows 15 minutes of device time in all,
# 10 minutes per command and 64 MiB per transfer (working tree and carried wheels together). This script
# stays under 8 minutes: tests 60 s, kernels 7B 130 s, kernels 3B 60 s, kernels Qwen3-VL-8B 60 s, 3B train
# step 80 s, 3B GRPO step 90 s, each killed at its budget with what it measured kept.
#
# Wheels (kept out of git in .whl/, which .gitignore lists; 19 MB): transformers 5.19 is the first release
# whose vision tower packs (5.17 crashes on the varlen kwargs), with the versions of the hub (1.x: 2.x needs
# httpx2, absent there), tokenizers, safetensors and regex it requires, and Liger-Kernel for its fused linear
# GRPO loss baseline. Download them once, on a machine with PyPI:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl "transformers>=5.19,<5.20" "huggingface-hub>=1.31,<2" "tokenizers>=0.23.1,<0.24" \
#     "safetensors>=0.8" "regex>=2025.10.22" liger-kernel
# then run this with .whl carried: bash bench/gpu_check.sh  (CPU smoke test: bash bench/gpu_check.sh --smoke)
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    site="$(mktemp -d)"  # the carried wheels, ahead of the image's own packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif [[ " $* " != *" --smoke "* ]]; then
    echo "gpu_check: no wheels in .whl/: transformers stays at the image's (see this file's header)" >&2
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec python3 -m bench.gpu_check "$@"
