"""Finite-difference products through FSDP1 (``FullyShardedDataParallel``, ``use_orig_params=True``) on 2 CPU
processes (gloo), for test_finite_difference.

Usage: RANK=r WORLD_SIZE=2 MASTER_PORT=port python fsdp1_fd_run.py OUT.json   (one process per rank)

FSDP1 keeps each parameter, outside forward and backward, as a 1-D slice of its flattened entries (here one rank holds
none of a bias). Each rank holds half of a batch of 16; FSDP's backward averages the rank gradients. Rank 0 writes the
reference Hessian of the unsharded model on the whole batch (float64), the products of 4 probes through
``FiniteDifferenceOperator(vectors="local")`` gathered whole, the top eigenvalue and a trace estimate through it, and
the checks every rank made.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_curvature import hutchinson_trace, lanczos
from lightning_curvature.finite_difference import FiniteDifferenceOperator

sys.path.insert(0, os.path.dirname(__file__))
from dense_reference import cross_entropy_hessian, sharded_problem  # noqa: E402


def run(rank: int, world: int, out: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def wrap(model: nn.Module) -> nn.Module:
        model[2] = FSDP(model[2], use_orig_params=True, device_id=torch.device("cpu"))
        return FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))

    model, reference, (x, y), (xs, ys) = sharded_problem(rank, world, wrap)
    shards = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]

    def closure(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(xs), ys)

    checks = {}
    try:
        FiniteDifferenceOperator(model, closure)
        checks["whole_refused"] = False
    except ValueError as err:
        checks["whole_refused"] = "vectors='local'" in str(err)
    op = FiniteDifferenceOperator(model, closure, vectors="local")
    space = op.space
    P = space.dim
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    HV = space.whole(op.matmat(space.local(V)))
    top = lanczos(op, k=2, tol=1e-6, generator=torch.Generator().manual_seed(0))
    trace = hutchinson_trace(op, 30, generator=torch.Generator().manual_seed(0))
    sizes = [None] * world
    dist.all_gather_object(sizes, op.shape[0])
    checks.update({
        "local_vectors": sum(sizes) == P == sum(p.numel() for p in reference.parameters()) and max(sizes) < P,
        "shards_restored": all(torch.equal(p, v) and p.data_ptr() == ptr
                               for p, (v, ptr) in zip(model.parameters(), shards)),
        "grads_restored": all(p.grad is g for p, g in zip(model.parameters(), grads)),
    })
    all_checks = [None] * world
    dist.all_gather_object(all_checks, checks)
    if rank == 0:
        H = cross_entropy_hessian(reference, x, y)
        with open(out, "w") as f:
            json.dump({"probes": V.tolist(), "products": HV.tolist(), "reference": H.tolist(),
                       "eigenvalues": top.eigenvalues.tolist(), "converged": top.converged.tolist(),
                       "trace": trace.value, "trace_stderr": trace.stderr, "checks": all_checks}, f)
    dist.destroy_process_group()
    print("RUN COMPLETE", flush=True)


if __name__ == "__main__":
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
    # gloo sometimes aborts at interpreter exit after a complete run; leave without running the C++ destructors
    sys.stderr.flush()
    os._exit(0)
