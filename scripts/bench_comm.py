"""Benchmark FP8 gradient communication against NCCL fp32/bf16 in the same run.

    torchrun --nproc_per_node=2 scripts/bench_comm.py               # NVLink / P2P
    torchrun --nproc_per_node=2 scripts/bench_comm.py --network     # NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1
    torchrun --nproc_per_node=2 scripts/bench_comm.py --breakdown   # + where the time goes
    (or LPDIST_BENCH_NETWORK=1; also run with --nproc_per_node=4)

For every size (default 4M, 16M, 64M, 256M elements of bf16 gradients per rank) it times, with
CUDA events after warm-up (median of repetitions): NCCL reduce-scatter fp32/bf16, NCCL
all-reduce fp32/bf16, NCCL's raw fp8 reduce-scatter, and lpdist.comm reduce_scatter for each
transport (all_to_all, nccl, p2p) and format (e4m3, e5m2), plus the FP8 all_reduce (and, on two
ranks, the all_to_all transport with its general all_to_all_single exchange instead of the
two-rank all-gather). With
``--network`` the p2p transport is left out: it stores over NVLink itself, which is what the
network-bound setting takes away from NCCL. Beside each time:
the GPU time of the call queued behind a 5 ms spin kernel (the host issues it while the device
is busy, as in a training step: the device's time alone), the host time to issue the call (no
synchronization inside; when it is close to the GPU time the call is bound by Python/launch
overhead), bytes each rank sends, and the relative L2 error
of this rank's chunk against the fp64 sum of the same inputs (raw fp8 rows: against the fp64
sum of the fp8 inputs, i.e. only NCCL's fp8 rounding of the sum).

``--breakdown`` adds, per size, a device copy of the input (the memory-bandwidth yardstick),
each step of both transports timed alone on the same bytes (quantize kernel, the exchange, the
decode kernel; amax kernel, MAX all-reduce, fp8 reduce-scatter) and the all_to_all transport with
1, 2 and 4 pipeline pieces.
``--rounds N`` times everything N times over (NCCL bf16 again in each round) and prints every
round's ratio and their median.
Prints a table; writes $OUT/bench_comm_<nvlink|network>_w<W>.json when OUT is set.

``--sweep-pieces 1,2,4,8`` replaces all of the above with a sweep of the all_to_all e4m3
reduce-scatter at one size (``--sweep-size``, default 256M): every pipeline depth times every
grid cap of the comm kernels (``--sweep-ctas``, CTAs per SM, 0 = the library default) on two
process groups, the default one and one whose NCCL stream has high priority (``--sweep-streams``),
beside NCCL's bf16 reduce-scatter on each group. Each row says whether the output is bit-identical
to the first setting's (on every rank). Prints a table; writes $OUT/bench_comm.json.

    torchrun --standalone --nproc_per_node=2 scripts/bench_comm.py --sweep-pieces 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

#: Spin queued before each repetition of the "queued" time (longer than any call takes to issue).
QUEUED_BEHIND_MS = 5.0
NETWORK_ENV = {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4M,16M,64M,256M", help="elements per rank, comma separated (K/M suffixes)")
    p.add_argument("--network", action="store_true", default=os.environ.get("LPDIST_BENCH_NETWORK") == "1",
                   help="disable NCCL P2P and SHM (network-bound stand-in)")
    p.add_argument("--reps", type=int, default=0, help="timed repetitions (default 20, or 5 with --network)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every row this many times, the rounds one after another (the baseline is "
                        "re-measured in each); ratios are per round, and their median is printed")
    p.add_argument("--breakdown", action="store_true", help="also time every step of both transports alone")
    p.add_argument("--sweep-pieces", default="", help="sweep mode: all_to_all pipeline depths, comma separated")
    p.add_argument("--sweep-ctas", default="0,4,2",
                   help="sweep: grid caps of the comm kernels in CTAs per SM (0 = library default)")
    p.add_argument("--sweep-streams", default="normal,high", help="sweep: NCCL stream priorities (normal, high)")
    p.add_argument("--sweep-size", default="256M", help="sweep: elements per rank")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


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
from lpdist.benchmark import cuda_time_ms, write_result  # noqa: E402
from lpdist.comm import all_to_all  # noqa: E402
from lpdist.comm.all_to_all import exchange  # noqa: E402
from lpdist.comm import codec  # noqa: E402
from lpdist.comm.codec import block_amax_into, dequant_into, quantize_into  # noqa: E402
from lpdist.comm.compat import reduce_scatter_single  # noqa: E402
from lpdist.comm.shared_scale import scale_target  # noqa: E402
from lpdist.comm.wire import WireLayout  # noqa: E402


def rank_input(seed: int, numel: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(numel, generator=g, device="cuda", dtype=torch.float32).to(torch.bfloat16)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def host_ms(fn, reps: int) -> float:
    """Median host milliseconds to issue ``fn()`` (GPU idle before, no synchronization inside)."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


class Runner:
    """Times calls, prints one table row each on rank 0 and collects the rows."""

    def __init__(self, numel: int, rank: int, world: int, reps: int, warmup: int) -> None:
        self.numel, self.rank, self.world, self.reps, self.warmup = numel, rank, world, reps, warmup
        self.rows: list[dict] = []

    def __call__(self, name: str, kind: str, fn, out: torch.Tensor | None = None,
                 ref: torch.Tensor | None = None, bytes_fn=lambda: 0) -> float:
        comm.reset_stats()
        fn()
        torch.cuda.synchronize()
        err = rel_l2(out, ref) if ref is not None else float("nan")
        sent = bytes_fn()
        ms = cuda_time_ms(fn, self.reps, self.warmup, before_each=dist.barrier)
        queued = cuda_time_ms(fn, self.reps, 0, before_each=dist.barrier, queued_behind_ms=QUEUED_BEHIND_MS)
        host = host_ms(fn, self.reps)
        self.rows.append(dict(name=name, collective=kind, elements=self.numel, world=self.world, ms=ms,
                              queued_ms=queued, host_ms=host, bytes_sent=sent, rel_l2=err))
        if self.rank == 0:
            print(f"{self.numel / 2**20:7.0f}M {name:44s} {ms:9.3f} ms {queued:9.3f} ms {host:8.3f} ms "
                  f"{sent / 2**20:9.1f} MiB {err:9.2e}", flush=True)
        return ms


def breakdown(run: Runner, x: torch.Tensor, chunk: int, ref_chunk: torch.Tensor) -> None:
    """Every step of both transports alone, on the bytes a full e4m3 call moves (block 256), after
    a plain device copy of the input (reads and writes 2 bytes per element: the memory-bandwidth
    yardstick for the kernels, which read 2 and write about 1 byte per element)."""
    rank, world, block, fmt = run.rank, run.world, 256, "e4m3"
    rows = x.view(world, chunk)
    copy = torch.empty_like(rows)
    run("  reference: device copy of the input", "step", lambda: copy.copy_(rows))
    out = torch.empty(1, chunk, dtype=x.dtype, device="cuda")
    layout = WireLayout(chunk, block)
    send = layout.empty(world, x.device)
    own = send[world - 1:]
    run("  a2a step: quantize kernel", "step",
        lambda: quantize_into(rows, None, col0=0, cols=chunk, block=block, fmt=fmt, payload=layout.payload(send),
                              scales=layout.scales(send), own_row=rank))
    received = {}

    def exchange_rows() -> None:
        received["recv"], work = exchange(send, layout, world, rank, None)
        if work is not None:
            work.wait()
    run("  a2a step: exchange of W-1 rows (own row stays)", "step", exchange_rows,
        bytes_fn=lambda: (world - 1) * layout.row_bytes)
    recv_all = torch.empty_like(send)
    run("  a2a step: all_to_all all W rows (equal split)", "step",
        lambda: dist.all_to_all_single(recv_all, send), bytes_fn=lambda: (world - 1) * layout.row_bytes)
    recv = received["recv"]
    run("  a2a step: decode-sum kernel", "step",
        lambda: dequant_into(layout.payload(recv), layout.scales(recv), sum_rows=world, block=block, fmt=fmt,
                             factor=1.0, out=out, own=(layout.payload(own), layout.scales(own)), own_row=rank),
        out[0], ref_chunk)
    full = torch.empty(chunk, dtype=x.dtype, device="cuda")
    for count in (1, 2, 4):
        run(f"  a2a full call, pieces={count}", "step",
            lambda: comm.reduce_scatter(full, x, fmt=fmt, pieces=count), full, ref_chunk)
    if dist.get_backend() != "nccl" or torch.cuda.get_device_capability() < (9, 0):
        return
    amax = torch.empty(world, -(-chunk // block), dtype=torch.float32, device="cuda")
    run("  nccl step: block amax kernel", "step",
        lambda: block_amax_into(rows, None, col0=0, cols=chunk, block=block, out=amax))
    amax_copy = amax.clone()
    run("  nccl step: MAX all_reduce of block amaxes", "step",
        lambda: dist.all_reduce(amax_copy, op=dist.ReduceOp.MAX), bytes_fn=lambda: amax.numel() * 4)
    codes = torch.empty(world, chunk, dtype=torch.uint8, device="cuda")
    target = scale_target(fmt, world)
    run("  nccl step: quantize kernel (shared scales)", "step",
        lambda: quantize_into(rows, None, col0=0, cols=chunk, block=block, fmt=fmt, payload=codes,
                              amax=amax, target=target))
    summed = torch.empty(1, chunk, dtype=torch.uint8, device="cuda")
    run("  nccl step: fp8 reduce_scatter", "step",
        lambda: reduce_scatter_single(summed.view(torch.float8_e4m3fn), codes.view(torch.float8_e4m3fn)),
        bytes_fn=lambda: (world - 1) * chunk)
    run("  nccl step: decode kernel (scales from amax)", "step",
        lambda: dequant_into(summed, amax[rank:rank + 1], sum_rows=1, block=block, fmt=fmt, factor=1.0,
                             out=out, amax_target=target))


def bench_size(numel: int, rank: int, world: int, reps: int, warmup: int, with_breakdown: bool) -> list[dict]:
    chunk = numel // world
    numel = chunk * world
    x = rank_input(1000 + rank, numel)
    mine = slice(rank * chunk, (rank + 1) * chunk)
    fp8_dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
    ref_chunk = torch.zeros(chunk, dtype=torch.float64, device="cuda")
    ref_raw = {fmt: torch.zeros(chunk, dtype=torch.float64, device="cuda") for fmt in fp8_dtypes}
    for s in range(world):
        xs = rank_input(1000 + s, numel)[mine]
        ref_chunk += xs.double()
        for fmt, dt in fp8_dtypes.items():  # the same fp8 inputs the raw rows send
            ref_raw[fmt] += (xs.float() / world).to(dt).double()
        del xs
    run = Runner(numel, rank, world, reps, warmup)
    ring = (world - 1) / world
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        inp, out = x.to(dtype, copy=True), torch.empty(chunk, dtype=dtype, device="cuda")
        run(f"nccl reduce_scatter {tag}", "reduce_scatter",
            lambda: reduce_scatter_single(out, inp, op=dist.ReduceOp.SUM), out, ref_chunk,
            lambda: int(ring * numel * inp.element_size()))
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        # a copy: the sum lands in buf (x must stay the input); the error is read after the first
        # call, later calls keep summing (in range: doubling per call)
        buf = x.to(dtype, copy=True)
        run(f"nccl all_reduce {tag}", "all_reduce", lambda: dist.all_reduce(buf), buf[mine], ref_chunk,
            lambda: int(2 * ring * numel * buf.element_size()))
    for fmt, dt in fp8_dtypes.items():
        raw_in = (x.float() / world).to(dt)  # unscaled fp8 inputs, NCCL's own fp8 sum
        raw_out = torch.empty(chunk, dtype=dt, device="cuda")
        run(f"nccl raw fp8 reduce_scatter {fmt}", "reduce_scatter",
            lambda: reduce_scatter_single(raw_out, raw_in, op=dist.ReduceOp.SUM), raw_out,
            ref_raw[fmt], lambda: int(ring * numel))
    out = torch.empty(chunk, dtype=torch.bfloat16, device="cuda")
    transports = [t for t in comm.TRANSPORTS if not (ARGS.network and t == "p2p")]
    for transport in transports:
        for fmt in ("e4m3", "e5m2"):
            run(f"lpdist reduce_scatter {transport} {fmt}", "reduce_scatter",
                lambda: comm.reduce_scatter(out, x, fmt=fmt, transport=transport), out, ref_chunk,
                lambda: comm.stats()[transport]["bytes_sent"])
    if world == 2:  # the two-rank exchange against the general one, same run
        all_to_all.TWO_RANK_ALL_GATHER = False
        run("lpdist reduce_scatter all_to_all e4m3 [all_to_all_single exchange]", "reduce_scatter",
            lambda: comm.reduce_scatter(out, x, fmt="e4m3"), out, ref_chunk,
            lambda: comm.stats()["all_to_all"]["bytes_sent"])
        all_to_all.TWO_RANK_ALL_GATHER = True
    for transport in transports:
        buf = x.clone()  # as for NCCL's all_reduce above: error of the first call, then in place
        run(f"lpdist all_reduce {transport} e4m3", "all_reduce",
            lambda: comm.all_reduce(buf, transport=transport), buf[mine], ref_chunk,
            lambda: sum(v["bytes_sent"] for v in comm.stats().values()))
    if with_breakdown:
        breakdown(run, x, chunk, ref_chunk)
    return run.rows


def nccl_group(priority: str):
    """All ranks in a NCCL group whose stream has ``priority`` ("normal": the default group)."""
    if priority == "normal":
        return None
    if priority != "high":
        raise ValueError(f"--sweep-streams takes normal and high, got {priority!r}")
    options = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    return dist.new_group(backend="nccl", pg_options=options)


def same_on_all_ranks(flag: bool) -> bool:
    t = torch.tensor([int(flag)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def sweep(rank: int, world: int, reps: int, warmup: int) -> list[dict]:
    """The all_to_all e4m3 reduce-scatter per (NCCL stream priority, grid cap, pieces), beside
    NCCL's bf16 reduce-scatter on the same group; rows carry the setting, the ratio to NCCL bf16
    on the first listed group (the default one) and on their own group, and whether the output
    matches the first row's."""
    chunk = elements(ARGS.sweep_size) // world
    x = rank_input(1000 + rank, chunk * world)
    out, nccl_out = (torch.empty(chunk, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    counts = [int(c) for c in ARGS.sweep_pieces.split(",")]
    caps = [int(c) for c in ARGS.sweep_ctas.split(",")]
    run = Runner(chunk * world, rank, world, reps, warmup)
    first, default_bf16 = None, None
    for priority in ARGS.sweep_streams.split(","):
        group = nccl_group(priority.strip())
        bf16 = run(f"nccl reduce_scatter bf16 [{priority} stream]", "reduce_scatter",
                   lambda: reduce_scatter_single(nccl_out, x, op=dist.ReduceOp.SUM, group=group))
        run.rows[-1].update(nccl_stream=priority)
        default_bf16 = default_bf16 or bf16  # the first listed group's
        for cap in caps:
            codec.grid_ctas_per_sm = cap or None
            for count in counts:
                ms = run(f"a2a e4m3 pieces={count} ctas/SM={cap or 'dflt'} [{priority}]", "reduce_scatter",
                         lambda: comm.reduce_scatter(out, x, group, fmt="e4m3", pieces=count))
                first = out.clone() if first is None else first
                run.rows[-1].update(nccl_stream=priority, pieces=count, ctas_per_sm=cap or kernels.GRID_CTAS_PER_SM,
                                    ratio_to_bf16=ms / default_bf16, ratio_to_bf16_same_group=ms / bf16,
                                    identical=same_on_all_ranks(torch.equal(out, first)))
    codec.grid_ctas_per_sm = None
    if rank == 0:
        print(f"\n{'NCCL stream':>11s} {'pieces':>6s} {'CTAs/SM':>7s} {'ms':>8s} {'/ bf16':>7s} "
              f"{'/ bf16 same group':>17s} identical")
        for r in run.rows:
            if "pieces" in r:
                print(f"{r['nccl_stream']:>11s} {r['pieces']:6d} {r['ctas_per_sm']:7d} {r['ms']:8.3f} "
                      f"{r['ratio_to_bf16']:6.3f}x {r['ratio_to_bf16_same_group']:16.3f}x {r['identical']}")
    return run.rows


def write_json(name: str, rows: list[dict], world: int, reps: int, **meta) -> None:
    """Write ``$OUT/<name>.json`` (rows and the run's setting) when OUT is set."""
    meta = dict(world=world, network_bound=ARGS.network, nccl=".".join(map(str, torch.cuda.nccl.version())),
                reps=reps, kernels=kernels.backend(), **meta)
    path = write_result(name, dict(meta=meta, rows=rows))
    if path:
        print("wrote", path)


#: What each of a row's two times measures, for the ratio tables.
TIME_NAMES = {"ms": "GPU time from an idle device (host issue included)",
              "queued_ms": "queued behind a spin kernel (device time alone)"}


def print_ratios(rows: list[dict]) -> None:
    """Set each lpdist row's ``ratio_to_bf16`` and ``queued_ratio_to_bf16`` (to NCCL bf16 of the
    same collective, size and round, idle and queued times) and print them, one line per row name
    and size: every round's ratio, then their median."""
    for key in ("ms", "queued_ms"):
        base = {(r["round"], r["elements"], r["collective"]): r[key] for r in rows if r["name"].endswith("bf16")}
        ratios: dict[tuple[int, str], list[float]] = {}
        for r in rows:
            if r["name"].startswith("lpdist"):
                ratio = r[key] / base[(r["round"], r["elements"], r["collective"])]
                r[f"{key.removesuffix('ms')}ratio_to_bf16"] = ratio
                ratios.setdefault((r["elements"], r["name"]), []).append(ratio)
        print(f"\nratio to NCCL bf16 of the same collective, size and round, {TIME_NAMES[key]}" +
              (" (each round, then the median):" if ARGS.rounds > 1 else ":"))
        for (numel, name), values in ratios.items():
            each = " ".join(f"{v:.3f}" for v in values) + (f"  median {statistics.median(values):.3f}"
                                                           if len(values) > 1 else "")
            print(f"{numel / 2**20:7.0f}M {name:44s} {each}x")


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
        print(f"{'size':>8s} {'collective':44s} {'GPU time':>12s} {'queued':>12s} {'host':>11s} "
              f"{'sent/rank':>13s} {'rel L2':>9s}")
    if ARGS.sweep_pieces:
        rows = sweep(rank, world, reps, ARGS.warmup)
        if rank == 0:
            write_json("bench_comm", rows, world, reps, sweep=True)
        dist.destroy_process_group()
        return 0
    rows = []
    for round_index in range(ARGS.rounds):
        for size in ARGS.sizes.split(","):
            size_rows = bench_size(elements(size), rank, world, reps, ARGS.warmup, ARGS.breakdown)
            rows += [dict(r, round=round_index) for r in size_rows]
            torch.cuda.empty_cache()
    if rank == 0:
        print_ratios(rows)
        tag = "network" if ARGS.network else "nvlink"
        write_json(f"bench_comm_{tag}_w{world}", rows, world, reps, breakdown=ARGS.breakdown, rounds=ARGS.rounds)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
