"""scripts/parity_chunk.sh and the parity phase of scripts/gpu_check.sh, on CPU.

The shell scripts run for real; the Python interpreter they call (``PYTHON``) and
``nvidia-smi`` are stubs that log their arguments and behave as each test asks (env
``STUB_MODE``), so what is checked is the scripts' own logic: exit status, which outputs are
copied, how many GPUs are used, which steps run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Stands in for `python3`: logs its arguments to $STUB_LOG, then, as loss_parity.py, writes the
# table and plot into its --out folder and exits 0 (ok), or writes nothing and exits 1 (crash)
# or runs past any time limit (hang); as build_corpus.py, writes part of its output and exits
# $STUB_CORPUS_RC; the interpreter's other uses (pip, torch queries) succeed.
PYTHON_STUB = r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  *loss_parity.py*)
    args=("$@")
    for i in "${!args[@]}"; do [[ "${args[i]}" == --out ]] && out="${args[i + 1]}"; done
    case "$STUB_MODE" in
      ok) for name in loss_parity.json loss_parity.png; do echo new > "$out/$name"; done; exit 0 ;;
      crash) echo "Traceback: loss_parity crashed"; exit 1 ;;
      hang) exec sleep 60 ;;
    esac ;;
  *build_corpus.py*) head -c 1000 /dev/zero > "$3"; exit "$STUB_CORPUS_RC" ;;
  *purelib*) echo "$STUB_SITE" ;;
  *device_count*) echo 4 ;;
  *) cat > /dev/null ;;
esac
"""


@pytest.fixture
def stubs(tmp_path: Path) -> dict[str, str]:
    """Environment for the scripts: stub interpreter and a 4-GPU ``nvidia-smi`` first on PATH,
    OUT, TMPDIR and the parity runs folder under ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(PYTHON_STUB)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3; do echo \"GPU $i: stub\"; done\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": str(bin_dir / "python"), "OUT": str(tmp_path / "out"),
            "TMPDIR": str(tmp_path / "tmp"), "PARITY_RUNS": str(tmp_path / "runs"), "STUB_LOG": str(tmp_path / "calls.log"),
            "STUB_MODE": "ok", "STUB_CORPUS_RC": "0", "STUB_SITE": str(tmp_path)}


def parity_chunk(env: dict[str, str], limit: int = 20) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/parity_chunk.sh", str(limit), "--recipes", "bf16", "fp8"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=limit + 30)


def stub_calls(env: dict[str, str], script: str) -> list[str]:
    log = Path(env["STUB_LOG"])
    return [line for line in log.read_text().splitlines() if script in line] if log.exists() else []


@pytest.mark.parametrize("mode, status", [("ok", 0), ("crash", 1), ("hang", 124)])
def test_parity_chunk_exits_with_loss_parity_status(stubs: dict[str, str], mode: str, status: int) -> None:
    """The status is loss_parity.py's (124: cut off by the time limit), whichever outputs the
    copy at the end finds (a study without bf16 writes no gap plot)."""
    result = parity_chunk({**stubs, "STUB_MODE": mode}, limit=2 if mode == "hang" else 20)
    assert result.returncode == status, result.stdout + result.stderr
    assert f"loss_parity exit status {status}" in result.stdout


def test_parity_chunk_copies_only_this_call_s_outputs(stubs: dict[str, str]) -> None:
    """Table and plots of an earlier call (in the runs folder or already in $OUT/parity) are
    removed before loss_parity.py starts: a crash leaves none to be taken for this call's. The
    run folders stay (they are resumed) and their logs are copied."""
    runs, parity = Path(stubs["PARITY_RUNS"]), Path(stubs["OUT"]) / "parity"
    (runs / "fp8").mkdir(parents=True)
    (runs / "fp8" / "metrics.jsonl").write_text('{"step": 1}\n')
    parity.mkdir(parents=True)
    outputs = ("loss_parity.json", "loss_parity.png", "loss_parity_gap.png")
    for name in outputs:
        (runs / name).write_text("earlier\n")
        (parity / name).write_text("earlier\n")
    result = parity_chunk({**stubs, "STUB_MODE": "crash"})
    assert result.returncode == 1
    assert not any((folder / name).exists() for folder in (runs, parity) for name in outputs)
    assert (parity / "fp8" / "metrics.jsonl").read_text() == '{"step": 1}\n'

    result = parity_chunk(stubs)
    assert result.returncode == 0
    assert [(parity / name).read_text() for name in outputs[:2]] == ["new\n", "new\n"]


@pytest.mark.parametrize("visible, gpus", [(None, 4), ("2,3", 2), ("1", 1), ("", 0)])
def test_parity_chunk_uses_the_visible_gpus(stubs: dict[str, str], visible: str | None, gpus: int) -> None:
    """``--parallel-gpus`` is the length of CUDA_VISIBLE_DEVICES when set (loss_parity.py then
    spreads the runs over those devices), else every GPU nvidia-smi lists."""
    env = stubs if visible is None else {**stubs, "CUDA_VISIBLE_DEVICES": visible}
    assert parity_chunk(env).returncode == 0
    (call,) = stub_calls(stubs, "loss_parity.py")
    assert f"--parallel-gpus {gpus} --recipes bf16 fp8" in call


@pytest.mark.parametrize("corpus_rc, parity_runs", [(1, False), (124, False), (0, True)])
def test_gpu_check_trains_only_on_a_corpus_that_was_built(stubs: dict[str, str], corpus_rc: int,
                                                          parity_runs: bool) -> None:
    """GPU_CHECK_PHASES=parity: when the corpus step fails (the build stopped part way; 124 as
    after the time limit) the study is not run on what the file holds; it is recorded as
    skipped and the check fails through the corpus step."""
    env = {**stubs, "GPU_CHECK_PHASES": "parity", "STUB_CORPUS_RC": str(corpus_rc)}
    result = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=120)
    summary = (Path(stubs["OUT"]) / "summary.txt").read_text()
    assert len(stub_calls(stubs, "build_corpus.py")) == 1
    calls = stub_calls(stubs, "loss_parity.py")
    if parity_runs:
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(calls) == 1 and f"--data {stubs['TMPDIR']}/lpdist-corpus.txt" in calls[0]
        assert "parity " in summary and "(no corpus)" not in summary
    else:
        assert result.returncode == 1 and calls == []
        assert "parity (no corpus)" in summary and "skipped" in summary
        assert f"rc={corpus_rc}" in summary or "timeout" in summary
