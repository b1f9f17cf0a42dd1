#!/usr/bin/env bash
# Run scripts/loss_parity.py on this machine's GPUs (one recipe per GPU) with the run folders on
# local disk, copying each run's metrics.jsonl and launch.log to $OUT/parity every 15 s (so a
# run cut off by a time limit still leaves its curve) and the table and plot at the end.
#   OUT=/tmp/out bash scripts/parity_chunk.sh TIME_LIMIT_S LOSS_PARITY_ARGS...   (PYTHON: interpreter, default python3)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit="$1"; shift
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
runs=/tmp/lpdist-parity
mkdir -p "$OUT/parity" "$runs"
copy_back() {
    local dir
    for dir in "$runs"/*/; do
        [[ -d "$dir" ]] || continue
        mkdir -p "$OUT/parity/$(basename "$dir")"
        cp "$dir"/metrics.jsonl "$dir"/launch.log "$OUT/parity/$(basename "$dir")/" 2>/dev/null
    done
    cp "$runs"/loss_parity.json "$runs"/loss_parity.png "$runs"/loss_parity_gap.png "$OUT/parity/" 2>/dev/null
}
( while sleep 15; do copy_back; done ) &
copier=$!
timeout -k 10 "$limit" "${PYTHON:-python3}" scripts/loss_parity.py --out "$runs" --parallel-gpus "$(nvidia-smi -L | wc -l)" "$@"
echo "loss_parity exit status $?"
kill "$copier"
copy_back
