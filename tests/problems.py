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


# ------------------------------------------------------------------------------------------ finite-difference problems
# A separate list, so that PROBLEMS (and the parametrisations of other tests) stay as they are. Each Problem is float64
# (for its dense reference); tests/test_finite_difference.py runs the finite-difference operator on float32 copies.


class _LSTMClassifier(nn.Module):
    """nn.LSTM over a short sequence, then a linear head on the last hidden state."""

    def __init__(self, d_in: int = 3, hidden: int = 5, classes: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class TransformerBlock(nn.Module):
    """A pre-norm transformer block (F.scaled_dot_product_attention, GELU MLP) with a mean-pooled linear head.

    ``attention`` picks the kernel path: ``"sdpa"`` (PyTorch's default kernel choice: the fused flash kernel on CPU,
    which has no double backward) or ``"math"`` (softmax(q kᵀ/√d) v written out, differentiable twice).
    """

    def __init__(self, d: int = 6, heads: int = 2, classes: int = 3, mlp: int = 2, attention: str = "sdpa") -> None:
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp * d), nn.GELU(), nn.Linear(mlp * d, d))
        self.head = nn.Linear(d, classes)

    def attend(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        if self.attention == "sdpa":
            h = F.scaled_dot_product_attention(q, k, v)
        else:
            h = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1) @ v
        return self.proj(h.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attend(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


def make_fd_problems() -> list[Problem]:
    """Models for the finite-difference operator: smooth ones (tanh MLP, GELU transformer, LSTM, attention) and
    piecewise-linear ones (ReLU CNN, ReLU CNN with eval-mode BatchNorm). The global RNG is left as it was."""
    with torch.random.fork_rng():
        return _fd_problems()


def _fd_problems() -> list[Problem]:
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    shared = {p.name: p for p in make_problems()}
    problems = [shared["mlp"]]

    block = TransformerBlock().double().eval()
    problems.append(
        Problem("gelu_transformer", block, F.cross_entropy, torch.randn(4, 7, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (4,), generator=g))
    )

    lstm = _LSTMClassifier().double()
    problems.append(
        Problem("lstm", lstm, F.cross_entropy, torch.randn(6, 4, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 2, (6,), generator=g))
    )
    problems.append(shared["attention"])

    relu_cnn = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)
    ).double()
    problems.append(
        Problem("relu_cnn", relu_cnn, F.cross_entropy, torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (8,), generator=g))
    )
    problems.append(shared["cnn_bn_eval"])
    return problems


FD_PROBLEMS = make_fd_problems()
FD_PROBLEM_IDS = [p.name for p in FD_PROBLEMS]
# piecewise-linear models: the difference quotient may straddle a ReLU kink (see FiniteDifferenceOperator)
FD_NONSMOOTH = ("relu_cnn", "cnn_bn_eval")


def reverse_hessian(problem: Problem) -> Tensor:
    """Dense float64 Hessian by reverse-over-reverse, one row at a time (``torch.autograd.functional.hessian``).

    The finite-difference tests' reference. ``Problem.dense_hessian`` (``torch.func.hessian``: vmap over forward- and
    reverse-mode) is wrong in torch 2.13 for the weight rows of ``F.layer_norm`` when the norm's input also depends on
    the parameters (e.g. ``ln2.weight`` of a transformer block: the result is not even symmetric); products and this
    row-by-row Hessian, which use no vmap, are right.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = problem.params()
    names = list(params)
    shapes = [p.shape for p in params.values()]
    numels = [p.numel() for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    loss_fn = problem.loss_fn()

    def f(x: Tensor) -> Tensor:
        return loss_fn({n: t.view(s) for n, t, s in zip(names, torch.split(x, numels), shapes)})

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat)
