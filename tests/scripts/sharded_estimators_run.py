"""Every estimator on vectors sharded over WORLD CPU processes (gloo), for tests/test_spaces.py.

Usage: python sharded_estimators_run.py OUT.json WORLD PORT [SHAPES]

SHAPES: the parameters' shapes as JSON (default ``[[7, 3], [5], [2, 4]]``); ``[[2, 4], [2, 3]]`` on 3 processes leaves
the third with no entry at all.

A dense symmetric float64 matrix acts on the flat vector of three "parameters", each sharded along its first
dimension as FSDP2 shards (rows in chunks of ``ceil(rows / world)``; the last ranks may hold fewer rows or none). Each
process holds its rows of every vector; the operator gathers the whole vector for its product and keeps its own rows.
Rank 0 writes what every estimator returned (eigenvectors gathered whole, in the global order) and what every rank
checked.
"""

import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_curvature.estimators import (
    deflated_hutchinson_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from lightning_curvature.spaces import Piece, ShardedSpace

SHAPES = [(7, 3), (5,), (2, 4)]  # P = 34; with 3 ranks the (2, 4) parameter leaves rank 2 without a row


def matrix() -> torch.Tensor:
    """A symmetric matrix with a gap at the top, a repeated pair below it and a negative end."""
    P = sum(math.prod(s) for s in SHAPES)
    return spectrum_matrix(torch.cat([torch.tensor([10.0, 6.0, 6.0]),
                                      torch.linspace(-2.0, 3.0, P - 3, dtype=torch.float64)]))


def spectrum_matrix(spectrum: torch.Tensor) -> torch.Tensor:
    """``Q diag(spectrum) Qᵀ`` for a fixed random orthogonal ``Q``."""
    P = spectrum.numel()
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return (Q * spectrum.to(torch.float64)) @ Q.T


def pieces(rank: int, world: int) -> list[Piece]:
    out = []
    for shape in SHAPES:
        chunk = math.ceil(shape[0] / world)
        lo = min(rank * chunk, shape[0])
        hi = min(lo + chunk, shape[0])
        out.append(Piece(shape, (lo,) + (0,) * (len(shape) - 1), (hi - lo,) + tuple(shape[1:])))
    return out


def global_index(rank: int, world: int) -> torch.Tensor:
    """Positions of this rank's entries in the whole flat vector."""
    parts, start = [], 0
    for shape, piece in zip(SHAPES, pieces(rank, world)):
        numel = math.prod(shape)
        parts.append(piece.take(torch.arange(start, start + numel).reshape(-1, 1))[:, 0])
        start += numel
    return torch.cat(parts)


class ShardedDense:
    def __init__(self, H: torch.Tensor, rank: int, world: int) -> None:
        self.H, self.rank, self.world = H, rank, world
        self.space = ShardedSpace(pieces(rank, world))
        self.index = [global_index(r, world) for r in range(world)]
        n = self.index[rank].numel()
        self.shape, self.dtype, self.device = (n, n), H.dtype, torch.device("cpu")
        self.num_matvecs = 0

    def whole(self, v: torch.Tensor) -> torch.Tensor:
        """The whole vectors (columns) from every rank's rows (padded to the longest: gloo gathers equal sizes)."""
        v = v if v.ndim == 2 else v.reshape(-1, 1)
        longest = max(i.numel() for i in self.index)
        padded = torch.zeros((longest, v.shape[1]), dtype=v.dtype)
        padded[: v.shape[0]] = v
        parts = [torch.empty_like(padded) for _ in self.index]
        dist.all_gather(parts, padded)
        out = torch.empty((self.space.dim, v.shape[1]), dtype=v.dtype)
        for idx, part in zip(self.index, parts):
            out[idx] = part[: idx.numel()]
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return (self.H @ self.whole(v))[self.index[self.rank], 0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        return (self.H @ self.whole(V))[self.index[self.rank]]


def run(rank: int, world: int, out: str, port: str, shapes: list) -> None:
    SHAPES[:] = [tuple(s) for s in shapes]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    op = ShardedDense(matrix(), rank, world)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(0)

    results = {}
    top = lanczos(op, k=3, tol=1e-10, max_iter=300, generator=gen())
    results["lanczos"] = {"values": top.eigenvalues.tolist(), "converged": top.converged.tolist(),
                          "residuals": top.residuals.tolist(), "vectors": op.whole(top.eigenvectors).T.tolist()}
    block = lanczos(op, k=3, block_size=3, tol=1e-10, max_iter=300, generator=gen())
    results["lanczos_block"] = {"values": block.eigenvalues.tolist(), "converged": block.converged.tolist()}
    low = lanczos(op, k=1, which="SA", tol=1e-10, max_iter=300, generator=gen())
    results["lanczos_sa"] = {"values": low.eigenvalues.tolist(), "converged": low.converged.tolist()}
    warm = lanczos(op, k=3, tol=1e-10, max_iter=300, init=top.eigenvectors, generator=gen())
    results["lanczos_warm"] = {"values": warm.eigenvalues.tolist(), "num_matvecs": warm.num_matvecs,
                               "cold_matvecs": top.num_matvecs}
    power = power_iteration(op, k=1, tol=1e-10, max_iter=2000, generator=gen())
    results["power"] = {"values": power.eigenvalues.tolist(), "converged": power.converged.tolist()}
    power_warm = power_iteration(op, k=2, tol=1e-10, max_iter=2000, init=top.eigenvectors[:, 0], generator=gen())
    results["power_warm"] = {"values": power_warm.eigenvalues.tolist()}
    # the whole space as Hutch++'s sketch, in float32, on a spectrum H S shrinks to rounding: still exact
    P = op.space.dim
    spike = ShardedDense(spectrum_matrix(torch.cat([torch.tensor([100.0]), torch.full((P - 1,), 0.01)])).float(),
                         rank, world)
    results["hutchpp_whole_space"] = hutchpp_trace(spike, 3 * P, generator=gen()).value
    for name, fn in (("hutchinson", lambda: hutchinson_trace(op, 30, generator=gen())),
                     ("normal", lambda: hutchinson_trace(op, 30, distribution="normal", generator=gen())),
                     ("hutchpp", lambda: hutchpp_trace(op, 30, generator=gen())),
                     ("deflated", lambda: deflated_hutchinson_trace(op, top.eigenvectors, 20,
                                                                    eigenvalues=top.eigenvalues, generator=gen())),
                     ("deflated_qr", lambda: deflated_hutchinson_trace(op, top.eigenvectors, 20, generator=gen()))):
        tr = fn()
        results[name] = {"value": tr.value, "stderr": tr.stderr, "samples": tr.samples}
    dens = spectral_density(op, num_probes=3, num_steps=12, generator=gen())
    results["density"] = {"nodes": dens.nodes.tolist(), "weights": dens.weights.tolist()}
    # every rank got the same small numbers, so took the same branches
    mine = torch.tensor([top.eigenvalues.sum(), float(top.num_matvecs), results["hutchpp"]["value"],
                         float(op.num_matvecs)], dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    results["ranks_agree"] = all(torch.equal(t, mine) for t in gathered)
    results["local_sizes"] = [i.numel() for i in op.index]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    out_path, world_size, port = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    shapes = json.loads(sys.argv[4]) if len(sys.argv) > 4 else SHAPES
    mp.spawn(run, args=(world_size, out_path, port, shapes), nprocs=world_size, join=True)
    print("RUN COMPLETE", flush=True)
