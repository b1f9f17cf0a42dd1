# Shared set-up for scripts/test.sh and scripts/pretrain.sh (source it, then call lpdist_setup_env).
#
#   source scripts/setup_env.sh
#   lpdist_setup_env test      # extras to install: "" (the package), "test", "mpi", "test,cuda", ...
#
# Creates or reuses the virtualenv at $LPDIST_VENV (default: <repo>/.venv) and exports
# LPDIST_ROOT, LPDIST_VENV and LPDIST_PY (the venv's python).
#
# torch is never pulled in as a side effect of installing lpdist, so a CPU machine never downloads
# a multi-GB CUDA build:
#   1. if the base python3 already imports a recent enough torch, the venv sees it
#      (--system-site-packages) and it is used as is;
#   2. else torch==$LPDIST_TORCH_VERSION is installed from a wheel that pip finds locally
#      (find-links), unless that wheel depends on nvidia-* packages;
#   3. else from the CPU index (https://download.pytorch.org/whl/cpu).
# The installed torch is then pinned with a constraint while `pip install -e ".[extras]"` runs.
# A stamp in the venv (hash of pyproject.toml and this file, plus the extras) makes a re-run
# with nothing changed skip pip entirely.

LPDIST_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LPDIST_VENV="${LPDIST_VENV:-$LPDIST_ROOT/.venv}"
LPDIST_TORCH_VERSION="${LPDIST_TORCH_VERSION:-2.13.0}"
LPDIST_TORCH_MIN="2.11"
LPDIST_CPU_INDEX="https://download.pytorch.org/whl/cpu"
export LPDIST_ROOT LPDIST_VENV
export LPDIST_PY="$LPDIST_VENV/bin/python"

_lpdist_log() { echo "[setup] $*" >&2; }

# True when $1 (a python) imports torch >= LPDIST_TORCH_MIN.
_lpdist_has_torch() {
    "$1" - "$LPDIST_TORCH_MIN" >/dev/null 2>&1 <<'EOF'
import sys
import torch
have = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
need = tuple(int(p) for p in sys.argv[1].split("."))
sys.exit(0 if have >= need else 1)
EOF
}

_lpdist_stamp_hash() {
    cat "$LPDIST_ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1
}

# True when the stamp matches this pyproject/setup and covers every extra in $1 (comma separated).
_lpdist_stamp_current() {
    local stamp="$LPDIST_VENV/.lpdist-setup" extra
    [[ -f "$stamp" ]] || return 1
    [[ "$(head -n1 "$stamp")" == "$(_lpdist_stamp_hash)" ]] || return 1
    for extra in ${1//,/ }; do
        grep -qx "$extra" <(tail -n +2 "$stamp") || return 1
    done
    "$LPDIST_PY" -c "import torch, lpdist" >/dev/null 2>&1
}

_lpdist_write_stamp() {
    local stamp="$LPDIST_VENV/.lpdist-setup" previous=""
    if [[ -f "$stamp" && "$(head -n1 "$stamp")" == "$(_lpdist_stamp_hash)" ]]; then
        previous="$(tail -n +2 "$stamp")"
    fi
    { _lpdist_stamp_hash; printf '%s\n' $previous ${1//,/ } | sort -u | { grep -v '^$' || true; }; } >"$stamp.tmp"
    mv "$stamp.tmp" "$stamp"
}

# Install torch into the venv without ever resolving a CUDA build from PyPI.
_lpdist_install_torch() {
    local pip=("$LPDIST_PY" -m pip) tmp wheel
    tmp="$(mktemp -d)"
    # --no-index keeps only find-links: succeeds only if a wheel lies on local disk.
    if "${pip[@]}" download -q --no-index --no-deps -d "$tmp" "torch==$LPDIST_TORCH_VERSION" >/dev/null 2>&1; then
        wheel="$(ls "$tmp"/torch-*.whl 2>/dev/null | head -n1)"
        if [[ -n "$wheel" ]] && ! "$LPDIST_PY" - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
sys.exit(0 if any(l.startswith("Requires-Dist: nvidia-") for l in text.splitlines()) else 1)
EOF
        then
            _lpdist_log "installing local wheel $(basename "$wheel")"
            "${pip[@]}" install -q "$wheel" && { rm -rf "$tmp"; return 0; }
        else
            _lpdist_log "local torch wheel ${wheel:+$(basename "$wheel") }needs CUDA packages; not using it"
        fi
    fi
    rm -rf "$tmp"
    _lpdist_log "installing torch==$LPDIST_TORCH_VERSION from the CPU index $LPDIST_CPU_INDEX"
    "${pip[@]}" install -q --index-url "$LPDIST_CPU_INDEX" "torch==$LPDIST_TORCH_VERSION" ||
        "${pip[@]}" install -q --index-url "$LPDIST_CPU_INDEX" "torch>=$LPDIST_TORCH_MIN"
}

# Make the venv current for the given extras ("" = just the package).
lpdist_setup_env() {
    local extras="${1:-}" spec="." constraint
    [[ -n "$extras" ]] && spec=".[$extras]"
    if _lpdist_stamp_current "$extras"; then
        _lpdist_log "venv $LPDIST_VENV is current"
        return 0
    fi
    if [[ ! -x "$LPDIST_PY" ]]; then
        if _lpdist_has_torch python3; then
            _lpdist_log "creating $LPDIST_VENV on top of the system torch (--system-site-packages)"
            python3 -m venv --system-site-packages "$LPDIST_VENV"
        else
            _lpdist_log "creating $LPDIST_VENV"
            python3 -m venv "$LPDIST_VENV"
        fi
    fi
    if ! _lpdist_has_torch "$LPDIST_PY"; then
        _lpdist_install_torch
        _lpdist_has_torch "$LPDIST_PY" || { _lpdist_log "could not install torch>=$LPDIST_TORCH_MIN"; return 1; }
    fi
    constraint="$LPDIST_VENV/.lpdist-torch-pin.txt"
    "$LPDIST_PY" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null >"$constraint"
    _lpdist_log "pip install -e \"$spec\" (torch pinned: $(cat "$constraint"))"
    if (cd "$LPDIST_ROOT" && "$LPDIST_PY" -m pip install -q -c "$constraint" -e "$spec"); then
        _lpdist_write_stamp "$extras"
    elif [[ -z "$extras" ]] && "$LPDIST_PY" -c "import torch, numpy, tqdm" >/dev/null 2>&1; then
        # Offline machine with the dependencies already present: run from the source tree.
        _lpdist_log "pip install failed; using the source tree through PYTHONPATH"
        export PYTHONPATH="$LPDIST_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    else
        return 1
    fi
}
