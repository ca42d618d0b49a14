import pytest
import torch
import torch.nn.functional as F
from problems import PROBLEM_IDS, PROBLEMS, OnceDifferentiableTanh
from torch import nn

from lightning_curvature import DenseOperator, HessianOperator, HVPUnsupportedError, module_loss_fn
from lightning_curvature.operators import BACKENDS

EXPLICIT = ["double-backward", "forward-over-reverse"]


def _seed_notebook_problem():
    """The seed notebook: f(x) = w·x + b, L = (f(x) - y)², one example, closed forms for gradient and H."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, generator=g, dtype=torch.float64)
    y = torch.rand(1, generator=g, dtype=torch.float64)
    model = nn.Linear(2, 1).double()
    return model, x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_notebook_closed_forms(backend):
    model, x, y = _seed_notebook_problem()
    op = HessianOperator.from_module(model, lambda out, t: torch.mean((out - t) ** 2), x, y, backend=backend)
    w, b = model.weight.detach()[0], model.bias.detach()
    residual = (w @ x + b - y).item()
    # gradient: dL/dw = 2 x (w·x + b - y), dL/db = 2 (w·x + b - y)
    expected_grad = torch.cat([2 * x * residual, torch.tensor([2 * residual], dtype=torch.float64)])
    torch.testing.assert_close(op.gradient(), expected_grad, rtol=0, atol=1e-15)
    assert op.loss == pytest.approx(residual**2, abs=1e-15)
    # Hessian: 2 [[x xᵀ, x], [xᵀ, 1]]
    x1 = torch.cat([x, torch.ones(1, dtype=torch.float64)])
    H = 2 * torch.outer(x1, x1)
    torch.testing.assert_close(op.matmat(torch.eye(3, dtype=torch.float64)), H, rtol=0, atol=1e-15)
    # HVP with the gradient as the vector, as in the notebook: H g
    torch.testing.assert_close(op.matvec(expected_grad), H @ expected_grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", EXPLICIT)
@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_backends_match_dense_hessian(problem, backend):
    H = problem.dense_hessian()
    op = HessianOperator(problem.loss_fn(), problem.params(), backend=backend)
    assert op.shape == H.shape and op.dtype == torch.float64
    dense = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    torch.testing.assert_close(dense, H, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == op.shape[0]
    assert op.backend == backend


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_backends_agree(problem):
    g = torch.Generator().manual_seed(3)
    V = torch.randn(sum(p.numel() for p in problem.params().values()), 4, generator=g, dtype=torch.float64)
    a = HessianOperator(problem.loss_fn(), problem.params(), backend="double-backward").matmat(V)
    b = HessianOperator(problem.loss_fn(), problem.params(), backend="forward-over-reverse").matmat(V)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unused_parameters_get_zero_rows():
    problem = PROBLEMS[PROBLEM_IDS.index("unused_params")]
    for backend in EXPLICIT:
        op = HessianOperator(problem.loss_fn(), problem.params(), backend=backend)
        H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
        n_used = sum(p.numel() for p in problem.model.used.parameters())
        assert torch.count_nonzero(H[n_used:]) == 0 and torch.count_nonzero(H[:, n_used:]) == 0
        assert torch.count_nonzero(H[:n_used, :n_used]) > 0


def test_auto_prefers_double_backward_and_falls_back(monkeypatch):
    problem = PROBLEMS[0]
    op = HessianOperator(problem.loss_fn(), problem.params())
    v = torch.ones(op.shape[0], dtype=torch.float64)
    expected = HessianOperator(problem.loss_fn(), problem.params(), backend="forward-over-reverse").matvec(v)
    torch.testing.assert_close(op.matvec(v), expected)
    assert op.backend == "double-backward"

    def broken(self, v):
        raise RuntimeError("simulated: no double backward")

    monkeypatch.setattr(HessianOperator, "_matvec_double_backward", broken)
    op = HessianOperator(problem.loss_fn(), problem.params())
    torch.testing.assert_close(op.matvec(v), expected)
    assert op.backend == "forward-over-reverse"


class _NoSecondDerivative(torch.autograd.Function):
    """x ↦ x³ whose backward is not differentiable (and which has no forward-mode rule)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x**2


def test_op_without_second_derivatives_raises_clear_error():
    theta = {"w": torch.randn(3, dtype=torch.float64)}
    op = HessianOperator(lambda p: _NoSecondDerivative.apply(p["w"]).sum(), theta)
    with pytest.raises(HVPUnsupportedError, match="double-backward.*\n.*forward-over-reverse"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_from_module_leaves_module_untouched_and_train_mode_is_a_fixed_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 2)).double()
    model.train()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
    model(x).sum().backward()  # some .grad to preserve
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    for backend in EXPLICIT:
        op = HessianOperator.from_module(model, F.cross_entropy, x, y, backend=backend, mode="train")
        g = torch.Generator().manual_seed(0)
        u, v = torch.randn(op.shape[0], 2, generator=g, dtype=torch.float64).unbind(1)
        Hu, Hv = op.matvec(u), op.matvec(v)
        # the same function for every product: repeated products agree and H is symmetric
        torch.testing.assert_close(op.matvec(u), Hu, rtol=0, atol=0)
        torch.testing.assert_close(u @ Hv, v @ Hu, rtol=1e-10, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_train_and_eval_mode_differ_for_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    h_eval = HessianOperator.from_module(model, F.mse_loss, x, y, mode="eval").matvec(v)
    h_train = HessianOperator.from_module(model, F.mse_loss, x, y, mode="train").matvec(v)
    assert not torch.allclose(h_eval, h_train)
    # eval mode is the Hessian of the module in eval mode
    model.eval()
    ref = HessianOperator(lambda p: F.mse_loss(torch.func.functional_call(model, p, (x,)), y),
                          dict(model.named_parameters())).matvec(v)
    torch.testing.assert_close(h_eval, ref)


def test_float64_from_float32_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(7, 3), torch.randn(7, 2)
    op = HessianOperator.from_module(model, F.mse_loss, x, y, dtype=torch.float64)
    assert op.dtype == torch.float64
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    # the module itself is not converted: computing in float64 works on copies
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = HessianOperator.from_module(model.double(), F.mse_loss, x.double(), y.double())
    torch.testing.assert_close(H, ref.matmat(torch.eye(op.shape[0], dtype=torch.float64)))


def test_sum_vs_mean_reduction_rescales_the_hessian():
    problem = PROBLEMS[0]
    n = problem.inputs.shape[0]
    mean = HessianOperator.from_module(problem.model, F.cross_entropy, problem.inputs, problem.targets)
    total = HessianOperator.from_module(problem.model, lambda o, t: F.cross_entropy(o, t, reduction="sum"),
                                        problem.inputs, problem.targets)
    v = torch.randn(mean.shape[0], dtype=torch.float64)
    torch.testing.assert_close(total.matvec(v), n * mean.matvec(v))


def test_bad_arguments():
    theta = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="backend must be one of"):
        HessianOperator(lambda p: p["w"].sum(), theta, backend="magic")
    with pytest.raises(ValueError, match="at least one parameter"):
        HessianOperator(lambda p: torch.zeros(()), {})
    op = HessianOperator(lambda p: (p["w"] ** 2).sum(), theta)
    with pytest.raises(ValueError, match="flat vector of length 2"):
        op.matvec(torch.zeros(3))
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(lambda p: p["w"] ** 2, theta).matvec(torch.zeros(2))
    with pytest.raises(ValueError, match="no trainable parameters"):
        module_loss_fn(nn.Linear(2, 2).requires_grad_(False), lambda m: m(torch.zeros(1, 2)).sum())
    with pytest.raises(ValueError, match="square"):
        DenseOperator(torch.zeros(2, 3))


def test_dense_operator():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    op = DenseOperator(A)
    torch.testing.assert_close(op.matmat(torch.eye(2)), A)
    assert op.num_matvecs == 2


def test_auto_handles_losses_without_forward_over_reverse_rule():
    """F.mse_loss fails under jvp-of-grad in torch 2.13; the default backend must not care."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    op = HessianOperator.from_module(model, F.mse_loss, x, y)
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    ref = HessianOperator.from_module(model, lambda o, t: ((o - t) ** 2).mean(), x, y, backend="forward-over-reverse")
    torch.testing.assert_close(H, ref.matmat(torch.eye(op.shape[0], dtype=torch.float64)))


def test_explicit_double_backward_warns_on_detached_gradients():
    theta = {"w": torch.randn(3, dtype=torch.float64)}
    op = HessianOperator(lambda p: _NoSecondDerivative.apply(p["w"]).sum(), theta, backend="double-backward")
    with pytest.warns(RuntimeWarning, match="taken as zero"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_once_differentiable_inside_a_network_is_detected_not_silently_dropped():
    """autograd prunes the DelayedError node of @once_differentiable, so a naive double backward returns a wrong,
    finite H (the second-order terms through that op are missing). Both backends must refuse instead."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(4, 5).double(), nn.Linear(5, 3).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    model = nn.Sequential(l1, nn.Identity(), l2)

    def closure(m):
        return F.cross_entropy(l2(OnceDifferentiableTanh.apply(l1(x))), y)

    loss_fn, theta = module_loss_fn(model, closure)
    v = torch.randn(sum(p.numel() for p in theta.values()), dtype=torch.float64)
    with pytest.raises(HVPUnsupportedError, match="not differentiable"):
        HessianOperator(loss_fn, theta).matvec(v)
    with pytest.raises(HVPUnsupportedError, match="silently dropped"):
        HessianOperator(loss_fn, theta, backend="double-backward").matvec(v)


# ---------------------------------------------------------------- derived operators

from lightning_curvature import GGNOperator  # noqa: E402
from lightning_curvature.operators import BlockOperator, ScaledOperator  # noqa: E402


def _dense_ggn(model, x, loss_of_output):
    params = {k: p.detach() for k, p in model.named_parameters()}
    names = list(params)
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    numels = [p.numel() for p in params.values()]
    shapes = [p.shape for p in params.values()]

    def f(v):
        parts = torch.split(v, numels)
        return torch.func.functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,))

    out = f(flat)
    J = torch.func.jacrev(f)(flat).reshape(out.numel(), -1)
    H_out = torch.func.hessian(lambda o: loss_of_output(o.view(out.shape)))(out.reshape(-1))
    return J.T @ H_out @ J


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_matches_dense_jt_h_j_and_is_psd(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (9,))

        def lo(o):
            return F.cross_entropy(o, y)
    else:
        y = torch.randn(9, 3, dtype=torch.float64)

        def lo(o):
            return ((o - y) ** 2).mean()

    G = _dense_ggn(model, x, lo)
    params = dict(model.named_parameters())
    op = GGNOperator(lambda p: torch.func.functional_call(model, p, (x,)), lo, params)
    dense = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    torch.testing.assert_close(dense, G, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(dense).min() >= -1e-12
    # the gradient is Jᵀ ∇_f ℓ, the true gradient
    h = HessianOperator(lambda p: lo(torch.func.functional_call(model, p, (x,))), params)
    torch.testing.assert_close(op.gradient(), h.gradient())
    assert op.loss == pytest.approx(h.loss)


def test_ggn_equals_hessian_for_the_seed_notebook_linear_model():
    model, x, y = _seed_notebook_problem()
    params = dict(model.named_parameters())
    ggn = GGNOperator(lambda p: torch.func.functional_call(model, p, (x,)), lambda o: ((o - y) ** 2).mean(), params)
    x1 = torch.cat([x, torch.ones(1, dtype=torch.float64)])
    torch.testing.assert_close(ggn.matmat(torch.eye(3, dtype=torch.float64)), 2 * torch.outer(x1, x1))


def test_scaled_and_block_operators():
    A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]], dtype=torch.float64)
    d = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    s = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    op = ScaledOperator(DenseOperator(A), d, add_diagonal=s)
    torch.testing.assert_close(op.matmat(torch.eye(3, dtype=torch.float64)), torch.diag(d) @ A @ torch.diag(d)
                               + torch.diag(s))
    blk = BlockOperator(DenseOperator(A), torch.tensor([0, 2]))
    torch.testing.assert_close(blk.matmat(torch.eye(2, dtype=torch.float64)), A[[0, 2]][:, [0, 2]])


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_vmapped_matmat_equals_the_loop(problem):
    g = torch.Generator().manual_seed(5)
    V = torch.randn(sum(p.numel() for p in problem.params().values()), 7, generator=g, dtype=torch.float64)
    loop = HessianOperator(problem.loss_fn(), problem.params()).matmat(V)
    op = HessianOperator(problem.loss_fn(), problem.params(), block_size=3)  # blocks of 3, 3 and 1 columns
    torch.testing.assert_close(op.matmat(V), loop, rtol=1e-10, atol=1e-12)
    assert not op._vmap_failed and op.num_matvecs == 7


def test_vmapped_matmat_falls_back_to_the_loop_where_vmap_fails():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.5), nn.Linear(5, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, dtype=torch.float64)
    loop = HessianOperator.from_module(model, F.cross_entropy, x, y, mode="train").matmat(V)
    loss_fn, theta = module_loss_fn(model, lambda m: F.cross_entropy(m(x), y), mode="train")
    op = HessianOperator(loss_fn, theta, block_size=4)
    torch.testing.assert_close(op.matmat(V), loop)
    assert op._vmap_failed  # dropout draws random numbers, which vmap refuses by default
    with pytest.raises(ValueError, match="block_size"):
        HessianOperator(loss_fn, theta, block_size=-1)
