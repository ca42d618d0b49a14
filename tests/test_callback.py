import csv
import glob
import math
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from problems import OnceDifferentiableTanh
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import CurvatureMonitor, HessianOperator

N, D, C = 64, 6, 3


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return TensorDataset(x, y)


class Net(pl.LightningModule):
    """BatchNorm + Dropout + Adam: every piece of state the callback must leave alone."""

    def __init__(self, lr=0.01, optimizer="adam", batchnorm=True, dropout=0.3, log_in_step=True, return_dict=False):
        super().__init__()
        layers = [nn.Linear(D, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, C)]
        self.net = nn.Sequential(*layers)
        self.lr, self.optimizer_name = lr, optimizer
        self.log_in_step, self.return_dict = log_in_step, return_dict

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.log_in_step:
            self.log("train/loss", loss)
        return {"loss": loss} if self.return_dict else loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(tmp_path, callbacks=(), model=None, max_steps=12, batch_size=16, seed=0, loggers=None, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model or Net()
    loader = DataLoader(make_data(), batch_size=batch_size, shuffle=True)
    trainer = pl.Trainer(
        max_steps=max_steps, callbacks=list(callbacks), logger=loggers if loggers is not None else False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
        default_root_dir=tmp_path, accelerator="cpu", devices=1, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, loader)
    return trainer, model


def read_csv(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def rows_with(rows, key):
    return [r for r in rows if r.get(key) not in (None, "")]


# ---------------------------------------------------------------- logging


def test_keys_and_cadence_in_csv_and_tensorboard(tmp_path):
    csv_logger = CSVLogger(tmp_path, name="csv")
    tb_logger = TensorBoardLogger(tmp_path, name="tb")
    cb = CurvatureMonitor(every_n_train_steps=4, top_k=2, num_probes=5, max_iter=20)
    fit(tmp_path, [cb], max_steps=13, loggers=[csv_logger, tb_logger])
    expected_keys = {"curvature/" + k for k in ["loss", "trace", "trace_stderr", "eig_1", "eig_2", "lambda_max",
                                                "eig_converged", "num_hvps", "seconds"]}

    rows = read_csv(csv_logger)
    curv = rows_with(rows, "curvature/trace")
    assert [int(r["step"]) for r in curv] == [0, 4, 8, 12]
    for r in curv:
        assert expected_keys <= {k for k, v in r.items() if v != ""}
        assert float(r["curvature/eig_1"]) >= float(r["curvature/eig_2"])
    # the loss is logged on the same step axis, and at an estimate's step it is the same number (no dropout
    # difference here: the loss of the estimate is in eval mode, so compare steps only)
    loss_steps = {int(r["step"]) for r in rows_with(rows, "train/loss")}
    assert {0, 4, 8, 12} <= loss_steps

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert expected_keys <= tags and "train/loss" in tags
    assert [e.step for e in acc.Scalars("curvature/eig_1")] == [0, 4, 8, 12]
    assert {0, 4, 8, 12} <= {e.step for e in acc.Scalars("train/loss")}


def test_logged_values_equal_exact_ones_at_zero_learning_rate(tmp_path):
    """lr=0: the weights never move, so every estimate must match the dense Hessian of the same loss."""
    csv_logger = CSVLogger(tmp_path, name="csv")
    model = Net(lr=0.0, optimizer="sgd", batchnorm=False, dropout=0.0).double()  # BN stats would move
    ds = make_data()
    full = TensorDataset(ds.tensors[0].double(), ds.tensors[1])
    cb = CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=50, max_iter=300, tol=1e-6,
                          data="fixed", dtype="float64", metrics=["trace", "eigenvalues", "lambda_min", "density"])
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=5, callbacks=[cb], logger=csv_logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(full, batch_size=N))  # one batch = the whole set, so "fixed" = that batch
    x, y = full.tensors
    model.eval()
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y),
                         dict(model.named_parameters()))
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    evals = torch.linalg.eigvalsh(H)
    top2 = evals.flip(0)[:2]  # Lanczos: the largest algebraic eigenvalues
    rows = rows_with(read_csv(csv_logger), "curvature/trace")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for r in rows:
        assert float(r["curvature/loss"]) == pytest.approx(op.loss, rel=1e-12)
        assert float(r["curvature/eig_1"]) == pytest.approx(float(top2[0]), rel=1e-6)
        assert float(r["curvature/eig_2"]) == pytest.approx(float(top2[1]), rel=1e-6)
        assert float(r["curvature/lambda_max"]) == float(r["curvature/eig_1"])
        assert float(r["curvature/lambda_min"]) == pytest.approx(float(evals[0]), rel=1e-6)
        stderr = float(r["curvature/trace_stderr"])
        assert 0 < stderr and abs(float(r["curvature/trace"]) - float(torch.trace(H))) <= 4 * stderr


# ---------------------------------------------------------------- invisible to training


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("mode,data", [("eval", "current"), ("train", "fixed")])
def test_bit_identical_weights_with_and_without_callback(tmp_path, mode, data):
    _, without = fit(tmp_path, [], max_steps=12)
    cb = CurvatureMonitor(every_n_train_steps=3, top_k=2, num_probes=4, max_iter=10, mode=mode, data=data,
                          num_batches=2 if data == "fixed" else 1)
    trainer, with_cb = fit(tmp_path, [cb], max_steps=12)
    assert cb._num_estimates == 4
    a, b = _weights(without), _weights(with_cb)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # includes BatchNorm running statistics
    # optimizer state too
    sa = trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(v["exp_avg"], with_cb.trainer.optimizers[0].state_dict()["state"][i]["exp_avg"])
               for i, v in sa.items())


def test_estimate_leaves_grads_flags_rng_and_buffers_untouched():
    model = Net()
    model.train()
    model.net[3].eval()  # a mixed train/eval state must be restored as it was
    x, y = make_data().tensors
    F.cross_entropy(model(x[:8]), y[:8]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for mode in ("eval", "train"):
        cb = CurvatureMonitor(every_n_train_steps=1, num_probes=3, max_iter=5, mode=mode)
        out = cb.estimate(model, [((x[:16], y[:16]), 0)])
        assert math.isfinite(out["trace"]) and math.isfinite(out["eig_1"])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(torch.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()


def test_self_log_in_training_step_logs_nothing_extra(tmp_path):
    loggers = [CSVLogger(tmp_path, name="without")]
    fit(tmp_path, [], max_steps=6, loggers=loggers)
    loggers2 = [CSVLogger(tmp_path, name="with")]
    fit(tmp_path, [CurvatureMonitor(every_n_train_steps=1, num_probes=3, max_iter=5)], max_steps=6, loggers=loggers2)
    a = [(r["step"], r["train/loss"]) for r in rows_with(read_csv(loggers[0]), "train/loss")]
    b = [(r["step"], r["train/loss"]) for r in rows_with(read_csv(loggers2[0]), "train/loss")]
    assert a == b and len(a) == 6


def test_gradient_accumulation_estimates_once_per_optimizer_step(tmp_path):
    cb = CurvatureMonitor(every_n_train_steps=2, num_probes=3, max_iter=5)
    trainer, _ = fit(tmp_path, [cb], max_steps=6, accumulate_grad_batches=3, batch_size=8)
    assert trainer.global_step == 6
    # 18 micro-batches; batches start at optimizer steps 0..5, three micro-batches each: estimates at 0, 2, 4 only
    assert cb._num_estimates == 3 and cb._last_step == 4


# ---------------------------------------------------------------- the loss


def test_dict_return_and_curvature_loss_hook(tmp_path):
    cb = CurvatureMonitor(every_n_train_steps=5, num_probes=3, max_iter=5)
    fit(tmp_path, [cb], model=Net(return_dict=True), max_steps=6)
    assert cb._num_estimates == 2

    class Hooked(Net):
        calls = 0

        def curvature_loss(self, batch):
            Hooked.calls += 1
            x, y = batch
            return 2.0 * F.cross_entropy(self(x), y)

    model = Hooked(batchnorm=False, dropout=0.0)
    cb = CurvatureMonitor(every_n_train_steps=100, num_probes=3, max_iter=5)
    x, y = make_data().tensors
    out = cb.estimate(model, [((x, y), 0)])
    assert Hooked.calls > 0
    assert out["loss"] == pytest.approx(2.0 * float(F.cross_entropy(model.eval()(x), y)), rel=1e-6)


# ---------------------------------------------------------------- state


def test_sharded_vectors_keep_no_update_snapshot_in_a_checkpoint():
    """Under FSDP the snapshot holds this process's shards, and a checkpoint keeps rank zero's state only: every
    process would load rank zero's shards as its own (a wrong update_curvature, or a hang on uneven shards)."""
    cb = CurvatureMonitor()
    cb._update_snapshot = (3, {"w": torch.ones(2)})
    assert cb.state_dict()["update_snapshot_step"] == 3
    cb._vectors = "local"
    state = cb.state_dict()
    assert state["update_snapshot"] is None and state["update_snapshot_step"] == -1


def test_checkpoint_state_and_resume(tmp_path):
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = CurvatureMonitor(every_n_train_steps=4, top_k=2, num_probes=3, max_iter=5)
    logger = CSVLogger(tmp_path, name="full")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=10, callbacks=[cb, ckpt_cb], logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    trainer.fit(Net(), DataLoader(make_data(), batch_size=16, shuffle=True))
    path = tmp_path / "ckpt" / "epoch=1-step=5.ckpt"
    assert path.exists(), sorted(os.listdir(tmp_path / "ckpt"))
    ckpt = torch.load(path, weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("CurvatureMonitor")]
    assert state["last_step"] == 4 and state["num_estimates"] == 2
    assert state["plan"]["vectors"]["top"].shape[1] == 2

    cb2 = CurvatureMonitor(every_n_train_steps=4, top_k=2, num_probes=3, max_iter=5)
    logger2 = CSVLogger(tmp_path, name="resumed")
    pl.seed_everything(0, verbose=False)
    trainer2 = pl.Trainer(max_steps=10, callbacks=[cb2], logger=logger2, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                          accelerator="cpu")
    trainer2.fit(Net(), DataLoader(make_data(), batch_size=16, shuffle=True), ckpt_path=path)
    assert cb2._num_estimates == 3 and cb2._last_step == 8
    steps = [int(r["step"]) for r in rows_with(read_csv(logger2), "curvature/trace")]
    assert steps == [8]


def test_two_instances_have_distinct_state_keys():
    a = CurvatureMonitor(every_n_train_steps=10)
    b = CurvatureMonitor(every_n_train_steps=10, log_prefix="curv2/")
    assert a.state_key != b.state_key


# ---------------------------------------------------------------- faults


class NaNAfter(Net):
    """The loss is NaN at steps 3-5; like many users, the module drops non-finite gradients before stepping."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step in (3, 4, 5):
            return loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            p.grad = torch.nan_to_num(p.grad, nan=0.0)


def test_nan_loss_warns_once_and_training_goes_on(tmp_path):
    cb = CurvatureMonitor(every_n_train_steps=1, num_probes=3, max_iter=5)
    model = NaNAfter(lr=0.01, batchnorm=False, dropout=0.0)
    with pytest.warns(RuntimeWarning, match="skipped an estimate") as record:
        trainer, _ = fit(tmp_path, [cb], model=model, max_steps=8)
    assert trainer.global_step == 8
    assert sum("skipped an estimate" in str(w.message) for w in record) == 1
    assert cb._num_estimates == 5  # steps 0,1,2,6,7
    assert not cb.disabled


class NoSecondDerivativeNet(Net):
    def forward(self, x):
        return self.net[-1](OnceDifferentiableTanh.apply(self.net[0](x)))


@pytest.mark.parametrize("backend", ["double-backward", "forward-over-reverse"])
def test_op_without_second_derivatives_warns_once_and_switches_off_an_exact_backend(tmp_path, backend):
    cb = CurvatureMonitor(every_n_train_steps=1, num_probes=3, max_iter=5, backend=backend)
    with pytest.warns(RuntimeWarning, match="switched off") as record:
        trainer, _ = fit(tmp_path, [cb], model=NoSecondDerivativeNet(batchnorm=False), max_steps=5)
    assert trainer.global_step == 5
    assert sum("switched off" in str(w.message) for w in record) == 1
    assert cb.disabled and cb._num_estimates == 0


def test_op_without_second_derivatives_falls_back_to_finite_differences_under_auto(tmp_path, caplog):
    """The op is tanh with a once-differentiable backward: the values must be those of a plain tanh network."""
    cb = CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=3, max_iter=40, tol=1e-4,
                          metrics=["eigenvalues", "grad_curvature"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, model = fit(tmp_path, [cb], model=NoSecondDerivativeNet(batchnorm=False, dropout=0.0), max_steps=5)
    assert trainer.global_step == 5 and not cb.disabled and cb._num_estimates == 3
    assert not [w for w in record if "CurvatureMonitor" in str(w.message)]
    assert sum("using backend='finite-difference'" in r.getMessage() for r in caplog.records) == 1
    plain = Net(batchnorm=False, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    x, y = make_data().tensors
    fd = CurvatureMonitor(top_k=2, max_iter=40, tol=1e-4, backend="finite-difference", metrics=["eigenvalues"])
    exact = CurvatureMonitor(top_k=2, max_iter=40, tol=1e-4, metrics=["eigenvalues"])
    a = fd.estimate(model, [((x[:16], y[:16]), 0)])
    b = exact.estimate(plain, [((x[:16], y[:16]), 0)])
    assert a["eig_1"] == pytest.approx(b["eig_1"], rel=1e-3) and a["eig_2"] == pytest.approx(b["eig_2"], rel=1e-3)


@pytest.mark.parametrize("backend", ["auto", "double-backward"])
def test_exact_products_out_of_memory_fall_back_to_finite_differences(tmp_path, caplog, monkeypatch, backend):
    """An exact product that runs out of memory: "auto" measures with finite differences from then on (one log line,
    values); an explicitly named exact backend skips the estimate with one warning, as any out-of-memory does."""
    calls = []

    def out_of_memory(self, v):
        calls.append(1)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB\nmore details")

    monkeypatch.setattr(HessianOperator, "matvec", out_of_memory)
    cb = CurvatureMonitor(every_n_train_steps=2, top_k=1, max_iter=40, tol=1e-4, metrics=["eigenvalues"],
                          backend=backend)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, model = fit(tmp_path, [cb], model=Net(batchnorm=False, dropout=0.0), max_steps=5)
    messages = [str(w.message) for w in record if "CurvatureMonitor" in str(w.message)]
    lines = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert trainer.global_step == 5 and not cb.disabled
    if backend == "auto":
        assert messages == [] and cb._first_order and cb._num_estimates == 3 and len(calls) == 1
        assert lines == ["CurvatureMonitor: exact Hessian-vector products ran out of memory (CUDA out of memory. Tried "
                         "to allocate 4.00 GiB); using backend='finite-difference' (central differences of ordinary "
                         "gradients)."]
        monkeypatch.undo()
        x, y = make_data().tensors
        batch = [((x[:16], y[:16]), 0)]
        exact = CurvatureMonitor(top_k=1, max_iter=40, tol=1e-6, metrics=["eigenvalues"]).estimate(model, batch)
        assert cb.estimate(model, batch)["eig_1"] == pytest.approx(exact["eig_1"], rel=1e-3)
    else:
        assert cb._num_estimates == 0 and not cb._first_order and lines == []
        assert len(messages) == 1 and "skipped an estimate: out of memory" in messages[0]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"every_n_train_steps": 0}, "every_n_train_steps"),
        ({"every_n_train_steps": -5}, "every_n_train_steps"),
        ({"every_n_train_steps": 2.5}, "every_n_train_steps"),
        ({"top_k": 0}, "top_k"),
        ({"num_probes": 1}, "num_probes"),
        ({"max_iter": 0}, "max_iter"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"trace_rtol": 0.0}, "trace_rtol"),
        ({"data": "random"}, r"data.*\('current', 'fixed'\)"),
        ({"mode": "test"}, r"mode.*\('eval', 'train'\)"),
        ({"backend": "magic"}, r"backend.*'auto', 'double-backward', 'forward-over-reverse'"),
        ({"dtype": "float16"}, r"dtype.*'float32', 'float64'"),
        ({"distribution": "uniform"}, r"distribution.*'rademacher', 'normal'"),
        ({"metrics": ["trace", "sharpness"]}, r"metrics.*'trace', 'eigenvalues'"),
        ({"metrics": []}, "at least one"),
        ({"trace_estimator": "xtrace"}, r"trace_estimator.*'auto', 'hutchinson', 'hutchpp', 'deflated'"),
        ({"eigen_solver": "arnoldi"}, r"eigen_solver.*'lanczos', 'power'"),
        ({"density_probes": 0}, "density_probes"),
        ({"density_steps": 1}, "density_steps"),
        ({"num_batches": 0}, "num_batches"),
        ({"num_batches": 3}, "data='fixed'"),
        ({"seed": -1}, "seed"),
        ({"warm_start": "yes"}, "warm_start"),
    ],
)
def test_bad_arguments_raise_with_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CurvatureMonitor(**kwargs)


def test_module_without_trainable_parameters_raises_at_setup(tmp_path):
    model = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fit(tmp_path, [CurvatureMonitor(every_n_train_steps=1)], model=model, max_steps=2)


def test_manual_optimisation_without_hook_raises_at_setup(tmp_path):
    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    with pytest.raises(ValueError, match="curvature_loss"):
        fit(tmp_path, [CurvatureMonitor(every_n_train_steps=1)], model=Manual(), max_steps=2)


def test_event_files_written(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit(tmp_path, [CurvatureMonitor(every_n_train_steps=5, num_probes=3, max_iter=5)], loggers=[tb], max_steps=6)
    assert glob.glob(os.path.join(tb.log_dir, "events.out.tfevents.*"))


@pytest.mark.parametrize("trace_estimator", ["hutchinson", "hutchpp", "deflated", "auto"])
@pytest.mark.parametrize("eigen_solver", ["lanczos", "power"])
def test_every_trace_estimator_and_solver_matches_the_dense_hessian(trace_estimator, eigen_solver):
    torch.manual_seed(0)
    model = Net(batchnorm=False, dropout=0.0).double()
    x, y = make_data().tensors
    x = x.double()
    cb = CurvatureMonitor(top_k=2, num_probes=30, tol=1e-7, max_iter=300, trace_estimator=trace_estimator,
                          eigen_solver=eigen_solver, dtype="float64", metrics=["trace", "eigenvalues"])
    out = cb.estimate(model, [((x, y), 0)])
    model.eval()
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y),
                         dict(model.named_parameters()))
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    evals = torch.linalg.eigvalsh(H)
    ref = evals.flip(0)[:2] if eigen_solver == "lanczos" else \
        evals[torch.argsort(evals.abs(), descending=True)[:2]].sort(descending=True).values
    assert out["eig_1"] == pytest.approx(float(ref[0]), rel=1e-5)
    assert out["eig_2"] == pytest.approx(float(ref[1]), rel=1e-5)
    assert ("lambda_max" in out) == (eigen_solver == "lanczos")
    assert abs(out["trace"] - float(torch.trace(H))) <= 4 * out["trace_stderr"] + 1e-9


def test_warm_start_reduces_products_during_training(tmp_path):
    def run(warm):
        cb = CurvatureMonitor(every_n_train_steps=2, top_k=1, tol=1e-3, warm_start=warm, data="fixed",
                              metrics=["eigenvalues"])
        logger = CSVLogger(tmp_path, name=f"warm{warm}")
        pl.seed_everything(0, verbose=False)  # the same initial weights for both runs
        fit(tmp_path, [cb], model=Net(lr=0.001, batchnorm=False, dropout=0.0), max_steps=11, loggers=[logger],
            batch_size=N)
        rows = rows_with(read_csv(logger), "curvature/num_hvps")
        return [float(r["curvature/num_hvps"]) for r in rows]

    cold, warm = run(False), run(True)
    assert len(cold) == len(warm) == 6
    assert warm[0] == cold[0]  # the first estimate has nothing to start from
    assert sum(warm[1:]) < 0.7 * sum(cold[1:]), (cold, warm)  # measured: about half


def test_density_is_logged_as_a_tensorboard_histogram(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = CurvatureMonitor(every_n_train_steps=3, num_probes=4, max_iter=10, metrics=["density", "lambda_min"])
    fit(tmp_path, [cb], loggers=[tb, CSVLogger(tmp_path, name="csv")], max_steps=4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})  # default keeps 1 histogram per tag
    acc.Reload()
    assert [e.step for e in acc.Histograms("curvature/density")] == [0, 3]
    assert {"curvature/lambda_min", "curvature/density_mean"} <= set(acc.Tags()["scalars"])
    assert cb.last_density is not None


def test_tensorboard_layout_and_eigenvalue_histograms_written_by_the_callback(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    cb = CurvatureMonitor(every_n_train_steps=3, top_k=2, num_probes=4, max_iter=10)
    fit(tmp_path, [cb], loggers=[tb, CSVLogger(tmp_path, name="csv")], max_steps=4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import metadata

    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("curvature/eigenvalues")] == [0, 3]
    assert acc.Histograms("curvature/eigenvalues")[0].histogram_value.num == 2
    layouts = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    assert len(layouts) == 1  # written once, with the first estimate
