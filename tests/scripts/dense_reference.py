"""The dense float64 Hessian of a cross-entropy loss over a whole batch: the reference of the sharded-run scripts."""

import torch
import torch.nn.functional as F
from torch import nn


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
