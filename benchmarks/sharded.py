"""Memory per process and cost per product of the estimators under FSDP2 (``fully_shard``), CPU processes over gloo.

    python benchmarks/sharded.py [--hidden 2048] [--batch 64] [--products 40] [--worlds 1,2]

A 1024-H-1024-10 tanh MLP (``--hidden 2048``: P = 4.2M float32 parameters), each linear layer and the whole model
``fully_shard``ed over a 1-D CPU mesh of ``world`` processes; every process holds ``batch`` examples. For each world
size and each way of holding the estimators' vectors (``whole``: every process holds all P entries of each vector,
``local``: each holds the entries of its own parameter shards), fresh processes run

- ``lanczos(k=1)`` through ``FiniteDifferenceOperator(..., vectors=...)`` for exactly ``--products`` products (``tol``
  unreachable; the 20-vector basis restarts), and
- ``hutchinson_trace`` with 10 probes,

after one warm-up product, and report per process (the largest over the ranks): the peak resident memory the
estimate added (``VmHWM`` after ``/proc/self/clear_refs``, with ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB so that freed
vectors leave at once; see ``memory.py``), that memory in vectors of ``P`` float32s, and the wall time per product
against one ordinary forward + backward of the same sharded model (``FSDP gradient``, the fastest of 5 before and 5
after the estimates), all in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from memory import _peak_mb, _reset_peak, _rss_mb  # noqa: E402


def _rank(rank: int, world: int, args: argparse.Namespace, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn

    from lightning_curvature import hutchinson_trace, lanczos
    from lightning_curvature.finite_difference import FiniteDifferenceOperator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 1024), nn.Tanh(),
                          nn.Linear(1024, 10))
    P = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2], model[4], model):
        fully_shard(layer, mesh=mesh)
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, 1024, generator=g), torch.randint(0, 10, (args.batch,), generator=g)

    def closure(m: nn.Module) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    def gradient_seconds() -> float:
        best = float("inf")
        for _ in range(5):
            dist.barrier()
            start = time.perf_counter()
            closure(model).backward()
            best = min(best, time.perf_counter() - start)
            for p in model.parameters():
                p.grad = None
        return best

    rows = []
    for vectors in ("whole", "local"):
        op = FiniteDifferenceOperator(model, closure, vectors=vectors, asymmetry_tol=None)
        op.matvec(torch.ones(op.shape[0]))  # warm-up
        grad = gradient_seconds()
        timed = []
        for name, run in (
            ("lanczos", lambda op=op: lanczos(op, k=1, tol=1e-30, max_iter=args.products,
                                              generator=torch.Generator().manual_seed(0)).num_matvecs),
            ("hutchinson", lambda op=op: hutchinson_trace(op, 10,
                                                          generator=torch.Generator().manual_seed(0)).num_matvecs),
        ):
            dist.barrier()
            base = _rss_mb()
            _reset_peak()
            start = time.perf_counter()
            products = run()
            seconds = time.perf_counter() - start
            extra = _peak_mb() - base
            timed.append({"vectors": vectors, "run": name, "local": op.shape[0], "extra_mb": extra,
                          "in_vectors": extra * 2**20 / (4 * P), "seconds": seconds / products, "products": products})
        grad = min(grad, gradient_seconds())  # the fastest gradient, before or after the estimates
        rows += [{**row, "per_product": row.pop("seconds") / grad} for row in timed]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        merged = []
        for i, row in enumerate(gathered[0]):
            others = [g[i] for g in gathered]
            merged.append({**row, "extra_mb": max(o["extra_mb"] for o in others),
                           "in_vectors": max(o["in_vectors"] for o in others),
                           "per_product": max(o["per_product"] for o in others),
                           "local": max(o["local"] for o in others), "params": P, "world": world})
        with open(out, "w") as f:
            json.dump(merged, f)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--child", nargs=3, metavar=("RANK", "WORLD", "PORT_OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rank, world = int(args.child[0]), int(args.child[1])
        port, out = args.child[2].split(":", 1)
        _rank(rank, world, args, int(port), out)
        sys.stderr.flush()
        os._exit(0)  # gloo may abort in its C++ teardown after a complete run
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    print("| processes | vectors | run | entries per vector and process | peak extra MB per process | in vectors "
          "of P | product / FSDP gradient |")
    print("|---|---|---|---|---|---|---|")
    for port, world in enumerate((int(w) for w in args.worlds.split(",")), start=29700):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            cmd = [sys.executable, __file__, "--hidden", str(args.hidden), "--batch", str(args.batch), "--products",
                   str(args.products)]
            procs = [subprocess.Popen(cmd + ["--child", str(r), str(world), f"{port}:{out}"], env=env)
                     for r in range(world)]
            for proc in procs:
                proc.wait()
            with open(out) as f:
                rows = json.load(f)
        for r in rows:
            print(f"| {r['world']} | {r['vectors']} | {r['run']} ({r['products']} products) | {r['local']:,} of "
                  f"{r['params']:,} | {r['extra_mb']:.0f} | {r['in_vectors']:.1f} | {r['per_product']:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
