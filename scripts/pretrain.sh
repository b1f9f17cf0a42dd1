#!/usr/bin/env bash
# Set up (or reuse) the virtualenv and pretrain the example Llama on this machine:
#   torchrun --standalone --nproc_per_node=$NPROC examples/pretrain_llama.py "$@"
# NPROC defaults to the number of GPUs, or 2 CPU processes (gloo) without CUDA.
# Arguments go to examples/pretrain_llama.py (see its --help).
# Environment: LPDIST_VENV (virtualenv, default .venv), NPROC.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$LPDIST_ROOT"
lpdist_setup_env ""

gpus="$("$LPDIST_PY" -c 'import torch; print(torch.cuda.device_count())')"
NPROC="${NPROC:-$((gpus > 0 ? gpus : 2))}"
echo "[pretrain] $NPROC process(es), $gpus GPU(s)"
exec "$LPDIST_PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    examples/pretrain_llama.py "$@"
