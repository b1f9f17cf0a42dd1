"""Faults on CPU (gloo): a killed or frozen rank, a kill in the middle of a checkpoint save,
resume after a crash, and the package's safety rules (no code execution on load, private
kernel cache).

Covered elsewhere and not repeated here: a save interrupted by an exception, truncated or
missing checkpoint files, corrupted ``meta.json``, mismatched metadata or shapes and foreign
pickles in DCP metadata (tests/test_checkpoint.py); exact resume with the same and another
world size, resume into another model refused, and the non-finite-loss skip-then-stop of the
example (tests/test_example.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from lpdist import checkpoint, kernels

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "pretrain_llama.py"
DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "logging")
TINY = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--data", DATA, "--warmup", "2",
        "--eval-every", "0", "--monitor-every", "0"]
# Seconds a surviving rank may wait for a dead or frozen peer, and the slack on top of it for
# the error to surface and the process to exit (startup is over when the fault is injected).
TIMEOUT_S = 10
EXIT_MARGIN_S = 45


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "LPDIST_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
            "LPDIST_TIMEOUT": str(TIMEOUT_S), "PYTHONPATH": str(ROOT), **extra}


def _logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def _wait_for_step(out: Path, step: int, procs: list[subprocess.Popen], deadline_s: float = 240) -> None:
    end = time.monotonic() + deadline_s
    while not _logged_steps(out) or max(_logged_steps(out)) < step:
        for proc in procs:
            assert proc.poll() is None, f"training exited early: {proc.communicate()[0][-3000:]}"
        assert time.monotonic() < end, f"no step {step} after {deadline_s}s"
        time.sleep(0.2)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (a /proc scan: no psutil)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_exit(proc: subprocess.Popen, limit_s: float) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"still running {limit_s:.0f}s after the fault (a hang): {output[-3000:]}")
    return proc.returncode, time.monotonic() - start, output


def test_sigkilled_rank_stops_torchrun_job_and_resume_loses_at_most_one_interval(tmp_path):
    out, every = tmp_path / "run", 4
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
               *TINY, "--steps", "2000", "--ckpt-every", str(every), "--out", str(out)]
    launcher = subprocess.Popen(command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(out, 2 * every + 2, [launcher])
        workers = {_rank_of(pid): pid for pid in _children(launcher.pid)}
        assert set(workers) == {0, 1}, workers
        steps_before_kill = max(_logged_steps(out))
        os.kill(workers[1], signal.SIGKILL)
        code, waited, output = _wait_exit(launcher, TIMEOUT_S + EXIT_MARGIN_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert code != 0, output[-3000:]
    assert not _alive(workers[0]), "rank 0 outlived the job"
    # The newest checkpoint is complete and at most one interval behind the crash.
    latest = checkpoint.latest(out / "checkpoints")
    record = checkpoint.read_meta(latest)
    last_logged = max(_logged_steps(out))
    assert last_logged >= steps_before_kill and last_logged - record["step"] <= every
    # Resume (one process now, the same global batch of 4 sequences) continues right after the checkpoint.
    stop = record["step"] + 2
    resumed = subprocess.run([sys.executable, str(EXAMPLE), *TINY, "--steps", "2000", "--ckpt-every", str(every),
                              "--stop-at", str(stop), "--out", str(out), "--resume", "--batch-size", "4"],
                             cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert _logged_steps(out) == list(range(1, stop + 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_frozen_rank_makes_the_other_exit_within_lpdist_timeout(tmp_path):
    """Rank 1 is stopped (SIGSTOP: its sockets stay open, so only the timeout can tell); rank 0
    must fail within ``LPDIST_TIMEOUT`` plus a margin instead of waiting forever."""
    out = tmp_path / "run"
    base = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(EXAMPLE), *TINY, "--steps", "2000", "--out", str(out)],
                              cwd=tmp_path, env=_env(tmp_path, **base, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        _wait_for_step(out, 3, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        code, waited, output = _wait_exit(procs[0], TIMEOUT_S + EXIT_MARGIN_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert code != 0, output[-3000:]
    assert waited >= TIMEOUT_S * 0.5, f"rank 0 failed after {waited:.1f}s, before any timeout could fire"


# A script that saves checkpoint 1, then saves ``step`` (its third argument: 2 for a new step, 1 to
# re-save the existing one) and is killed by SIGKILL at ``point`` (its second argument): right after
# the dcp.save of that second save ("dcp"), or just before its Nth os.replace ("replace:N"), or in the
# middle of its Nth shutil.rmtree, after one file is gone ("rmtree:N").
KILL_DURING_SAVE = r"""
import os, signal, shutil, sys
from pathlib import Path
import torch
from lpdist import checkpoint
root, point, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Linear(16, 16)
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(4, 16)).sum().backward(); opt.step()
checkpoint.save(root, 1, model, opt, meta={"saved": "first"})
model(torch.randn(4, 16)).sum().backward(); opt.step()
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "dcp":
    real = checkpoint.dcp.save
    checkpoint.dcp.save = lambda state, checkpoint_id: (real(state, checkpoint_id=checkpoint_id), die())
else:
    function, n = point.split(":")
    calls, real_function = [0], getattr(checkpoint.os if function == "replace" else checkpoint.shutil, function)
    def interrupted(path, *args):
        calls[0] += 1
        if calls[0] == int(n):
            if function == "rmtree":
                next(p for p in sorted(Path(path).rglob("*")) if p.is_file()).unlink()
            die()
        real_function(path, *args)
    setattr(checkpoint.os if function == "replace" else checkpoint.shutil, function, interrupted)
checkpoint.save(root, step, model, opt, meta={"saved": "second"})
"""


@pytest.mark.parametrize("step,point,survivor", [
    # A new step: replace 1 writes meta.json in the staging directory, 2 renames the staging
    # directory to step_2, 3 replaces the latest marker.
    (2, "dcp", 1), (2, "replace:2", 1), (2, "replace:3", 1),
    # A re-save of step 1: replace 2 moves the existing step_1 aside, 3 renames the staging
    # directory to step_1, 4 replaces the latest marker; rmtree 1 deletes the moved-aside copy.
    (1, "dcp", "first"), (1, "replace:1", "first"), (1, "replace:2", "first"), (1, "replace:3", "first"),
    (1, "replace:4", "second"), (1, "rmtree:1", "second"),
])
def test_sigkill_during_checkpoint_save_keeps_a_complete_checkpoint(tmp_path, step, point, survivor):
    """After the kill, ``load`` finds the previous checkpoint (a step number for new steps, the
    "first"/"second" save for re-saves), and the next save leaves only complete checkpoints."""
    import torch

    root = tmp_path / "ckpt"
    result = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(root), point, str(step)], cwd=tmp_path,
                            env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    model = torch.nn.Linear(16, 16)
    optimizer = torch.optim.AdamW(model.parameters())
    record = checkpoint.load(root, model, optimizer)
    assert (record["step"] if step == 2 else record["meta"]["saved"]) == survivor
    checkpoint.save(root, 3, model, optimizer)
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # staging, aside copies, temporaries
    assert all(checkpoint.read_meta(directory)["step"] == int(directory.name[5:]) for directory in root.glob("step_*"))


def test_garbage_checkpoint_metadata_is_a_clear_error(tmp_path):
    """Corrupted pickles fail in many ways (UnpicklingError, OverflowError from a huge FRAME
    length, MemoryError, UnicodeDecodeError, ...): every one must come out as CheckpointError.
    Seeded garbage of the file's own size, half of it behind a valid pickle protocol header
    so the parser gets past the first opcode."""
    import random

    import torch

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    directory = checkpoint.save(tmp_path, 1, model, optimizer)
    metadata = directory / ".metadata"
    size = metadata.stat().st_size
    generator = random.Random(20261122)
    for trial in range(200):
        garbage = generator.randbytes(size)
        metadata.write_bytes(b"\x80\x04\x95" + garbage[3:] if trial % 2 else garbage)
        with pytest.raises(checkpoint.CheckpointError, match="metadata"):
            checkpoint.load(tmp_path, model, optimizer)


# ------------------------------------------------------------------------------ safety

def test_no_eval_exec_or_raw_unpickling_in_the_package():
    """Nothing evaluates strings; the only unpickling is checkpoint.py's restricted
    ``_MetadataUnpickler`` and ``torch.load(..., weights_only=True)``."""
    offenders = []
    for path in sorted((ROOT / "lpdist").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            where = f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
            if re.search(r"(?<![\w.])(eval|exec|compile)\(|pickle\.loads?\(|marshal\.loads?\(|"
                         r"\bUnpickler\(|shelve\.|yaml\.load\(", code) and "_MetadataUnpickler(handle)" not in code:
                if not re.search(r"pickle\.Unpickler\):", code):  # the restricted subclass itself
                    offenders.append(where)
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(where)
    assert not offenders, "\n".join(offenders)


def test_kernel_cache_directory_is_private(tmp_path):
    loose = tmp_path / "shared" / "cupy"
    loose.mkdir(parents=True, mode=0o777)
    os.chmod(loose, 0o777)
    for path in (loose, tmp_path / "new" / "cupy"):
        assert kernels.private_dir(path) == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
