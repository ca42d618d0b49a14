"""Finite-difference products through FSDP2 (``fully_shard``) on 2 CPU processes (gloo), for test_finite_difference.

Usage: RANK=r WORLD_SIZE=2 MASTER_PORT=port python fsdp_fd_run.py OUT.json   (one process per rank)

Each rank holds half of a batch of 16; FSDP's backward averages the rank gradients, so the products are those of the
Hessian of the loss on the whole batch. Rank 0 writes 4 probes, their products (whole, gathered), the reference
Hessian of the unsharded model on the whole batch (float64, reverse-over-reverse), the top eigenvalue that
``lanczos`` finds through the operator, and the checks every rank made.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_curvature import lanczos
from lightning_curvature.finite_difference import FiniteDifferenceOperator

sys.path.insert(0, os.path.dirname(__file__))
from dense_reference import cross_entropy_hessian, sharded_problem  # noqa: E402


def run(rank: int, world: int, out: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def wrap(model: nn.Module) -> nn.Module:
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2], model):
            fully_shard(layer, mesh=mesh)
        return model

    model, reference, (x, y), (xs, ys) = sharded_problem(rank, world, wrap)
    shards = [(p.to_local().clone(), p.to_local().data_ptr()) for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]

    op = FiniteDifferenceOperator(model, lambda m: F.cross_entropy(m(xs), ys))
    P = op.shape[0]
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = op.matmat(V)
    top = lanczos(op, k=1, tol=1e-4, generator=torch.Generator().manual_seed(0))
    # the same products on this process's shards of the vectors: the same step, so the same numbers to rounding
    local = FiniteDifferenceOperator(model, lambda m: F.cross_entropy(m(xs), ys), vectors="local")
    space = local.space
    HV_local = space.whole(local.matmat(space.local(V)))
    top_local = lanczos(local, k=1, tol=1e-4, generator=torch.Generator().manual_seed(0))
    sizes = [None] * world
    dist.all_gather_object(sizes, local.shape[0])
    checks = {
        "whole_vectors": P == sum(p.numel() for p in reference.parameters()),
        "local_vectors": sum(sizes) == P and max(sizes) < P and space.dim == P,
        "local_products": float(((HV_local - HV).norm(dim=0) / HV.norm(dim=0)).max()) <= 1e-9,
        "local_round_trip": torch.equal(space.local(space.whole(space.local(V))), space.local(V)),
        "shards_restored": all(torch.equal(p.to_local(), v) and p.to_local().data_ptr() == ptr
                               for p, (v, ptr) in zip(model.parameters(), shards)),
        "grads_restored": all(p.grad is g for p, g in zip(model.parameters(), grads)),
    }
    # every rank computed the same whole matrix and eigenvalue (estimators take the same branches everywhere)
    mine = torch.cat([HV.reshape(-1), top.eigenvalues.reshape(-1)])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    checks["ranks_agree"] = all(torch.equal(t, mine) for t in gathered)
    all_checks = [None] * world
    dist.all_gather_object(all_checks, checks)
    if rank == 0:
        H = cross_entropy_hessian(reference, x, y)
        with open(out, "w") as f:
            json.dump({"probes": V.tolist(), "products": HV.tolist(), "reference": H.tolist(),
                       "lambda_max": float(top.eigenvalues[0]), "lambda_max_local": float(top_local.eigenvalues[0]),
                       "checks": all_checks}, f)
    dist.destroy_process_group()
    print("RUN COMPLETE", flush=True)


if __name__ == "__main__":
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
    # gloo sometimes aborts at interpreter exit after a complete run ("terminate called without an active exception",
    # rc -6, from a joinable thread destroyed during static teardown); leave without running the C++ destructors
    sys.stderr.flush()
    os._exit(0)
