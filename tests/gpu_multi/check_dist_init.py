"""lpdist.dist.init on GPUs: NCCL backend, one device per local rank, a correct all_reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lpdist import dist as lpdist_dist


def main() -> None:
    rank, world_size, local_rank, device = lpdist_dist.init()
    assert dist.get_backend() == "nccl", dist.get_backend()
    assert device == torch.device("cuda", local_rank) and torch.cuda.current_device() == local_rank
    uuids: list[str | None] = [None] * world_size
    dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid))
    assert len(set(uuids)) == world_size, f"ranks share a GPU: {uuids}"

    data = [torch.randn(1 << 20, dtype=torch.float64, generator=torch.Generator().manual_seed(11 + r))
            for r in range(world_size)]
    total = data[rank].to(device, copy=True)
    dist.all_reduce(total)
    reference = torch.stack(data).sum(0)
    # NCCL may sum in any order: allow a few float64 ulps of the summed magnitudes.
    bound = 2.0**-52 * world_size * torch.stack(data).abs().sum(0)
    assert torch.all((total.cpu() - reference).abs() <= bound), (total.cpu() - reference).abs().max()
    if lpdist_dist.is_main():
        print(f"OK: {world_size} ranks, nccl, distinct devices, float64 all_reduce of 2^20 elements")
    lpdist_dist.destroy()


if __name__ == "__main__":
    main()
