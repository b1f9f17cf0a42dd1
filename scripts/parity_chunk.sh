#!/usr/bin/env bash
# Run scripts/loss_parity.py on this machine's GPUs (one recipe per GPU) with the run folders on
# local disk, copying each run's metrics.jsonl and launch.log to $OUT/parity every 15 s (so a
# run cut off by a time limit still leaves its curve) and the table and plot at the end.
#   OUT=/tmp/out bash scripts/parity_chunk.sh TIME_LIMIT_S LOSS_PARITY_ARGS...   (PYTHON: interpreter, default python3)
# The GPUs are those CUDA_VISIBLE_DEVICES lists when it is set, else every GPU nvidia-smi lists.
# The run folders live in PARITY_RUNS (default /tmp/lpdist-parity) and are resumed by the next
# call; the table and plots of an earlier call are removed first. Exit status: loss_parity.py's
# (1 when a recipe failed, 124 when the time limit cut it off).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit="$1"; shift
export NCCL_NVLS_ENABLE=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
runs="${PARITY_RUNS:-/tmp/lpdist-parity}"
outputs=(loss_parity.json loss_parity.png loss_parity_gap.png)
mkdir -p "$OUT/parity" "$runs"
for name in "${outputs[@]}"; do
    rm -f "$runs/$name" "$OUT/parity/$name"
done
copy_back() {
    local dir name
    for dir in "$runs"/*/; do
        [[ -d "$dir" ]] || continue
        mkdir -p "$OUT/parity/$(basename "$dir")"
        cp "$dir"/metrics.jsonl "$dir"/launch.log "$OUT/parity/$(basename "$dir")/" 2>/dev/null
    done
    for name in "${outputs[@]}"; do
        [[ -f "$runs/$name" ]] && cp "$runs/$name" "$OUT/parity/"
    done
}
if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
else
    gpus="$(nvidia-smi -L 2>/dev/null | wc -l)"
fi
# The copier's output goes nowhere: its sleep must not hold the caller's pipe open after the end.
( while sleep 15; do copy_back; done ) >/dev/null 2>&1 &
copier=$!
timeout -k 10 "$limit" "${PYTHON:-python3}" scripts/loss_parity.py --out "$runs" --parallel-gpus "$gpus" "$@"
status=$?
echo "loss_parity exit status $status"
kill "$copier"
copy_back
exit "$status"
