#!/usr/bin/env bash
# Set up (or reuse) the virtualenv and pretrain the example Llama on this machine:
#   torchrun --standalone --nproc_per_node=$NPROC examples/pretrain_llama.py "$@"
# NPROC defaults to the number of GPUs, or 2 CPU processes (gloo) without CUDA.
# Arguments go to examples/pretrain_llama.py (see its --help). Until that example exists the
# script shows how far each lpdist.quant format moves random data instead.
# Environment: LPDIST_VENV (virtualenv, default .venv), NPROC.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$LPDIST_ROOT"
lpdist_setup_env ""

if [[ -f examples/pretrain_llama.py ]]; then
    gpus="$("$LPDIST_PY" -c 'import torch; print(torch.cuda.device_count())')"
    NPROC="${NPROC:-$((gpus > 0 ? gpus : 2))}"
    echo "[pretrain] $NPROC process(es), $gpus GPU(s)"
    exec "$LPDIST_PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
        examples/pretrain_llama.py "$@"
fi

echo "[pretrain] examples/pretrain_llama.py is not here yet; quantization error of lpdist.quant formats:"
exec "$LPDIST_PY" - <<'PY'
import torch
from lpdist import quant

x = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
print(f"{'format':8} {'relative RMS error':>20} {'bits/element':>13}")
for fmt in ("e4m3", "e5m2", "mxfp8", "mxfp4", "nvfp4"):
    q = quant.quantize(x, fmt)
    error = (q.dequantize(torch.float32) - x).norm() / x.norm()
    print(f"{fmt:8} {error.item():20.4f} {8 * q.nbytes / x.numel():13.2f}")
PY
