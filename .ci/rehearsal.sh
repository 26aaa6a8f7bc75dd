#!/usr/bin/env bash
# CI job: the shipped launch, rehearsed (.ci/rehearsal.py): every configs/*.toml except tiny*, model by hub
# id from an offline Hugging Face cache, the config's engine (real vLLM on the CPU), torchrun with 2
# processes, SFT then GRPO from the SFT export, then `eval --suite paper` over the base model and the
# exports. Runs in the vLLM CPU venv (built, with the trainer's dependencies, by .ci/vllm_cpu.sh).
# Usage: .ci/rehearsal.sh [--work DIR] [--only CONFIG ...]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
RLCS_VLLM_SETUP_ONLY=1 bash .ci/vllm_cpu.sh
.venv-vllm-cpu/bin/python .ci/rehearsal.py "$@"
echo "rehearsal job took $(( $(date +%s) - start )) s"
