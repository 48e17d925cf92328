"""GPU check (not collected by pytest; CI has no GPU): the learner's gradient all-reduce
over NCCL on 2 GPUs gives every rank the mean gradient, in float32 and bfloat16.

    python tests/gpu/check_nccl_allreduce.py      # on a machine with >= 2 CUDA GPUs
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from actors.learner import _allreduce_mean  # noqa: E402


def worker(rank: int, world: int, port: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.nn.Parameter(torch.zeros(64, 8, device="cuda", dtype=dtype)),
                  torch.nn.Parameter(torch.zeros(8, device="cuda", dtype=dtype))]
        for i, p in enumerate(params):
            p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
        _allreduce_mean(params, world)
        want = [sum(r + 1 for r in range(world)) / world * (i + 1) for i in range(2)]
        out[str(dtype)] = all(torch.allclose(p.grad.float(), torch.full_like(p.grad.float(), w))
                              for p, w in zip(params, want))
    q.put((rank, out))
    dist.destroy_process_group()


if __name__ == "__main__":
    world = min(2, torch.cuda.device_count())
    assert world == 2, f"needs 2 GPUs, found {torch.cuda.device_count()}"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, world, 29517, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    print(results)
    assert all(all(v.values()) for v in results.values()), results
    print("OK: NCCL all-reduce gives every rank the mean gradient (float32, bfloat16)")
