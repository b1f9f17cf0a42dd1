"""Soak test (not part of CI): the full FP8 recipe for many steps, checking for drift.

    python scripts/soak.py                                   # 1 process, 10k steps
    torchrun --standalone --nproc_per_node=2 scripts/soak.py --steps 10000
    OUT=results python scripts/soak.py --steps 2000          # also writes $OUT/soak.json

A tiny Llama with the ``fp8-smooth`` recipe switched fully on: Float8Linear layers with
Smooth-SwiGLU (``lpdist.nn.convert``), FP8 gradient all-reduce through DDP's comm hook
(``lpdist.comm.fp8_ddp_hook``; with one process it still quantizes and decodes every bucket)
and ``lpdist.optim.AdamW`` with FP8 moments. It trains on real text (the Python standard
library's ``email`` package, byte tokens) and checks, at the end:

* every loss and gradient norm was finite (the optimizer raises on a non-finite gradient);
* memory is flat: resident set size (and CUDA max allocated) after the warm-up vs at the end,
  optimizer ``memory_bytes()`` after the first step vs at the end;
* the loss fell: mean of the last ``--window`` steps well below the mean of the first.

Prints progress lines, then one verdict line ``soak PASS|FAIL: ...``; exit status 1 on FAIL.
"""

from __future__ import annotations

import argparse
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lpdist.benchmark import write_result
from lpdist.comm import DDPHookState, fp8_ddp_hook
from lpdist.data import WindowSampler, load_corpus
from lpdist.dist import process_group
from lpdist.models import Llama, preset
from lpdist.nn import convert
from lpdist.optim import AdamW

DATA = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
# Memory may move by allocator noise (arenas, the data page cache of the memory-mapped corpus)
# but not grow with the step count: 64 MiB of RSS over 10k steps would be ~7 KiB per step.
RSS_SLACK_BYTES = 64 << 20
CUDA_SLACK_BYTES = 1 << 20
# A byte-level LM starts at ln(256) ~ 5.5 nats; a tiny model reaches well under 3 on real text.
REQUIRED_LOSS_DROP = 0.5


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc), 0 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def memory_snapshot(device: torch.device, optimizer: AdamW) -> dict[str, int]:
    snap = {"rss_bytes": resident_bytes(), "optimizer_bytes": optimizer.memory_bytes()}
    if device.type == "cuda":
        snap["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    return snap


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``peak``."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--window", type=int, default=200, help="steps averaged for the start/end loss")
    parser.add_argument("--warmup", type=int, default=100,
                        help="LR warm-up steps; the start memory snapshot is taken after step --warmup (>= 1)")
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument("--data", default=DATA)
    args = parser.parse_args(argv)
    if args.window < 1 or args.warmup < 1:
        parser.error(f"--window and --warmup must be >= 1 (the loss means average --window steps; the start "
                     f"memory snapshot is taken after step --warmup), got {args.window} and {args.warmup}")
    if args.steps < 2 * args.window or args.warmup >= args.steps:
        parser.error("--steps must be at least 2 * --window and larger than --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with process_group() as (rank, world, _, device):
        return soak(args, rank, world, device)


def soak(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    if rank == 0:
        corpus = load_corpus(args.data)
    dist.barrier()
    if rank != 0:
        corpus = load_corpus(args.data)
    sampler = WindowSampler(corpus.train, args.seq_len, seed=0)
    torch.manual_seed(0)
    with torch.device(device):
        llama = Llama(preset("tiny", vocab_size=64 * math.ceil(corpus.vocab_size / 64)))
    convert(llama, "fp8-smooth")
    model = DistributedDataParallel(llama, device_ids=[device.index] if device.type == "cuda" else None)
    model.register_comm_hook(DDPHookState(fmt="e4m3"), fp8_ddp_hook)
    optimizer = AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, moments="fp8")

    losses: list[float] = []
    start_mem: dict[str, int] = {}
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        inputs, targets = sampler.batch((step - 1) * world * args.batch_size, rank, args.batch_size, device)
        loss = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # raises FloatingPointError on a non-finite gradient
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"non-finite loss {value} at step {step}")
        losses.append(value)
        if step == 1:
            first_optimizer_bytes = optimizer.memory_bytes()
        if step == args.warmup:
            start_mem = memory_snapshot(device, optimizer)
        if rank == 0 and (step % args.log_every == 0 or step == args.steps):
            rate = step / (time.perf_counter() - started)
            print(f"step {step}/{args.steps} loss {value:.4f} rss {resident_bytes() / 2**20:.1f} MiB "
                  f"({rate:.1f} steps/s)", flush=True)
    end_mem = memory_snapshot(device, optimizer)

    loss_start = sum(losses[:args.window]) / args.window
    loss_end = sum(losses[-args.window:]) / args.window
    failures = []
    if loss_end > loss_start - REQUIRED_LOSS_DROP:
        failures.append(f"loss fell only from {loss_start:.3f} to {loss_end:.3f}")
    if end_mem["optimizer_bytes"] != first_optimizer_bytes:
        failures.append(f"optimizer state grew from {first_optimizer_bytes} to {end_mem['optimizer_bytes']} bytes")
    if end_mem["rss_bytes"] - start_mem["rss_bytes"] > RSS_SLACK_BYTES:
        failures.append(f"RSS grew from {start_mem['rss_bytes']} to {end_mem['rss_bytes']} bytes")
    if device.type == "cuda" and (end_mem["cuda_max_allocated_bytes"] - start_mem["cuda_max_allocated_bytes"]
                                  > CUDA_SLACK_BYTES):
        failures.append("CUDA max allocated grew from "
                        f"{start_mem['cuda_max_allocated_bytes']} to {end_mem['cuda_max_allocated_bytes']} bytes")
    result = {
        "steps": args.steps, "world_size": world, "recipe": "fp8-smooth + fp8 DDP comm + fp8 moments",
        "model": "tiny", "batch_size": args.batch_size, "seq_len": args.seq_len,
        "loss_first_window": loss_start, "loss_last_window": loss_end, "final_loss": losses[-1],
        "start_memory": start_mem, "end_memory": end_mem, "first_step_optimizer_bytes": first_optimizer_bytes,
        "seconds": time.perf_counter() - started, "passed": not failures, "failures": failures,
    }
    if rank == 0:
        write_result("soak", result)
        verdict = "PASS" if not failures else "FAIL"
        print(f"soak {verdict}: {args.steps} steps x {world} rank(s), loss {loss_start:.3f} -> {loss_end:.3f} "
              f"(final {losses[-1]:.3f}), RSS {start_mem['rss_bytes'] / 2**20:.1f} -> "
              f"{end_mem['rss_bytes'] / 2**20:.1f} MiB, optimizer {first_optimizer_bytes} -> "
              f"{end_mem['optimizer_bytes']} B" + ("" if not failures else "; " + "; ".join(failures)), flush=True)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
