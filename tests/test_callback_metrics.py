"""Training-dynamics metrics of the callback against dense float64 computations on a small model."""

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from test_callback import Net, fit, make_data, read_csv, rows_with

from lightning_curvature import CurvatureMonitor, HessianOperator
from lightning_curvature.dynamics import adam_preconditioner


def setup_problem():
    torch.manual_seed(0)
    model = Net(batchnorm=False, dropout=0.0).double()
    x, y = make_data().tensors
    x = x.double()
    model.eval()
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y),
                         dict(model.named_parameters()))
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    model.train()
    return model, x, y, op, H


def monitor(**kw):
    kw.setdefault("tol", 1e-8)
    kw.setdefault("max_iter", 300)
    return CurvatureMonitor(dtype="float64", **kw)


def test_eos_ratio_for_sgd_with_momentum_and_weight_decay():
    model, x, y, op, H = setup_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    out = monitor(metrics=["eigenvalues", "eos"]).estimate(model, [((x, y), 0)], optimizer=opt)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert out["stability_threshold"] == pytest.approx((2 + 2 * 0.9) / 0.05)
    assert out["eos_ratio"] == pytest.approx((lam + 1e-3) * 0.05 / (2 + 2 * 0.9), rel=1e-6)


@pytest.mark.parametrize("opt_cls,wd", [(torch.optim.Adam, 0.01), (torch.optim.AdamW, 0.01)])
def test_adam_preconditioned_sharpness_against_dense(opt_cls, wd):
    model, x, y, op, H = setup_problem()
    opt = opt_cls(model.parameters(), lr=0.01, weight_decay=wd)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y),
                         dict(model.named_parameters()))
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    d = adam_preconditioner(opt, list(model.parameters()))
    coupled = wd if opt_cls is torch.optim.Adam else 0.0
    dense = torch.diag(d) @ (H + coupled * torch.eye(H.shape[0], dtype=torch.float64)) @ torch.diag(d)
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    model.train()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

    out = monitor(metrics=["eigenvalues", "preconditioned"]).estimate(Module(), [((x, y), 0)], optimizer=opt)
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-6)
    assert out["stability_threshold"] == pytest.approx((2 + 2 * 0.9) / (0.01 * 0.1))
    assert out["eos_ratio"] == pytest.approx(expected / out["stability_threshold"], rel=1e-6)


def test_gradient_and_update_curvature():
    model, x, y, op, H = setup_problem()
    g = op.gradient()
    u = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    previous = {k: p.detach() - du for (k, p), du in zip(model.named_parameters(), op.unflatten(u).values())}
    out = monitor(metrics=["grad_curvature"]).estimate(model, [((x, y), 0)], previous_params=previous)
    assert out["grad_curvature"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-8)
    assert out["update_curvature"] == pytest.approx(float(u @ H @ u / (u @ u)), rel=1e-8)


def test_layer_breakdown_against_dense_blocks():
    model, x, y, op, H = setup_problem()
    cb = monitor(metrics=["eigenvalues"], top_k=1, num_probes=400, module_depth=2,
                 layer_metrics=["trace", "lambda_max", "eig_mass"])
    from lightning_curvature.callback import select_blocks

    cb.plan.blocks = select_blocks(model, None, 2)
    assert list(cb.plan.blocks) == ["net.0", "net.3"]
    out = cb.estimate(model, [((x, y), 0)])
    sizes = [p.numel() for p in model.parameters()]
    first = sum(sizes[:2])
    blocks = {"net.0": slice(0, first), "net.3": slice(first, sum(sizes))}
    v = torch.linalg.eigh(H).eigenvectors[:, -1]
    for name, sl in blocks.items():
        Hb = H[sl, sl]
        # per-probe variance of z_bᵀ(Hz)_b with Rademacher z: 2(‖H_bb‖²_F − Σ H_ii²) + ‖H_b,rest‖²_F
        var = 2 * float(Hb.pow(2).sum() - torch.diagonal(Hb).pow(2).sum()) + float(H[sl].pow(2).sum() - Hb.pow(2).sum())
        assert abs(out[f"trace/{name}"] - float(torch.trace(Hb))) <= 4 * (var / 400) ** 0.5
        assert out[f"lambda_max/{name}"] == pytest.approx(float(torch.linalg.eigvalsh(Hb)[-1]), rel=1e-6)
        assert out[f"eig_mass/{name}"] == pytest.approx(float(v[sl].pow(2).sum()), rel=1e-5)
    assert out["eig_mass/net.0"] + out["eig_mass/net.3"] == pytest.approx(1.0)


def test_ggn_in_the_callback():
    model, x, y, op, H = setup_problem()

    class WithOutputs(Net):
        def curvature_outputs(self, batch):
            xb, yb = batch
            return self(xb), yb

    m = WithOutputs(batchnorm=False, dropout=0.0).double()
    m.load_state_dict(model.state_dict())
    out = monitor(curvature="ggn", metrics=["eigenvalues", "lambda_min"], top_k=2).estimate(m, [((x, y), 0)])
    from test_operators import _dense_ggn

    m.eval()
    G = _dense_ggn(m, x, lambda o: F.cross_entropy(o, y))
    evals = torch.linalg.eigvalsh(G)
    assert out["eig_1"] == pytest.approx(float(evals[-1]), rel=1e-6)
    assert out["eig_2"] == pytest.approx(float(evals[-2]), rel=1e-6)
    assert out["lambda_min"] >= -1e-9  # positive semi-definite


def test_default_metrics_through_a_trainer(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    cb = CurvatureMonitor(every_n_train_steps=3, num_probes=4, max_iter=20, modules=["net.0"])
    fit(tmp_path, [cb], model=Net(optimizer="sgd", lr=0.1), max_steps=7, loggers=[logger])
    rows = rows_with(read_csv(logger), "curvature/eos_ratio")
    assert [int(r["step"]) for r in rows] == [0, 3, 6]
    for r in rows:
        assert float(r["curvature/stability_threshold"]) == pytest.approx(20.0)
        assert float(r["curvature/eos_ratio"]) == pytest.approx(float(r["curvature/lambda_max"]) / 20.0)
        assert r["curvature/grad_curvature"] != "" and r["curvature/trace/net.0"] != ""
    # the update curvature needs the weights one step back: available from the second estimate on
    assert rows[0]["curvature/update_curvature"] == ""
    assert all(r["curvature/update_curvature"] != "" for r in rows[1:])


def test_unknown_optimizer_warns_once_and_skips_eos(tmp_path):
    class RMS(Net):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.001)

    cb = CurvatureMonitor(every_n_train_steps=2, num_probes=3, max_iter=5)
    with pytest.warns(RuntimeWarning, match="RMSprop is not supported") as record:
        fit(tmp_path, [cb], model=RMS(), max_steps=5)
    assert sum("eos_ratio is skipped" in str(w.message) for w in record) == 1
    assert "eos_ratio" not in cb.last_metrics and "lambda_max" in cb.last_metrics


def test_bad_requests_raise_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"needs an Adam or AdamW optimizer; this run has SGD"):
        fit(tmp_path, [CurvatureMonitor(metrics=["preconditioned"])], model=Net(optimizer="sgd"), max_steps=1)
    with pytest.raises(ValueError, match=r"no module .* matches 'encoder\.\*'. Available: \['net', 'net.0'"):
        fit(tmp_path, [CurvatureMonitor(modules=["encoder.*"])], max_steps=1)
    with pytest.raises(ValueError, match="curvature_outputs"):
        fit(tmp_path, [CurvatureMonitor(curvature="ggn")], max_steps=1)
    with pytest.raises(ValueError, match=r"layer_metrics.*'trace', 'lambda_max', 'eig_mass'"):
        CurvatureMonitor(module_depth=1, layer_metrics=["frobenius"])
    with pytest.raises(ValueError, match=r"curvature.*'hessian', 'ggn'"):
        CurvatureMonitor(curvature="fisher")
    with pytest.raises(ValueError, match="neither `modules` nor `module_depth`"):
        CurvatureMonitor(metrics=["layers"])
    pl.seed_everything(0, verbose=False)


def test_adam_preconditioned_sharpness_ignores_coordinates_adam_has_never_moved():
    """Rows 5..9 of an embedding never appear (exp_avg_sq = 0) and the second layer is held by no optimizer (no
    state): Adam's next step moves neither, so both are excluded (P^{-1/2} = 0) and the preconditioned sharpness is
    that of the other coordinates. The rule this replaces (P = 1 without state) lets the second layer's curvature in."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randint(0, 5, (16, 2), generator=torch.Generator().manual_seed(0))  # tokens 0..4 only
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([*model[0].parameters(), *model[5].parameters()], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (opt.state[model[0].weight]["exp_avg_sq"][5:] == 0).all()
    d = adam_preconditioner(opt, list(model.parameters()))
    excluded = torch.zeros_like(d, dtype=torch.bool)
    excluded[15:30] = True  # unseen rows
    excluded[30:58] = True  # model[3], in no optimizer
    assert (d[excluded] == 0).all() and (d[~excluded] > 0).all()
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y),
                         dict(model.named_parameters()))
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    expected = float(torch.linalg.eigvalsh((d[:, None] * H * d[None, :])[~excluded][:, ~excluded])[-1])
    old = torch.where(excluded & (torch.arange(len(d)) >= 30), torch.ones_like(d), d)  # P = 1 without state
    assert float(torch.linalg.eigvalsh(old[:, None] * H * old[None, :])[-1]) != pytest.approx(expected, rel=1e-3)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(batch[0]), batch[1])

    out = monitor(metrics=["eigenvalues", "preconditioned"]).estimate(Module(), [((x, y), 0)], optimizer=opt)
    assert out["preconditioned_lambda_max"] == pytest.approx(expected, rel=1e-6)


def test_landscape_along_the_top_eigenvectors(tmp_path):
    """The cut's second difference at 0 is vᵀHv = λ₁ (a unit eigenvector); both cuts are logged for plot."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_curvature.cli import read_landscapes

    model, x, y, op, H = setup_problem()
    lam = torch.linalg.eigvalsh(H).flip(0)
    cb = monitor(top_k=2, metrics=["eigenvalues", "landscape", "landscape_2d"], landscape_radius=1e-2,
                 landscape_points=3)
    out = cb.estimate(model, [((x, y), 0)])
    cut, surface = cb.plan.last_landscapes["landscape"], cb.plan.last_landscapes["landscape_2d"]
    h = 1e-2
    second = (cut.losses[0] - 2 * cut.losses[1] + cut.losses[2]) / h**2
    assert float(cut.losses[1]) == pytest.approx(out["loss"], rel=1e-12)
    assert float(second) == pytest.approx(float(lam[0]), rel=1e-3)
    assert surface.losses.shape == (3, 3)
    mixed = (surface.losses[2, 2] - surface.losses[2, 0] - surface.losses[0, 2] + surface.losses[0, 0]) / (4 * h * h)
    assert abs(float(mixed)) < 1e-3 * float(lam[0])  # v₁ᵀHv₂ = 0 for eigenvectors
    second_2 = (surface.losses[1, 0] - 2 * surface.losses[1, 1] + surface.losses[1, 2]) / h**2
    assert float(second_2) == pytest.approx(float(lam[1]), rel=1e-3)

    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = CurvatureMonitor(every_n_train_steps=3, top_k=2, num_probes=4, max_iter=20,
                          metrics=["eigenvalues", "landscape", "landscape_2d"], landscape_points=5)
    fit(tmp_path, [cb], loggers=[tb], max_steps=4)
    logged = read_landscapes(tb.log_dir)
    assert [step for step, _ in logged["curvature/landscape"]] == [0, 3]
    assert logged["curvature/landscape_2d"][0][1].losses.shape == (5, 5)


class _LinearMSE(pl.LightningModule):
    """``nn.Linear(d, o)`` under MSE: the Hessian is ``I_o ⊗ (2/on) X̃ᵀX̃``, every eigenvalue ``o``-fold."""

    def __init__(self, d=4, o=3):
        super().__init__()
        self.net = torch.nn.Linear(d, o)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)


def test_threefold_top_eigenvalue_of_a_linear_layer_under_mse():
    # the case: a single-vector Krylov run saw one copy and logged (0.9992, 0.8218, 0.6737), converged
    torch.manual_seed(0)
    model = _LinearMSE()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)
    xt = torch.cat([x, torch.ones(32, 1)], dim=1).double()
    block = 2.0 / (32 * 3) * xt.T @ xt  # the Hessian of one output's weights and bias
    top = float(torch.linalg.eigvalsh(block)[-1])
    for dtype in ("float32", "float64"):
        out = CurvatureMonitor(top_k=3, metrics=["eigenvalues"], dtype=dtype).estimate(model, [((x, y), 0)])
        got = [out[f"eig_{i}"] for i in (1, 2, 3)]
        assert got == pytest.approx([top] * 3, rel=2e-3), (dtype, got)  # the default tol is 1e-3
        assert out["eig_converged"] == 1.0


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_large_curvature_in_float32_at_the_defaults(scale):
    """Inputs scaled by ``scale`` scale the Hessian by ``scale²``: a top eigenvalue near 1e9 at 1e4, float32 products
    (the default). Lanczos once re-normalised its reorthogonalised rows against ε^¾ ‖H‖, which counted every such
    row as rounding once ‖H‖ passed ~1.5e5 in float32 and logged wrong eigenvalues as converged."""
    torch.manual_seed(0)
    model = _LinearMSE(40, 1)  # the Hessian (2/n) X̃ᵀX̃: its spectrum is set by the inputs' scales
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 40, generator=g) * torch.logspace(0, 1, 40) * scale
    y = torch.randn(256, 1, generator=g)
    xt = torch.cat([x, torch.ones(256, 1)], dim=1).double()
    evals = torch.linalg.eigvalsh(2.0 / 256 * xt.T @ xt).flip(0)
    out = CurvatureMonitor(top_k=2, metrics=["eigenvalues", "trace"]).estimate(model, [((x, y), 0)])
    assert [out["eig_1"], out["eig_2"]] == pytest.approx(evals[:2].tolist(), rel=2e-3)
    assert out["eig_converged"] == 1.0
    assert out["trace"] == pytest.approx(float(evals.sum()), abs=4 * out["trace_stderr"] + 1e-4 * float(evals.sum()))
