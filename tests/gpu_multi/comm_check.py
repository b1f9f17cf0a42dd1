"""Multi-GPU checks of lpdist.comm over NCCL; exits non-zero on any failure.

    torchrun --nproc_per_node=2 tests/gpu_multi/comm_check.py     (or mpirun -n 2 python3 ...)

All transports (all_to_all with the csrc/reduce.cu kernels, p2p with stores into the peers'
workspaces, nccl with NCCL's fp8 sum), all three collectives, pipelining, error feedback, the
FSDP2 reduce-scatter and all-gather, the DDP hook and the FSDP1 hook, each against an fp64
reference within ``rms_error_bound`` (derived in its docstring); the all_to_all and p2p results
bit-identical to the torch twin, and p2p bit-identical to all_to_all in every mode (error
feedback and stochastic rounding included, and across workspace growth).
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn as nn

from lpdist import comm, kernels
from lpdist import dist as lpdist_dist
from lpdist.comm import rms_error_bound
from lpdist.quant import quantize

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    if dist.get_rank() == 0:
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def inputs(world: int, numel: int, base: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [torch.randn(numel, generator=torch.Generator().manual_seed(base + s), dtype=torch.float64)
            .to(dtype).cuda() for s in range(world)]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_reduce_scatter(rank: int, world: int) -> None:
    for transport in comm.TRANSPORTS:
        for fmt in ("e4m3", "e5m2"):
            for dtype in (torch.bfloat16, torch.float32):
                for chunk, pieces in ((1 << 20, None), ((1 << 20) + 333, 3)):
                    xs = inputs(world, world * chunk, chunk, dtype)
                    out = torch.empty(chunk, dtype=dtype, device="cuda")
                    kw = dict(pieces=pieces) if transport == "all_to_all" else {}
                    comm.reduce_scatter(out, xs[rank].clone(), op="avg", fmt=fmt, transport=transport, **kw)
                    ref = sum(x.double() for x in xs)[rank * chunk:(rank + 1) * chunk] / world
                    bound = rms_error_bound(fmt, roundings=2 if transport == "nccl" else 1)
                    bound += 2.0 ** -9 if dtype == torch.bfloat16 else 0.0
                    err = rel(out, ref)
                    check(f"reduce_scatter {transport} {fmt} {dtype} chunk={chunk}", err <= bound,
                          f"rel={err:.4f} bound={bound:.4f}")
                    if transport != "nccl":
                        expected = torch.zeros(chunk, device="cuda")
                        for x in xs:
                            q = quantize(x.view(world, chunk).cpu(), fmt, block=256)
                            expected = expected + q.dequantize(torch.float32)[rank].cuda()
                        expected = expected * torch.tensor(1.0 / world, dtype=torch.float32)
                        check(f"  bit-identical to the oracle ({transport} {fmt} {dtype})",
                              torch.equal(out, expected.to(dtype)))


def check_p2p_equals_all_to_all(rank: int, world: int) -> None:
    """p2p and all_to_all on the same inputs: the same bytes out, and the same residual after
    error feedback, in every mode (its own fast kernel and the general path), over sizes that
    make the workspace grow."""
    cases = [(1 << 12, "nearest", None, torch.bfloat16, None), ((1 << 22) + 8, "nearest", None, torch.bfloat16, 3),
             ((1 << 16) + 333, "nearest", None, torch.float32, 2), (1 << 16, "stochastic", None, torch.bfloat16, None),
             (1 << 16, "nearest", torch.float32, torch.float32, None),
             (1 << 20, "stochastic", torch.float32, torch.bfloat16, 4)]
    for chunk, rounding, res_dtype, dtype, pieces in cases:
        xs = inputs(world, world * chunk, 11, dtype)
        results = []
        for transport in ("all_to_all", "p2p"):
            out = torch.empty(chunk, dtype=dtype, device="cuda")
            residual = None if res_dtype is None else torch.full((world * chunk,), 1e-3, dtype=res_dtype, device="cuda")
            gen = torch.Generator().manual_seed(5)
            for _ in range(2):  # twice: the second call reuses the workspace (and the residual)
                comm.reduce_scatter(out, xs[rank].clone(), transport=transport, rounding=rounding,
                                    residual=residual, generator=gen, pieces=pieces if transport == "all_to_all" else None)
            results.append((out, residual))
        same = torch.equal(results[0][0], results[1][0]) and (
            res_dtype is None or torch.equal(results[0][1], results[1][1]))
        check(f"p2p bit-identical to all_to_all (pieces={pieces}) chunk={chunk} {rounding} "
              f"residual={res_dtype} {dtype}", same)
    from lpdist.comm.peer import release_workspaces

    release_workspaces()  # collective; the next p2p call maps new workspaces
    xs = inputs(world, world * 4096, 13, torch.bfloat16)
    outs = [torch.empty(4096, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    for out, transport in zip(outs, ("all_to_all", "p2p")):
        comm.reduce_scatter(out, xs[rank].clone(), transport=transport)
    check("p2p after release_workspaces bit-identical to all_to_all", torch.equal(*outs))


def check_all_reduce_and_gather(rank: int, world: int) -> None:
    for transport in comm.TRANSPORTS:
        n = 3_000_001
        xs = inputs(world, n, 7, torch.bfloat16)
        t = xs[rank].clone()
        comm.all_reduce(t, transport=transport)
        bound = rms_error_bound("e4m3", roundings=3 if transport == "nccl" else 2) + 2.0 ** -9
        err = rel(t, sum(x.double() for x in xs))
        check(f"all_reduce {transport} n={n}", err <= bound, f"rel={err:.4f} bound={bound:.4f}")
    out = torch.empty(world * 1000, dtype=torch.bfloat16, device="cuda")
    xs = inputs(world, 1000, 9, torch.bfloat16)
    comm.all_gather(out, xs[rank].clone())
    expected = torch.cat([quantize(x.cpu(), "e4m3", block=256).dequantize() for x in xs]).cuda()
    check("all_gather equals the oracle", torch.equal(out, expected))


def check_error_feedback(rank: int, world: int) -> None:
    for transport in comm.TRANSPORTS:
        chunk = 1 << 16
        xs = inputs(world, world * chunk, 3, torch.float32)
        residual = torch.zeros(world * chunk, device="cuda")
        total = torch.zeros(chunk, dtype=torch.float64, device="cuda")
        for _ in range(50):
            out = torch.empty(chunk, device="cuda")
            comm.reduce_scatter(out, xs[rank].clone(), transport=transport, residual=residual)
            total += out.double()
        ref = sum(x.double() for x in xs)[rank * chunk:(rank + 1) * chunk]
        err = rel(total / 50, ref)
        # all_to_all, p2p: only the residual's last step remains (< 0.5%); nccl: NCCL's fp8
        # rounding of the sum is not fed back, so its mean error stays at one rounding
        bound = rms_error_bound("e4m3") if transport == "nccl" else 0.005
        check(f"error feedback 50 calls {transport}", err <= bound, f"rel={err:.5f}")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()


def local_grad(p: nn.Parameter) -> torch.Tensor:
    """This rank's gradient of ``p``: the local shard of a DTensor (FSDP2), else ``p.grad``."""
    if p.grad is None:
        raise AssertionError(f"parameter {tuple(p.shape)} received no gradient")
    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    return grad.double().reshape(-1)


def train(m: nn.Module, rank: int, steps: int = 3) -> list[torch.Tensor]:
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    grads = []
    for step in range(steps):
        opt.zero_grad()
        x = torch.randn(32, 256, generator=torch.Generator().manual_seed(100 * step + rank)).cuda()
        m(x).square().mean().backward()
        grads.append(torch.cat([local_grad(p) for p in m.parameters()]))
        opt.step()
    return grads


def compare(name: str, fp8: list[torch.Tensor], ref: list[torch.Tensor], bound: float) -> None:
    err = max(rel(a, b) for a, b in zip(fp8, ref))
    check(name, 0 < err <= bound, f"max rel={err:.4f} bound={bound:.4f}")


def check_wrappers(rank: int, world: int) -> None:
    from torch.distributed.fsdp import (FullyShardedDataParallel, MixedPrecisionPolicy, ShardingStrategy,
                                        fully_shard)
    from torch.nn.parallel import DistributedDataParallel

    for reduce_dtype in (torch.float32, torch.bfloat16):
        for transport in comm.TRANSPORTS:
            def sharded() -> nn.Module:
                m = model()
                policy = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
                for layer in m:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mp_policy=policy)
                return fully_shard(m, mp_policy=policy)

            ref = train(sharded(), rank)
            m = sharded()
            comm.enable_fp8_reduce_scatter(m, transport=transport, error_feedback=True)
            bound = rms_error_bound("e4m3", roundings=2 if transport == "nccl" else 1)
            bound += 2.0 ** -8 if reduce_dtype == torch.bfloat16 else 0.0
            compare(f"FSDP2 FP8ReduceScatter {transport} reduce_dtype={reduce_dtype}", train(m, rank), ref, bound)
    ref = train(DistributedDataParallel(model()), rank)
    m = DistributedDataParallel(model())
    m.register_comm_hook(comm.DDPHookState(error_feedback=True), comm.fp8_ddp_hook)
    compare("DDP fp8_ddp_hook", train(m, rank), ref, rms_error_bound("e4m3", roundings=2))
    for strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.NO_SHARD):
        # use_orig_params=False: parameters() is the flat parameter, whose .grad is this rank's
        # shard of the reduce-scattered gradient (with use_orig_params=True an original parameter
        # lying wholly in another rank's shard has grad None on this rank)
        def wrapped() -> nn.Module:
            return FullyShardedDataParallel(model(), sharding_strategy=strategy, use_orig_params=False,
                                            device_id=torch.cuda.current_device())
        ref = train(wrapped(), rank)
        m = wrapped()
        m.register_comm_hook(comm.FSDPHookState(), comm.fp8_fsdp_hook)
        roundings = 1 if strategy == ShardingStrategy.FULL_SHARD else 2
        compare(f"FSDP1 fp8_fsdp_hook {strategy.name}", train(m, rank), ref, rms_error_bound("e4m3", roundings=roundings))


def main() -> int:
    rank, world, _, _ = lpdist_dist.init()  # torchrun or mpirun; NCCL on cuda:<local rank>
    check("CuPy kernels active", kernels.backend() == "cupy")
    for step in (check_reduce_scatter, check_p2p_equals_all_to_all, check_all_reduce_and_gather,
                 check_error_feedback, check_wrappers):
        try:
            step(rank, world)
        except Exception:  # report and go on: one broken step must not hide the others
            traceback.print_exc()
            check(step.__name__, False, "raised")
    torch.cuda.synchronize()
    failed = torch.tensor([len(FAILURES)], device="cuda")
    dist.all_reduce(failed)
    lpdist_dist.destroy()
    if rank == 0:
        print("comm_check:", "PASS" if failed.item() == 0 else f"{failed.item()} failures")
    return 0 if failed.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
