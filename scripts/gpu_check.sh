#!/usr/bin/env bash
# Run lpdist's GPU checks on a GPU machine (offline image with torch, CuPy, mpi4py and pytest).
#
#   bash scripts/gpu_check.sh                 # all default phases, every scripts/bench_*.py
#   bash scripts/gpu_check.sh quant optim     # benchmarks limited to bench_quant.py, bench_optim.py
#   GPU_CHECK_PHASES="tests" bash scripts/gpu_check.sh
#
# Phases (GPU_CHECK_PHASES, default "tests multi bench"; set-up always runs):
#   tests  python3 -m pytest -q -m gpu tests                      -> $OUT/gpu_tests.log
#          (MPI tests in tests/distributed are CPU-only; GPU_CHECK_PYTEST_ARGS replaces the
#           default "tests --ignore=tests/distributed": files, --deselect, -x ...)
#   multi  every tests/gpu_multi/*.py under torchrun on all GPUs  -> $OUT/multi_<name>.log
#          (needs >= 2 GPUs; see tests/gpu_multi/README.md for the convention)
#   mpi    the same scripts under mpirun -n <GPUs>, through lpdist.dist's MPI path
#                                                                 -> $OUT/mpi_<name>.log
#   bench  scripts/bench_<name>.py for the names given as arguments, else GPU_CHECK_BENCH
#          ("quant optim"), else all of them; each writes $OUT/bench_<name>.json itself
#                                                                 -> $OUT/bench_<name>.log
#   parity (not default) the loss-parity study on all GPUs: a corpus of this Python's
#          site-packages sources (scripts/build_corpus.py, 250 MB, md5 in corpus.log), then scripts/parity_chunk.sh
#          with GPU_CHECK_PARITY_ARGS (default: 125m, 100M tokens, batch 32x1024, compiled, the
#          recipes in GPU_CHECK_PARITY_RECIPES, default all six)  -> $OUT/parity.log, $OUT/parity/;
#          GPU_CHECK_CORPUS_FILE (optional): a corpus file brought along instead (plain, or .xz /
#          .gz compressed), so that runs on machines with other packages train on the same text;
#          GPU_CHECK_CORPUS_MD5 (optional) skips training when the corpus differs from that md5
# GPU_CHECK_ARCHIVE=1 packs everything under $OUT into $OUT/gpu_check.tar.gz at the end (one file
# to copy off the machine) and removes the originals.
# Time limits in seconds: GPU_CHECK_TEST_TIMEOUT (900; the whole GPU suite took 555 s on one H200), GPU_CHECK_MULTI_TIMEOUT (180 per script),
# GPU_CHECK_BENCH_TIMEOUT (240 per script), GPU_CHECK_PARITY_TIMEOUT (540). A failing step is recorded and the next one runs.
# Ends with a table (phase, status, seconds), also in $OUT/summary.txt; exit status 1 if any failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
export OUT
PY="${PYTHON:-python3}"
PHASES=" ${GPU_CHECK_PHASES:-tests multi bench} "
BENCH_NAMES="${*:-${GPU_CHECK_BENCH:-}}"

# NVLink SHARP / multicast objects are not available on the GPU machines used here.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The source tree comes first on every process's path (torchrun and mpirun ranks included),
# whether or not the editable install below succeeds on the offline image.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ROWS=()
FAILED=0
# record NAME STATUS SECONDS
record() {
    ROWS+=("$(printf '%-36s %-8s %6s' "$1" "$2" "$3")")
    [[ "$2" == ok || "$2" == skipped || "$2" == no-tests ]] || FAILED=1
}

# step NAME LOG TIMEOUT CMD...: run with a time limit, log stdout+stderr, record the outcome; returns CMD's status.
step() {
    local name="$1" log="$2" limit="$3" start=$SECONDS rc=0 status=ok
    shift 3
    echo "=== $name ($*)"
    timeout -k 20 "$limit" "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
    case "$rc" in
        0) ;;
        5) [[ "$name" == pytest* ]] && status=no-tests || status="rc=5" ;;
        124 | 137) status=timeout ;;
        *) status="rc=$rc" ;;
    esac
    record "$name" "$status" $((SECONDS - start))
    return "$rc"
}

setup() {
    local wheel
    if [[ -d wheels ]]; then
        for wheel in wheels/*.whl; do
            [[ -f "$wheel" ]] || continue
            "$PY" -m pip install -q --no-index --no-deps "$wheel" || echo "!!! could not install $wheel"
        done
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . ||
        echo "!!! editable install failed; running from the source tree (PYTHONPATH)"
    nvidia-smi -L || true
    "$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}  CUDA {torch.version.cuda}  GPUs {torch.cuda.device_count()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name(0)}  capability {torch.cuda.get_device_capability(0)}")
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
try:
    import cupy
    print(f"CuPy {cupy.__version__}  CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}")
except ImportError as error:
    print(f"CuPy not importable: {error}")
import lpdist, lpdist.kernels
print(f"lpdist {lpdist.__version__} from {lpdist.__file__}  kernels backend {lpdist.kernels.backend()}")
EOF
}

start=$SECONDS
setup 2>&1 | tee "$OUT/setup.log"
record setup "$([[ ${PIPESTATUS[0]} == 0 ]] && echo ok || echo failed)" $((SECONDS - start))
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"

if [[ "$PHASES" == *" tests "* ]]; then
    step "pytest -m gpu" "$OUT/gpu_tests.log" "${GPU_CHECK_TEST_TIMEOUT:-900}" \
        "$PY" -m pytest -q -m gpu ${GPU_CHECK_PYTEST_ARGS:-tests --ignore=tests/distributed}
fi

# run_multi LAUNCHER_LABEL LOG_PREFIX LAUNCH_CMD...: every tests/gpu_multi script on all GPUs.
run_multi() {
    local label="$1" prefix="$2" script
    shift 2
    if ((NGPU < 2)); then
        record "$label (needs >= 2 GPUs)" skipped 0
        return
    fi
    for script in tests/gpu_multi/*.py; do
        [[ -f "$script" ]] || continue
        step "$label $(basename "$script" .py)" "$OUT/${prefix}_$(basename "$script" .py).log" \
            "${GPU_CHECK_MULTI_TIMEOUT:-180}" "$@" "$script"
    done
}

if [[ "$PHASES" == *" multi "* ]]; then
    run_multi "torchrun x$NGPU" multi "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU"
fi
if [[ "$PHASES" == *" mpi "* ]]; then
    run_multi "mpirun -n $NGPU" mpi mpirun -n "$NGPU" --bind-to none -x PYTHONPATH -x NCCL_NVLS_ENABLE \
        -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS "$PY"
fi

if [[ "$PHASES" == *" bench "* ]]; then
    if [[ -z "$BENCH_NAMES" ]]; then
        BENCH_NAMES="$(for f in scripts/bench_*.py; do [[ -f "$f" ]] && basename "$f" .py | sed 's/^bench_//'; done)"
    fi
    for name in $BENCH_NAMES; do
        if [[ ! -f "scripts/bench_$name.py" ]]; then
            record "bench $name" missing 0
            continue
        fi
        step "bench $name" "$OUT/bench_$name.log" "${GPU_CHECK_BENCH_TIMEOUT:-240}" "$PY" "scripts/bench_$name.py"
    done
fi

if [[ "$PHASES" == *" parity "* ]]; then
    corpus="${TMPDIR:-/tmp}/lpdist-corpus.txt"
    if [[ -n "${GPU_CHECK_CORPUS_FILE:-}" ]]; then
        # Python's own decompressors, so the image needs no xz or gzip tool.
        step "corpus" "$OUT/corpus.log" 300 "$PY" -c 'import gzip, lzma, shutil, sys
src = sys.argv[1]
opener = lzma.open if src.endswith(".xz") else gzip.open if src.endswith(".gz") else open
with opener(src, "rb") as inp, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(inp, out, 1 << 24)
print(f"corpus {sys.argv[2]} from {src}")' "$GPU_CHECK_CORPUS_FILE" "$corpus"
        corpus_rc=$?
    else
        site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        # At most 999 KiB per file, as `find -size -1000k` selects; md5 to compare corpora across machines.
        step "corpus" "$OUT/corpus.log" 300 "$PY" scripts/build_corpus.py "$site" "$corpus" --max-bytes 250e6 \
            --max-file-bytes 1022976
        corpus_rc=$?
    fi
    if ((corpus_rc != 0)); then
        # Whatever the file holds (part of this corpus, or an earlier one) is not the text to train on.
        echo "the corpus step failed (status $corpus_rc): parity not run" | tee -a "$OUT/corpus.log"
        record "parity (no corpus)" skipped 0
    else
        md5sum "$corpus" >> "$OUT/corpus.log" 2>&1
        # Runs are only comparable on the same text: with GPU_CHECK_CORPUS_MD5 set, a corpus with
        # another md5 (the machine's packages differ) stops the phase before any training.
        corpus_md5="$(md5sum "$corpus" 2>/dev/null | cut -d' ' -f1)"
        if [[ -n "${GPU_CHECK_CORPUS_MD5:-}" && "$corpus_md5" != "$GPU_CHECK_CORPUS_MD5" ]]; then
            echo "corpus md5 $corpus_md5 is not GPU_CHECK_CORPUS_MD5=$GPU_CHECK_CORPUS_MD5: parity not run" | tee -a "$OUT/corpus.log"
            record "parity (corpus md5 differs)" failed 0
        else
            # shellcheck disable=SC2086  # the argument lists are meant to be split
            step "parity" "$OUT/parity.log" "$((${GPU_CHECK_PARITY_TIMEOUT:-540} + 30))" bash scripts/parity_chunk.sh \
                "${GPU_CHECK_PARITY_TIMEOUT:-540}" \
                ${GPU_CHECK_PARITY_ARGS:---model 125m --tokens 100e6 --batch-size 32 --seq-len 1024} \
                --recipes ${GPU_CHECK_PARITY_RECIPES:-bf16 fp8 fp8-smooth fp4-quartet fp4-dge nvfp4} \
                -- --compile --monitor-every 0 --eval-batches 32 --data "$corpus"
        fi
    fi
fi

{
    echo
    printf '%-36s %-8s %6s\n' phase status seconds
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.txt"
if [[ "${GPU_CHECK_ARCHIVE:-0}" == 1 ]]; then
    tar czf "${TMPDIR:-/tmp}/gpu_check.tar.gz" -C "$OUT" . && rm -rf "${OUT:?}"/* &&
        mv "${TMPDIR:-/tmp}/gpu_check.tar.gz" "$OUT/"
fi
exit "$FAILED"
