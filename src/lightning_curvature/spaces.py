r"""Vectors split across processes: how the estimators reduce and draw when each process holds a shard.

Plain torch (``torch.distributed``, no Lightning). An operator whose vectors are *local shards* (each process holds
the entries of its own parameter shards, as under FSDP2's ``fully_shard``) carries a :class:`ShardedSpace` as its
``space`` attribute. The estimators in :mod:`~lightning_curvature.estimators` then

- sum every inner product, Gram matrix and norm over the processes (:meth:`ShardedSpace.sum`,
  :meth:`ShardedSpace.norms`), so every process sees the same small numbers and takes the same branches, and
- draw every random vector (probes, start vectors) through :meth:`ShardedSpace.draw`, which gives each process the
  entries of *one global vector* that does not depend on how many processes share it: the values of each parameter
  are drawn whole from a generator keyed by ``(seed, parameter, column)`` and each process keeps its slice. A
  1-process and a 2-process run therefore estimate with the same probes and agree to rounding.

Memory per process is then ``O(P / world)`` per vector; drawing costs ``O(P)`` time on every process (each draws
every parameter whole, keeping only its slice) and ``O(largest parameter)`` memory.

Operators without ``space`` hold whole vectors, and the estimators run exactly as on one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FlatPiece", "Piece", "ShardedSpace", "shard_of", "space_of", "whole_of"]

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constants that spread parameter and column indices over seeds (Knuth's
_GOLDEN_2 = 0xC2B2AE3D27D4EB4F  # multiplicative hashing; the second from MurmurHash3's finaliser)


@dataclass(frozen=True)
class Piece:
    """Where this process's shard of one parameter lies in the whole parameter.

    Attributes:
        shape: the whole parameter's shape.
        offset: the global index of the shard's first entry along each dimension.
        local_shape: the shard's shape (a box ``offset .. offset + local_shape``; empty shards have a zero extent).
    """

    shape: tuple[int, ...]
    offset: tuple[int, ...]
    local_shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return math.prod(self.local_shape)

    def take(self, whole: Tensor) -> Tensor:
        """This shard's ``(local, m)`` entries of ``whole`` (``(numel, m)``, in row-major order)."""
        box = whole.reshape(*self.shape, whole.shape[-1])
        index = tuple(slice(o, o + s) for o, s in zip(self.offset, self.local_shape))
        return box[index].reshape(self.local_numel, whole.shape[-1])


@dataclass(frozen=True)
class FlatPiece:
    """This process's shard of one parameter as a range of its flattened entries (FSDP1's ``use_orig_params`` views).

    Attributes:
        shape: the whole parameter's shape.
        start: the index of the shard's first entry in the flattened parameter.
        length: how many consecutive entries the shard holds (possibly none).
    """

    shape: tuple[int, ...]
    start: int
    length: int

    @property
    def offset(self) -> tuple[int, ...]:
        return (self.start,)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return (self.length,)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def local_numel(self) -> int:
        return self.length

    def take(self, whole: Tensor) -> Tensor:
        """This shard's ``(length, m)`` rows of ``whole`` (``(numel, m)``)."""
        return whole[self.start:self.start + self.length]


class ShardedSpace:
    """Vectors whose entries are split over the processes of a group, one shard of each parameter per process.

    Args:
        pieces: this process's :class:`Piece` (or :class:`FlatPiece`) of each parameter, in the order of its flat
            (local) vector.
        group: the process group the parameters are sharded over (default: the world).

    Attributes:
        dim: the global dimension ``P`` (the sum of the whole parameters' sizes).
        local_dim: the entries this process holds.
    """

    distributed = True

    def __init__(self, pieces: Sequence[Piece | FlatPiece], group: object | None = None) -> None:
        self.pieces = list(pieces)
        self.group = group
        self.dim = sum(p.numel for p in self.pieces)
        self.local_dim = sum(p.local_numel for p in self.pieces)
        self._layouts: list[list[Piece | FlatPiece]] | None = None

    # ------------------------------------------------------------------ reductions
    def _gather(self, t: Tensor) -> Tensor:
        """``(world, *t.shape)``: every process's ``t``, in rank order (the same tensor on every process)."""
        import torch.distributed as dist

        world = dist.get_world_size(self.group)
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)

    def sum(self, t: Tensor) -> Tensor:
        """The sum over processes of a small tensor of partial sums, accumulated in float64 in rank order.

        Gathered and summed in a fixed order (not all-reduced), so the result is bitwise the same on every process
        and every process takes the same branch on it. Returns ``t``'s dtype and device.
        """
        return self._gather(t.detach().to(torch.float64)).sum(dim=0).to(dtype=t.dtype)

    def all(self, flag: bool, device: torch.device | str) -> bool:
        """Whether ``flag`` holds on every process.

        For choices every process must make alike (a warm start, an extra product), lest some enter a collective the
        others skip.
        """
        return bool(self.sum(torch.tensor(float(not flag), dtype=torch.float64, device=device)) == 0)

    def norms(self, local: Tensor) -> Tensor:
        """Global norms from this process's norms of its shards (any shape; without overflow or underflow)."""
        parts = self._gather(local.detach().to(torch.float64))
        scale = parts.abs().amax(dim=0)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (torch.linalg.vector_norm(parts / safe, dim=0) * scale).to(local.dtype)

    def local(self, x: Tensor) -> Tensor:
        """This process's rows of whole ``(P,)`` or ``(P, m)`` vectors (no collective): the inverse of :meth:`whole`."""
        columns = x if x.ndim == 2 else x.reshape(-1, 1)  # (reshape(n, -1) fails for n = 0)
        parts, start = [], 0
        for piece in self.pieces:
            parts.append(piece.take(columns[start:start + piece.numel]))
            start += piece.numel
        out = torch.cat(parts) if parts else columns[:0]
        return out.reshape(-1) if x.ndim == 1 else out

    def whole(self, x: Tensor) -> Tensor:
        """The whole ``(P,)`` or ``(P, m)`` vectors from every process's rows ``x`` (a collective; ``O(P)`` memory).

        For a result you want in one piece (an eigenvector to save or to compare); the estimators never need it.
        """
        import torch.distributed as dist

        if self._layouts is None:  # every process's pieces, once
            layouts: list[object] = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(layouts, self.pieces, group=self.group)
            self._layouts = layouts  # type: ignore[assignment]
        columns = x if x.ndim == 2 else x.reshape(-1, 1)  # (reshape(n, -1) fails for n = 0)
        sizes = [sum(p.local_numel for p in pieces) for pieces in self._layouts]  # type: ignore[union-attr]
        padded = columns.new_zeros((max(sizes), columns.shape[1]))  # gloo gathers equal sizes only
        padded[: columns.shape[0]] = columns
        parts = self._gather(padded)
        out = columns.new_empty((self.dim, columns.shape[1]))
        for pieces, part in zip(self._layouts, parts):  # type: ignore[arg-type]
            start, local = 0, 0
            for piece in pieces:
                index = piece.take(torch.arange(start, start + piece.numel, device=x.device).reshape(-1, 1))[:, 0]
                out[index] = part[local:local + piece.local_numel]
                start += piece.numel
                local += piece.local_numel
        return out.reshape(self.dim) if x.ndim == 1 else out

    # ------------------------------------------------------------------ random vectors
    def draw(self, m: int, distribution: str, generator: torch.Generator | None, dtype: torch.dtype,
             device: torch.device | str) -> Tensor:
        """This process's ``(local_dim, m)`` rows of ``m`` global random vectors (Rademacher or standard normal).

        One seed is drawn from ``generator`` (the same on every process, which holds the same generator state); the
        entries of parameter ``i`` in column ``j`` come from a generator seeded by ``(seed, i, j)``, drawn whole and
        sliced, so the global vector is the same whatever the number of processes, and at most one whole parameter
        is in memory at a time. With ``generator=None`` each process seeds from its own global RNG: the vector is
        still a valid random vector, but no longer the same on another number of processes.
        """
        gen_device = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
        out = torch.empty((self.local_dim, m), dtype=dtype, device=device)
        g = torch.Generator(device=gen_device)
        for j in range(m):  # a column at a time: one whole parameter in memory at once, not m
            start = 0
            for i, piece in enumerate(self.pieces):
                g.manual_seed((seed + _GOLDEN * (i + 1) + _GOLDEN_2 * j) % 2**63)
                if distribution == "rademacher":
                    whole = torch.randint(0, 2, (piece.numel, 1), generator=g, device=gen_device, dtype=torch.int8)
                    part = piece.take(whole).to(device=device, dtype=dtype).mul_(2).sub_(1)
                else:
                    whole = torch.randn((piece.numel, 1), generator=g, device=gen_device, dtype=dtype)
                    part = piece.take(whole).to(device)
                out[start:start + piece.local_numel, j:j + 1] = part
                start += piece.local_numel
        return out

    def __repr__(self) -> str:
        return f"ShardedSpace(P={self.dim}, local={self.local_dim}, parameters={len(self.pieces)})"


def shard_of(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (FSDP2 ``fully_shard``; a view of the parameter's storage), or ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def whole_of(t: Tensor) -> Tensor:
    """The whole of a DTensor, gathered from every process (a collective), or ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def space_of(op: object) -> ShardedSpace | None:
    """The operator's :class:`ShardedSpace`, or ``None`` when its vectors are whole on this process."""
    return getattr(op, "space", None)
