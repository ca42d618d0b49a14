"""The problem of the sharded-run scripts and its reference, the dense float64 Hessian of the whole batch's loss."""

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def sharded_problem(rank: int, world: int, wrap: Callable[[nn.Module], nn.Module]):
    """A 5-8-3 tanh MLP (float64) wrapped by ``wrap`` (FSDP2 or FSDP1), an unwrapped copy, a batch of 16 and this
    rank's share of it; the wrapped model's (sharded) ``.grad`` already holds one backward of that share."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    model = wrap(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    F.cross_entropy(model(xs), ys).backward()  # the user's own (sharded) .grad
    return model, reference, (x, y), (xs, ys)


def cross_entropy_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇²`` of ``cross_entropy(model(x), y)`` with respect to the flat parameters (reverse over reverse)."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, theta)
