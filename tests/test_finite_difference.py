"""FiniteDifferenceOperator: products from two ordinary gradients, against exact float64 Hessians."""

import copy
import functools
import json
import math
import os
import random
import socket
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from problems import (
    FD_NONSMOOTH,
    FD_PROBLEM_IDS,
    FD_PROBLEMS,
    PROBLEMS,
    OnceDifferentiableTanh,
    Problem,
    reverse_hessian,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_curvature import HessianOperator, HVPUnsupportedError, hutchinson_trace, lanczos, module_loss_fn
from lightning_curvature.finite_difference import FiniteDifferenceOperator, default_relative_step

# Accuracy targets against exact float64 products, float32 models (measured figures in the test ids' comments below
# and in the report): smooth models 1e-3, piecewise-linear (ReLU) ones 1e-2.
SMOOTH_RTOL, NONSMOOTH_RTOL = 1e-3, 1e-2


def _relative_errors(approx: Tensor, exact: Tensor) -> Tensor:
    return (approx.double() - exact).norm(dim=0) / exact.norm(dim=0)


def _probes(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, 6, generator=g, dtype=torch.float64)
    rademacher = torch.randint(0, 2, (n, 4), generator=g).double() * 2 - 1
    return torch.cat([normal, rademacher], dim=1).to(dtype)


@functools.cache
def _float32_problem(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index(name)]
    model = copy.deepcopy(problem.model).float()
    x = problem.inputs.float()
    y = problem.targets.float() if problem.targets.is_floating_point() else problem.targets
    exact = Problem(name, copy.deepcopy(model).double(), problem.criterion, x.double(),
                    y.double() if y.is_floating_point() else y)
    return model, x, y, reverse_hessian(exact)


def _float32_case(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor]:
    """A fresh float32 copy of an FD problem's model, its batch, and the exact float64 Hessian at its weights."""
    model, x, y, H = _float32_problem(name)
    return copy.deepcopy(model), x, y, H


def _closure(problem: Problem, x: Tensor, y: Tensor):
    return lambda m: problem.criterion(m(x), y)


# ---------------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("problem", FD_PROBLEMS, ids=FD_PROBLEM_IDS)
def test_float32_products_match_exact_float64_products(problem):
    # measured max relative error over these 10 probes (benchmarks/first_order.py --only accuracy): mlp 3.1e-5,
    # gelu_transformer 3.3e-5, lstm 4.3e-5, attention 2.2e-5, relu_cnn 1.9e-3, cnn_bn_eval 4.4e-4 (the last two after
    # the kink check shrank ε; without it 21 and 6)
    model, x, y, H = _float32_case(problem.name)
    op = FiniteDifferenceOperator(model, _closure(problem, x, y))
    assert op.dtype == torch.float32 and op.shape == H.shape and op.backend == "finite-difference"
    V = _probes(op.shape[0])
    HV = op.matmat(V)
    assert HV.dtype == torch.float32 and op.num_matvecs == V.shape[1]
    rtol = NONSMOOTH_RTOL if problem.name in FD_NONSMOOTH else SMOOTH_RTOL
    errors = _relative_errors(HV, H @ V.double())
    assert errors.max() <= rtol, errors
    # symmetric to the same accuracy
    u, v = V[:, 0], V[:, 1]
    assert abs(float(u @ HV[:, 1]) - float(v @ HV[:, 0])) <= rtol * float(u.norm() * HV[:, 1].norm())


@pytest.mark.parametrize("problem", [p for p in FD_PROBLEMS if p.name not in FD_NONSMOOTH],
                         ids=[n for n in FD_PROBLEM_IDS if n not in FD_NONSMOOTH])
def test_float64_models_are_accurate_to_u_to_the_two_thirds(problem):
    H = reverse_hessian(problem)
    op = FiniteDifferenceOperator(problem.model, _closure(problem, problem.inputs, problem.targets))
    assert op.dtype == torch.float64 and op.eps == pytest.approx(torch.finfo(torch.float64).eps ** (1 / 3))
    V = _probes(op.shape[0], torch.float64)
    assert _relative_errors(op.matmat(V), H @ V).max() <= 1e-9  # measured ≤ 8e-11


def test_float32_module_in_float64_is_cast_for_the_products_only():
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("gelu_transformer")]
    model, x, y, H = _float32_case(problem.name)
    model.zero_grad(set_to_none=False)
    grads = [p.grad for p in model.parameters()]
    before = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    op = FiniteDifferenceOperator(model, lambda m: problem.criterion(m(x.to(m.qkv.weight.dtype)), y),
                                  dtype=torch.float64)
    V = _probes(op.shape[0], torch.float64)
    HV = op.matmat(V)
    assert HV.dtype == torch.float64 and op.eps == default_relative_step(torch.float64)
    # the float32 weights themselves, in float64 arithmetic
    assert _relative_errors(HV, H @ V).max() <= 1e-8
    for p, (value, ptr), g in zip(model.parameters(), before, grads):
        assert p.dtype == torch.float32 and p.data_ptr() == ptr and torch.equal(p, value) and p.grad is g
    assert all(b.dtype == buffers[k].dtype and torch.equal(b, buffers[k]) for k, b in model.named_buffers())


def test_gradient_and_loss_come_from_one_ordinary_backward():
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("lstm")]
    model, x, y, _ = _float32_case(problem.name)
    op = FiniteDifferenceOperator(model, _closure(problem, x, y))
    g = op.gradient()
    assert op.num_gradients == 1 and g.dtype == torch.float32
    loss = problem.criterion(model(x), y)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(g, torch.cat([t.reshape(-1) for t in expected]), rtol=0, atol=0)
    assert op.loss == float(loss.detach())
    assert op.gradient() is g and op.num_gradients == 1


# ---------------------------------------------------------------------------------------------------- estimators
def test_lanczos_and_hutchinson_through_the_operator():
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("gelu_transformer")]
    model, x, y, H = _float32_case(problem.name)
    op = FiniteDifferenceOperator(model, _closure(problem, x, y))
    eigs = torch.linalg.eigvalsh(H)
    top = lanczos(op, k=2, tol=1e-3, generator=torch.Generator().manual_seed(0))
    assert bool(top.converged.all())
    torch.testing.assert_close(top.eigenvalues.double(), eigs.flip(0)[:2], rtol=2e-3, atol=0)
    # Hutchinson: the same probes through the operator and through the exact matrix
    fd = hutchinson_trace(op, 40, generator=torch.Generator().manual_seed(1))
    exact = hutchinson_trace(H.float(), 40, generator=torch.Generator().manual_seed(1))
    assert fd.value == pytest.approx(exact.value, rel=1e-3)
    assert abs(fd.value - float(H.trace())) <= 4 * fd.stderr


class _Clocked:
    """An operator whose every product takes ``seconds`` of a fake clock (the first one ``first`` seconds)."""

    def __init__(self, op, clock, seconds, first=None):
        self.op, self.clock, self.seconds, self.first, self.calls = op, clock, seconds, first, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def matvec(self, v):
        self.clock[0] += self.first if self.calls == 0 and self.first is not None else self.seconds
        self.calls += 1
        return self.op.matvec(v)


@pytest.mark.parametrize("problem", ["gelu_transformer", "relu_cnn"])
def test_race_of_the_backends_times_products_and_compares_them_to_the_exact_ones(problem):
    from lightning_curvature.finite_difference import race_backends

    case = FD_PROBLEMS[FD_PROBLEM_IDS.index(problem)]
    model, x, y, H = _float32_case(problem)
    exact = HessianOperator.from_module(model, case.criterion, x, y)
    fd = FiniteDifferenceOperator(model, _closure(case, x, y))
    now = [0.0]
    clock = lambda: now[0]  # noqa: E731
    # the warm-up product (100 s) is not timed; then the fastest of 2 products each
    race = race_backends(_Clocked(exact, now, 2.0, first=100.0), _Clocked(fd, now, 1.0, first=100.0),
                         generator=torch.Generator().manual_seed(0), clock=clock)
    assert (race.exact_seconds, race.first_order_seconds) == (2.0, 1.0)
    assert race.tolerance == 1e-3
    # the difference is the first-order product's error on one random unit vector, against exact float64
    v = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    expected = float(_relative_errors(fd.matvec(v)[:, None], (H @ v.double())[:, None])[0])
    assert race.relative_difference == pytest.approx(expected, rel=0.05, abs=1e-6)
    if problem == "gelu_transformer":  # smooth: agrees to 1e-3 (measured 2e-5), and faster: used
        assert race.relative_difference <= 1e-4 and race.first_order_wins
    slower = race_backends(_Clocked(exact, now, 1.0), _Clocked(fd, now, 1.5), clock=clock, repeats=1)
    assert slower.first_order_seconds == 1.5 and not slower.first_order_wins
    assert "finite-difference products 1500.0 ms, exact 1000.0 ms" in slower.describe()
    with pytest.raises(ValueError, match="repeats"):
        race_backends(exact, fd, repeats=0)


# ---------------------------------------------------------------------------------------------------- invisible
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))
        self.frozen = nn.Linear(3, 3)  # trainable, but not among the operator's params

    def forward(self, x: Tensor) -> Tensor:
        return self.frozen(self.body(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_parameters_grads_buffers_flags_and_rng_are_left_exactly_as_they_were(mode):
    torch.manual_seed(0)
    model = _Net()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    model.train()
    model.body[1].running_mean.uniform_(-1, 1)
    F.cross_entropy(model(x), y).backward()  # the user's own .grad
    model.body[0].bias.grad = None  # and one parameter without
    model.body[3].eval()  # mixed flags
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    values = [(p.detach().clone(), p.data_ptr()) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    params = dict(model.body.named_parameters())
    op = FiniteDifferenceOperator(model, lambda m: F.cross_entropy(m(x), y), params, mode=mode)
    op.matmat(_probes(op.shape[0])[:, :3])
    op.gradient()
    for p, (value, ptr) in zip(model.parameters(), values):
        assert torch.equal(p, value) and p.data_ptr() == ptr  # bit-identical, same storage
    for p, (g, saved) in zip(model.parameters(), grads):
        assert p.grad is g and (g is None or torch.equal(g, saved))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics and num_batches_tracked
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_everything_is_put_back_when_the_closure_raises_midway():
    torch.manual_seed(0)
    model = _Net().train()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = [0]

    def closure(m):
        calls[0] += 1
        loss = F.cross_entropy(m(x), y)
        if calls[0] == 3:  # the second gradient of the first product: parameters are at θ - εv
            raise RuntimeError("boom")
        return loss

    op = FiniteDifferenceOperator(model, closure, mode="eval")
    with pytest.raises(RuntimeError, match="boom"):
        op.matvec(torch.ones(op.shape[0]))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads)) and model.training


def test_train_mode_is_one_fixed_function_the_exact_operator_measures_too():
    torch.manual_seed(0)
    model = _Net().double().train()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    params = dict(model.named_parameters())
    seed = 7
    op = FiniteDifferenceOperator(model, lambda m: F.cross_entropy(m(x), y), params, mode="train", seed=seed)
    V = _probes(op.shape[0], torch.float64)[:, :3]
    HV = op.matmat(V)
    torch.testing.assert_close(op.matmat(V), HV, rtol=0, atol=0)  # same dropout masks every time
    # the same masks and batch statistics as the exact operator's train-mode function with the same seed
    loss_fn, theta = module_loss_fn(model, lambda m: F.cross_entropy(m(x), y), mode="train", seed=seed)
    exact = HessianOperator(loss_fn, theta).matmat(V)
    assert _relative_errors(HV, exact).max() <= 1e-8
    other = FiniteDifferenceOperator(model, lambda m: F.cross_entropy(m(x), y), params, mode="train", seed=seed + 1)
    assert _relative_errors(other.matmat(V), exact).max() > 1e-3  # other masks, another function


# ---------------------------------------------------------------------------------------------------- edge cases
def test_unused_parameters_give_zero_rows_and_columns():
    problem = PROBLEMS[[p.name for p in PROBLEMS].index("unused_params")]
    op = FiniteDifferenceOperator(problem.model, _closure(problem, problem.inputs, problem.targets))
    Hfd = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    n_used = sum(p.numel() for p in problem.model.used.parameters())
    assert torch.count_nonzero(Hfd[n_used:]) == 0 and torch.count_nonzero(Hfd[:, n_used:]) == 0
    torch.testing.assert_close(Hfd, reverse_hessian(problem), rtol=1e-8, atol=1e-9)


class _SparseBag(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3, sparse=sparse)
        self.out = nn.Linear(3, 2)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(idx)).mean(dim=1))


def test_sparse_embedding_gradients_are_densified():
    torch.manual_seed(0)
    sparse = _SparseBag(sparse=True).double()
    dense = _SparseBag(sparse=False).double()
    dense.load_state_dict(sparse.state_dict())
    idx, y = torch.tensor([[0, 2, 2], [5, 1, 0], [3, 3, 6]]), torch.tensor([0, 1, 1])
    op = FiniteDifferenceOperator(sparse, lambda m: F.cross_entropy(m(idx), y))
    H = reverse_hessian(Problem("bag", dense, F.cross_entropy, idx, y))
    torch.testing.assert_close(op.matmat(torch.eye(op.shape[0], dtype=torch.float64)), H, rtol=1e-7, atol=1e-9)
    assert op.gradient().layout == torch.strided


class _Checkpointed(nn.Module):
    def __init__(self, use_checkpoint: bool, activation=torch.tanh) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)
        self.use_checkpoint = use_checkpoint
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        h = self.activation(self.inp(x))
        h = checkpoint(self.block, h, use_reentrant=True) if self.use_checkpoint else self.block(h)
        return self.head(h)


@pytest.mark.parametrize("case", ["reentrant_checkpoint", "once_differentiable"])
def test_first_order_only_models_where_the_exact_backends_fail(case):
    # reentrant checkpointing refuses autograd.grad; a @once_differentiable backward has no second derivative. The
    # reference: the same weights without checkpointing / with an ordinary tanh, exact in float64.
    torch.manual_seed(0)
    if case == "reentrant_checkpoint":
        model = _Checkpointed(use_checkpoint=True)
    else:
        model = _Checkpointed(use_checkpoint=False, activation=OnceDifferentiableTanh.apply)
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    closure = lambda m: F.cross_entropy(m(x), y)  # noqa: E731
    with pytest.raises((RuntimeError, HVPUnsupportedError)):
        loss_fn, theta = module_loss_fn(model, closure)
        HessianOperator(loss_fn, theta).matvec(torch.ones(sum(p.numel() for p in theta.values())))
    plain = _Checkpointed(use_checkpoint=False)
    plain.load_state_dict(model.state_dict())
    H = reverse_hessian(Problem("plain", plain.double(), F.cross_entropy, x.double(), y))
    op = FiniteDifferenceOperator(model, closure)
    V = _probes(op.shape[0])
    assert _relative_errors(op.matmat(V), H @ V.double()).max() <= SMOOTH_RTOL
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- ε and kinks
def test_step_size_rule():
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("gelu_transformer")]
    model, x, y, _ = _float32_case(problem.name)
    op = FiniteDifferenceOperator(model, _closure(problem, x, y))
    eta = torch.finfo(torch.float32).eps ** (1 / 3)
    assert op.eps == pytest.approx(eta) and default_relative_step(torch.float32) == op.eps
    blocks = [p.double() for p in op.params.values()]
    rms = [float(b.pow(2).mean().sqrt()) for b in blocks]
    # τ, the typical entry: the median entry's block rms (zero blocks, here the LayerNorm biases, left out)
    entries = torch.cat([torch.full((b.numel(),), r) for b, r in zip(blocks, rms) if r > 0]).sort().values
    tau = float(entries[math.ceil(entries.numel() / 2) - 1])
    assert min(rms) == 0.0 < tau < max(rms)
    # v = θ: the tensors at or above τ move by exactly η of their norm, the others by less
    theta = op.flatten(op.params)
    assert op.step_size(theta) == pytest.approx(eta) and op.step_size(3 * theta) == pytest.approx(eta / 3)
    # v inside one tensor: ε = η max(‖θ_b‖, √n_b τ) / ‖v_b‖, for a zero tensor too
    for i in (rms.index(0.0), rms.index(max(rms))):
        start = sum(op.numels[:i])
        w = torch.zeros(op.shape[0])
        w[start:start + op.numels[i]] = 2.0
        expected = eta * max(float(blocks[i].norm()), math.sqrt(op.numels[i]) * tau) / float(w.norm())
        assert op.step_size(w) == pytest.approx(expected)
    # a random probe: set by the tensor it moves most relative to its scale
    z = _probes(op.shape[0])[:, 0]
    ratios = [max(float(b.norm()), math.sqrt(b.numel()) * tau) / float(part.norm())
              for b, part in zip(blocks, torch.split(z.double(), op.numels))]
    assert op.step_size(z) == pytest.approx(eta * min(ratios))
    assert op.step_size(torch.zeros(op.shape[0])) == 0.0
    assert torch.count_nonzero(op.matvec(torch.zeros(op.shape[0]))) == 0 and op.num_gradients == 0
    # exactly homogeneous: the perturbation εv does not depend on the scale of v
    torch.testing.assert_close(op.matvec(-4 * z), -4 * op.matvec(z), rtol=1e-6, atol=0)


def test_kink_check_shrinks_the_step_on_relu_models():
    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("relu_cnn")]
    model, x, y, H = _float32_case(problem.name)
    V = _probes(H.shape[0])[:, :4]
    exact = H @ V.double()
    unchecked = FiniteDifferenceOperator(model, _closure(problem, x, y), asymmetry_tol=None)
    assert _relative_errors(unchecked.matmat(V), exact).max() > 0.1  # a step across a ReLU kink: way off
    assert unchecked.num_gradients == 2 * V.shape[1]
    checked = FiniteDifferenceOperator(model, _closure(problem, x, y))
    assert _relative_errors(checked.matmat(V), exact).max() <= NONSMOOTH_RTOL
    assert checked.num_shrinks > 0 and checked.max_asymmetry <= checked.asymmetry_tol
    assert checked.num_gradients == 1 + 2 * (V.shape[1] + checked.num_shrinks)


def test_kink_check_warns_once_when_no_step_is_small_enough():
    # L = |w₁| + w₂² at w₁ = 1e-9: every step of the ladder (ε = 4e-6, 4e-7, 4e-8) crosses the kink at w₁ = 0.
    # (A kink exactly at θ is symmetric, D₊ = D₋, and goes unseen: an asymmetry test cannot catch it.)
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e-9, 1.0]]))
    op = FiniteDifferenceOperator(model, lambda m: m.weight[0, 0].abs() + m.weight[0, 1] ** 2)
    with pytest.warns(RuntimeWarning, match="asymmetry stays above asymmetry_tol.*kinks of the model"):
        op.matvec(torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert op.num_shrinks == op.max_shrinks and op.max_asymmetry > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64))  # once per operator


# ---------------------------------------------------------------------------------------------------- compiled
def test_compiled_module_runs_its_compiled_graphs_without_recompiling():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_graphs: list = []
    calls = [0]

    def counting_backend(gm, example_inputs):
        compiled_graphs.append(gm)
        inner = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)  # AOTAutograd: a compiled backward

        def run(*args):
            calls[0] += 1
            return inner(*args)

        return run

    problem = FD_PROBLEMS[FD_PROBLEM_IDS.index("mlp")]
    model, x, y, H = _float32_case(problem.name)
    model = copy.deepcopy(model).train()
    cmodel = torch.compile(model, backend=counting_backend)
    closure = _closure(problem, x, y)
    closure(cmodel).backward()  # a training step compiles the graph
    model.zero_grad(set_to_none=True)
    assert len(compiled_graphs) == 1
    # the exact backends cannot differentiate the compiled graph twice
    with pytest.raises((RuntimeError, HVPUnsupportedError)):
        loss = closure(cmodel)
        grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        torch.autograd.grad(grads, list(model.parameters()), [torch.ones_like(p) for p in model.parameters()])
    calls[0] = 0
    op = FiniteDifferenceOperator(cmodel, closure, mode="train")
    V = _probes(op.shape[0])[:, :4]
    HV = op.matmat(V)
    assert _relative_errors(HV, H @ V.double()).max() <= SMOOTH_RTOL
    assert calls[0] == op.num_gradients == 1 + 2 * V.shape[1]  # every gradient ran the compiled graph
    assert len(compiled_graphs) == 1 and not counters["graph_break"]  # no recompilation, no graph break
    closure(cmodel).backward()  # training afterwards: the same graph
    assert len(compiled_graphs) == 1 and calls[0] == op.num_gradients + 1
    # eval mode compiles one more graph the first time (dynamo guards on .training), then reuses it
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        FiniteDifferenceOperator(cmodel, closure, mode="eval").matvec(V[:, 0])
    assert len(compiled_graphs) <= 2 and not counters["graph_break"]
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- sharded
def _two_ranks(script: str, out) -> dict:
    """Run ``tests/scripts/<script>`` as ranks 0 and 1 (gloo on a free port); rank 0's JSON output."""
    path = os.path.join(os.path.dirname(__file__), "scripts", script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, path, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                              "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore",
                                              "OMP_NUM_THREADS": "1"})
             for rank in range(2)]
    for proc in procs:
        stdout, err = proc.communicate(timeout=300)
        assert "RUN COMPLETE" in stdout, err[-3000:]  # judged by the run, not by gloo's teardown at exit
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp2_sharded_parameters_two_processes(tmp_path):
    # autograd.grad cannot differentiate with respect to FSDP2's sharded DTensor parameters; loss.backward() can
    result = _two_ranks("fsdp_fd_run.py", tmp_path / "fsdp.json")
    V, HV, H = (torch.tensor(result[k], dtype=torch.float64) for k in ("probes", "products", "reference"))
    assert _relative_errors(HV, H @ V).max() <= 1e-8  # float64 model
    assert result["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)
    assert result["lambda_max_local"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-4)
    assert all(all(c.values()) for c in result["checks"]), result["checks"]


@pytest.mark.slow
def test_fsdp1_sharded_parameters_two_processes(tmp_path):
    """FSDP1 (FullyShardedDataParallel, use_orig_params=True) on CPU: each parameter a slice of its flattened entries,
    one rank holding none of a bias; products, eigenvalues and trace through the local shards."""
    result = _two_ranks("fsdp1_fd_run.py", tmp_path / "fsdp1.json")
    V, HV, H = (torch.tensor(result[k], dtype=torch.float64) for k in ("probes", "products", "reference"))
    assert _relative_errors(HV, H @ V).max() <= 1e-8  # float64 model
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert result["eigenvalues"] == pytest.approx(top.tolist(), rel=1e-6) and all(result["converged"])
    assert abs(result["trace"] - float(torch.trace(H))) <= 4 * result["trace_stderr"]
    assert all(all(c.values()) for c in result["checks"]), result["checks"]


# ---------------------------------------------------------------------------------------------------- interface
def test_interface_and_bad_arguments():
    problem = PROBLEMS[0]
    closure = _closure(problem, problem.inputs, problem.targets)
    with FiniteDifferenceOperator(problem.model, closure) as op:
        assert op.names == [k for k, _ in problem.model.named_parameters()]
        assert op.numels == [p.numel() for p in problem.model.parameters()]
        assert sum(op.numels) == op.shape[0] == op.shape[1]
        assert op.device == torch.device("cpu") and "FiniteDifferenceOperator(P=75" in repr(op)
        v = torch.arange(op.shape[0], dtype=torch.float64)
        torch.testing.assert_close(op.flatten(op.unflatten(v)), v, rtol=0, atol=0)
        assert all(torch.equal(op.params[k], p) for k, p in problem.model.named_parameters())
        with pytest.raises(ValueError, match="flat vector of length 75"):
            op.matvec(torch.ones(3))
        with pytest.raises(ValueError, match=r"\(75, m\) block"):
            op.matmat(torch.ones(75))
    with pytest.raises(ValueError, match="mode must be one of"):
        FiniteDifferenceOperator(problem.model, closure, mode="training")
    with pytest.raises(ValueError, match="eps"):
        FiniteDifferenceOperator(problem.model, closure, eps=0.0)
    with pytest.raises(ValueError, match="asymmetry_tol"):
        FiniteDifferenceOperator(problem.model, closure, asymmetry_tol=-1)
    with pytest.raises(ValueError, match="max_shrinks"):
        FiniteDifferenceOperator(problem.model, closure, max_shrinks=1.5)
    with pytest.raises(ValueError, match=r"vectors must be one of \('whole', 'local'\)"):
        FiniteDifferenceOperator(problem.model, closure, vectors="sharded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"vectors='local' needs every differentiated parameter sharded"):
        FiniteDifferenceOperator(problem.model, closure, vectors="local")
    with pytest.raises(ValueError, match="not a parameter of the module"):
        FiniteDifferenceOperator(problem.model, closure, {"w": nn.Parameter(torch.zeros(2))})
    frozen = copy.deepcopy(problem.model)
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        FiniteDifferenceOperator(frozen, closure, {"0.weight": frozen[0].weight})
    with pytest.raises(ValueError, match="same tensor"):
        FiniteDifferenceOperator(problem.model, closure, {"a": problem.model[0].bias, "b": problem.model[0].bias})
    with pytest.raises(ValueError, match="no trainable parameters"):
        FiniteDifferenceOperator(frozen, closure, {})
    with pytest.raises(ValueError, match="floating point"):
        FiniteDifferenceOperator(problem.model, closure, dtype=torch.int64)
    bad = FiniteDifferenceOperator(problem.model, lambda m: m(problem.inputs))
    with pytest.raises(ValueError, match="scalar"):
        bad.gradient()
    assert all(p.grad is None for p in problem.model.parameters())


def test_math_layer_does_not_import_lightning():
    code = (
        "import sys, lightning_curvature.finite_difference;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
