"""Worker for tests/test_ddp.py, started by torchrun (torch.distributed.run) with 2 CPU processes.

For each mode ("local": SAM-ON with a local first pass; "sync": plain SAM with a synchronised first
pass), each rank trains the same model on its own half of a batch with SAM under DDP and writes its
final parameters, the number of all-reduces per pass, and (rank 0) a single-process reference on the
concatenated batch. Both modes run in one launch: starting torchrun costs more than the training;
so do the FSDP2 cases of tests/fsdp_sam_cases.py.
"""

import sys

import fsdp_sam_cases  # next to this script, on sys.path when torchrun starts it
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from samnorm import SAM


def make():
    torch.manual_seed(0)
    # the 300 x 300 layer is above SAM's flat-buffer size: both of SAM's paths are exercised
    return nn.Sequential(
        nn.Linear(6, 300), nn.LayerNorm(300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 4)
    ).double()


def step(model, opt, x, y):
    with opt.first_pass(model):
        loss = nn.functional.cross_entropy(model(x), y)
    opt.first_step(loss)
    with opt.second_pass(model):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def run(out: str, sync: bool, rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(8 * world, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8 * world,), generator=g)
    calls = {"n": 0}

    def counting_hook(state, bucket):
        calls["n"] += 1
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    model = DDP(make())
    model.register_comm_hook(None, counting_hook)
    # synchronised: plain SAM, so large tensors are averaged too; local: SAM-ON
    opt = SAM(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        None if sync else model,
        rho=0.3,
        sync_first_pass=sync,
        model=model,
    )
    per_pass = []
    for _ in range(3):
        before = calls["n"]
        xs, ys = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
        with opt.first_pass(model):
            loss = nn.functional.cross_entropy(model(xs), ys)
        opt.first_step(loss)
        first = calls["n"] - before
        with opt.second_pass(model):
            nn.functional.cross_entropy(model(xs), ys).backward()
        opt.second_step(zero_grad=True)
        per_pass.append((first, calls["n"] - before - first))
    result = {"params": [p.detach().clone() for p in model.module.parameters()], "per_pass": per_pass}
    if rank == 0:
        ref = make()
        ref_opt = SAM(torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9), None if sync else ref, rho=0.3)
        for _ in range(3):
            step(ref, ref_opt, x, y)
        result["reference"] = [p.detach().clone() for p in ref.parameters()]
    torch.save(result, f"{out}.rank{rank}")


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in ("local", "sync"):
        run(f"{out}.{mode}", mode == "sync", rank, world)
    fsdp_sam_cases.run(f"{out}.fsdp", rank, world)
    # Rank 0 computes the reference alone; tearing gloo down while the peer is still busy aborted a
    # rank ("terminate called without an active exception") in 1 of 14 suite runs, so meet first.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
