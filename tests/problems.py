"""The shared list of small test problems: a module, a loss on a fixed batch, and exact float64 references.

Every problem has P <= a few hundred parameters, so dense Hessians are cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Problem:
    name: str
    model: nn.Module
    criterion: Callable[[Tensor, Tensor], Tensor]
    inputs: Tensor
    targets: Tensor

    def params(self) -> dict[str, Tensor]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}

    def loss_fn(self) -> Callable[[dict[str, Tensor]], Tensor]:
        def f(theta: dict[str, Tensor]) -> Tensor:
            return self.criterion(torch.func.functional_call(self.model, theta, (self.inputs,)), self.targets)

        return f

    def dense_hessian(self) -> Tensor:
        """Reference Hessian via torch.func.hessian on the flattened parameters (float64, math SDPA kernel)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        params = self.params()
        names = list(params)
        shapes = [p.shape for p in params.values()]
        numels = [p.numel() for p in params.values()]
        flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
        loss_fn = self.loss_fn()

        def f(x: Tensor) -> Tensor:
            parts = torch.split(x, numels)
            return loss_fn({n: t.view(s) for n, t, s in zip(names, parts, shapes)})

        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.hessian(f)(flat)


class _Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 2)  # never called in forward: zero rows in H

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.used(x))


class _Attention(nn.Module):
    """nn.MultiheadAttention followed by F.scaled_dot_product_attention and a head."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.mha(x, x, x, need_weights=False)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)
        return self.head(h.mean(dim=1))


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward is marked @once_differentiable (no second derivative, no forward-mode rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


def _mse(out: Tensor, target: Tensor) -> Tensor:
    # Written out: F.mse_loss has no forward-over-reverse rule in torch 2.13 ("ZeroTensors are immutable").
    return ((out - target) ** 2).mean()


def make_problems() -> list[Problem]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    problems = []

    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    problems.append(
        Problem("mlp", mlp, F.cross_entropy, torch.randn(16, 5, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (16,), generator=g))
    )

    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()
    cnn[1].running_mean.uniform_(-0.5, 0.5)
    cnn[1].running_var.uniform_(0.5, 2.0)
    cnn.eval()
    problems.append(
        Problem("cnn_bn_eval", cnn, F.cross_entropy, torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g))
    )

    unused = _Unused().double()
    problems.append(
        Problem("unused_params", unused, _mse, torch.randn(10, 4, generator=g, dtype=torch.float64),
                torch.randn(10, 3, generator=g, dtype=torch.float64))
    )

    att = _Attention().double().eval()
    problems.append(
        Problem("attention", att, F.cross_entropy, torch.randn(3, 5, 4, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (3,), generator=g))
    )
    return problems


PROBLEMS = make_problems()
PROBLEM_IDS = [p.name for p in PROBLEMS]


def spectrum_matrix(eigenvalues: list[float], seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Q diag(λ) Qᵀ`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=dtype)) @ q.T
