"""Benchmark FP8 gradient communication against NCCL fp32/bf16 in the same run.

    torchrun --nproc_per_node=2 scripts/bench_comm.py               # NVLink / P2P
    torchrun --nproc_per_node=2 scripts/bench_comm.py --network     # NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
    (or LPDIST_BENCH_NETWORK=1; also run with --nproc_per_node=4)

For every size (default 4M, 16M, 64M, 256M elements of bf16 gradients per rank) it times, with
CUDA events after warm-up (median of repetitions): NCCL reduce-scatter fp32/bf16, NCCL
all-reduce fp32/bf16, NCCL's raw fp8 reduce-scatter, and lpdist.comm reduce_scatter for each
transport (all_to_all, nccl) and format (e4m3, e5m2), plus the FP8 all_reduce. Beside each time:
bytes each rank sends and the relative L2 error against the fp64 sum of the same inputs.
Prints a table; writes $OUT/bench_comm.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

NETWORK_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4M,16M,64M,256M", help="elements per rank, comma separated (K/M suffixes)")
    p.add_argument("--network", action="store_true", default=os.environ.get("LPDIST_BENCH_NETWORK") == "1",
                   help="disable NCCL P2P and SHM (network-bound stand-in)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (default 20, or 5 with --network)")
    p.add_argument("--warmup", type=int, default=3)
    return p.parse_args()


def elements(text: str) -> int:
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    return int(text[:-1]) * scale[text[-1]] if text[-1] in scale else int(text)


ARGS = parse_args()
if ARGS.network:  # must be set before NCCL creates its communicators
    os.environ.update(NETWORK_ENV)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lpdist import comm, kernels  # noqa: E402
from lpdist.benchmark import cuda_time_ms  # noqa: E402
from lpdist.comm.compat import reduce_scatter_single  # noqa: E402


def rank_input(seed: int, numel: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(numel, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def bench_size(numel: int, rank: int, world: int, reps: int, warmup: int) -> list[dict]:
    chunk = numel // world
    numel = chunk * world
    x = rank_input(1000 + rank, numel)
    ref_chunk = torch.zeros(chunk, dtype=torch.float64, device="cuda")
    ref_full = None
    for s in range(world):
        xs = rank_input(1000 + s, numel)
        ref_chunk += xs[rank * chunk:(rank + 1) * chunk].double()
        if numel <= (64 << 20):
            ref_full = xs.double() if ref_full is None else ref_full + xs.double()
        del xs
    rows = []

    def run(name: str, kind: str, fn, out: torch.Tensor, ref: torch.Tensor | None, bytes_fn) -> None:
        comm.reset_stats()
        fn()
        torch.cuda.synchronize()
        err = rel_l2(out, ref) if ref is not None else float("nan")
        sent = bytes_fn()
        ms = cuda_time_ms(fn, reps, warmup, before_each=dist.barrier)
        rows.append(dict(name=name, collective=kind, elements=numel, world=world, ms=ms,
                         bytes_sent=sent, rel_l2=err))
        if rank == 0:
            print(f"{numel / 2**20:7.0f}M {name:34s} {ms:9.3f} ms {sent / 2**20:9.1f} MiB "
                  f"{err:9.2e}", flush=True)

    ring = (world - 1) / world
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        inp, out = x.to(dtype), torch.empty(chunk, dtype=dtype, device="cuda")
        run(f"nccl reduce_scatter {tag}", "reduce_scatter",
            lambda: reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM), out, ref_chunk,
            lambda: int(ring * numel * inp.element_size()))
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        buf = x.to(dtype)
        run(f"nccl all_reduce {tag}", "all_reduce", lambda: dist.all_reduce(buf), buf, None,
            lambda: int(2 * ring * numel * buf.element_size()))
    for fmt, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        raw_in = (x.float() / world).to(dt)  # unscaled fp8 inputs, NCCL's own fp8 sum
        raw_out = torch.empty(chunk, dtype=dt, device="cuda")
        run(f"nccl raw fp8 reduce_scatter {fmt}", "reduce_scatter",
            lambda: reduce_scatter_single(raw_out, raw_in, op=dist.ReduceOp.SUM), raw_out,
            ref_chunk / world, lambda: int(ring * numel))
    out = torch.empty(chunk, dtype=torch.bfloat16, device="cuda")
    for transport in comm.TRANSPORTS:
        for fmt in ("e4m3", "e5m2"):
            run(f"lpdist reduce_scatter {transport} {fmt}", "reduce_scatter",
                lambda: comm.reduce_scatter(out, x, fmt=fmt, transport=transport), out, ref_chunk,
                lambda: comm.stats()[transport]["bytes_sent"])
    for transport in comm.TRANSPORTS:
        buf = x.clone()
        run(f"lpdist all_reduce {transport} e4m3", "all_reduce",
            lambda: (buf.copy_(x), comm.all_reduce(buf, transport=transport)), buf, ref_full,
            lambda: sum(v["bytes_sent"] for v in comm.stats().values()))
    return rows


def main() -> int:
    if "LOCAL_RANK" not in os.environ:  # started without torchrun: launch one rank per GPU (max 2)
        from torch.distributed.run import main as torchrun
        torchrun([f"--nproc_per_node={min(2, torch.cuda.device_count())}", __file__, *sys.argv[1:]])
        return 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    reps = ARGS.reps or (5 if ARGS.network else 20)
    if rank == 0:
        print(f"device {torch.cuda.get_device_name()} x{world}, NCCL {torch.cuda.nccl.version()}, "
              f"torch {torch.__version__}, kernels {kernels.backend()}, network-bound={ARGS.network}")
        print(f"{'size':>8s} {'collective':34s} {'time':>12s} {'sent/rank':>13s} {'rel L2':>9s}")
    rows = []
    for size in ARGS.sizes.split(","):
        rows += bench_size(elements(size), rank, world, reps, ARGS.warmup)
        torch.cuda.empty_cache()
    if rank == 0:
        base = {(r["elements"], r["collective"]): r["ms"] for r in rows if r["name"].endswith("bf16")}
        print("\nratio to NCCL bf16 of the same collective and size:")
        for r in rows:
            if r["name"].startswith("lpdist"):
                r["ratio_to_bf16"] = r["ms"] / base[(r["elements"], r["collective"])]
                print(f"{r['elements'] / 2**20:7.0f}M {r['name']:34s} {r['ratio_to_bf16']:.3f}x")
        if os.environ.get("OUT"):
            tag = "network" if ARGS.network else "nvlink"
            path = os.path.join(os.environ["OUT"], f"bench_comm_{tag}_w{world}.json")
            meta = dict(device=torch.cuda.get_device_name(), world=world, network_bound=ARGS.network,
                        nccl=".".join(map(str, torch.cuda.nccl.version())), torch=torch.__version__,
                        reps=reps, kernels=kernels.backend())
            with open(path, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
            print("wrote", path)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
