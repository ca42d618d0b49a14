"""Training-loop variants and faults: precision, accumulation, manual optimisation, resume, memory, data shapes."""

import gc
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from test_callback import Net, fit, make_data, read_csv, rows_with
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_curvature import CurvatureMonitor, HessianOperator


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _monitor(**kw):
    kw.setdefault("every_n_train_steps", 2)
    kw.setdefault("num_probes", 4)
    kw.setdefault("max_iter", 10)
    return CurvatureMonitor(**kw)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}],  # "16-mixed" is bf16 on CPU in Lightning
    ids=["bf16-mixed", "accumulate"],
)
def test_bit_identical_weights_in_training_variants(tmp_path, trainer_kwargs):
    _, without = fit(tmp_path, [], max_steps=6, **trainer_kwargs)
    cb = _monitor(metrics=["trace", "eigenvalues", "grad_curvature", "eos"])
    _, with_cb = fit(tmp_path, [cb], max_steps=6, **trainer_kwargs)
    assert _same_weights(without, with_cb)
    assert cb._num_estimates == 3
    assert all(math.isfinite(v) for v in cb.last_metrics.values())


class ManualTwoOptimizers(Net):
    """Manual optimisation with two optimizers; the loss for curvature comes from the hook."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def curvature_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        loss = self.curvature_loss(batch)
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(loss)
        opt_a.step()
        opt_b.step()
        self.log("train/loss", loss)

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.1), torch.optim.Adam(rest, lr=0.01)


def test_manual_optimisation_with_two_optimizers(tmp_path):
    pl.seed_everything(0, verbose=False)
    _, without = fit(tmp_path, [], model=ManualTwoOptimizers(), max_steps=12)
    cb = _monitor(every_n_train_steps=4, metrics=["trace", "eigenvalues"])
    pl.seed_everything(0, verbose=False)
    trainer, with_cb = fit(tmp_path, [cb], model=ManualTwoOptimizers(), max_steps=12)
    assert trainer.global_step == 12  # two optimizer steps per batch
    assert _same_weights(without, with_cb)
    assert cb._num_estimates == 3  # global steps 0, 4, 8


def test_resumed_run_logs_the_same_values_as_an_uninterrupted_one(tmp_path):
    def loader():
        # full batch: every step sees the same data, so the training itself resumes exactly (Lightning replays
        # mini-batch orders differently after a resume, which is not what this test is about)
        return DataLoader(make_data(), batch_size=64, shuffle=False)

    def monitor():
        return CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=5, max_iter=30, data="fixed",
                                metrics=["trace", "eigenvalues", "lambda_min", "grad_curvature"])

    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)
    full_logger = CSVLogger(tmp_path, name="full")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=10, callbacks=[monitor(), ckpt], logger=full_logger, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    trainer.fit(Net(dropout=0.0), loader())
    path = tmp_path / "ckpt" / "epoch=3-step=4.ckpt"
    resumed_logger = CSVLogger(tmp_path, name="resumed")
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=10, callbacks=[monitor()], logger=resumed_logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         accelerator="cpu")
    trainer.fit(Net(dropout=0.0), loader(), ckpt_path=path)
    full = {int(r["step"]): r for r in rows_with(read_csv(full_logger), "curvature/trace")}
    resumed = {int(r["step"]): r for r in rows_with(read_csv(resumed_logger), "curvature/trace")}
    assert sorted(full) == [0, 2, 4, 6, 8] and sorted(resumed) == [4, 6, 8]
    for step in resumed:
        for k, v in resumed[step].items():
            if k.startswith("curvature/") and k not in ("curvature/seconds", "curvature/overhead") and v != "":
                assert float(v) == float(full[step][k]), (step, k)  # generator, warm starts and batches restored


def _live_tensors():
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_estimates_keep_no_graphs_or_vectors_alive():
    model = Net()
    x, y = make_data().tensors
    cb = CurvatureMonitor(top_k=3, num_probes=6, metrics=["trace", "eigenvalues", "lambda_min", "grad_curvature",
                                                          "density"], module_depth=2)
    from lightning_curvature.callback import select_blocks

    cb.plan.blocks = select_blocks(model, None, 2)
    for _ in range(5):
        cb.estimate(model, [((x, y), 0)])
    before = _live_tensors()
    for _ in range(50):
        cb.estimate(model, [((x, y), 0)])
    assert _live_tensors() <= before


@pytest.mark.slow
def test_no_memory_growth_over_2000_steps(tmp_path):
    counts = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (200, 2000):
                counts[trainer.global_step] = _live_tensors()

    cb = CurvatureMonitor(every_n_train_steps=10, num_probes=4, max_iter=20)
    fit(tmp_path, [cb, Probe()], model=Net(batchnorm=False, dropout=0.0), max_steps=2000, batch_size=32)
    assert cb._num_estimates == 200
    assert counts[2000] <= counts[200]


class DictStream(IterableDataset):
    """An iterable dataset of dict batches with a non-tensor field."""

    def __iter__(self):
        x, y = make_data().tensors
        for i in range(len(x)):
            yield {"x": x[i], "y": y[i], "id": f"example-{i}"}


class DictNet(Net):
    def training_step(self, batch, batch_idx):
        assert isinstance(batch["id"], list)
        loss = F.cross_entropy(self(batch["x"]), batch["y"])
        self.log("train/loss", loss, batch_size=len(batch["id"]))
        return loss


@pytest.mark.parametrize("data", ["fixed", "current"])
def test_iterable_dataset_with_dict_batches_and_non_tensor_fields(tmp_path, data):
    cb = _monitor(data=data, num_batches=2 if data == "fixed" else 1)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=5, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(DictNet(), DataLoader(DictStream(), batch_size=8))
    assert cb._num_estimates == 3 and math.isfinite(cb.last_metrics["trace"])
    if data == "fixed":
        assert len(cb._fixed_batches) == 2 and cb._fixed_batches[0][0]["id"][0] == "example-0"


@pytest.mark.parametrize("accumulation,samples", [("step", 16), ("first", 8)])
def test_accumulation_measures_the_whole_steps_objective(tmp_path, accumulation, samples):
    """lr=0, micro-batches of 8, two per step: "step" is the Hessian of the mean of both micro-batch losses (here the
    loss on the first 16 examples), "first" that of the first micro-batch."""
    model = Net(lr=0.0, optimizer="sgd", batchnorm=False, dropout=0.0).double()
    x, y = make_data().tensors
    x = x.double()
    cb = CurvatureMonitor(every_n_train_steps=2, top_k=2, tol=1e-9, max_iter=200, dtype="float64",
                          accumulation=accumulation, metrics=["eigenvalues"])
    trainer = pl.Trainer(max_steps=3, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, accelerator="cpu",
                         accumulate_grad_batches=2)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False))
    assert cb._num_estimates == 2 and cb._last_step == 2  # steps 0 and 2
    model.eval()
    xs, ys = x[2 * 16:2 * 16 + samples], y[2 * 16:2 * 16 + samples]  # step 2 = micro-batches 4 and 5
    op = HessianOperator(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (xs,)), ys),
                         dict(model.named_parameters()))
    expected = torch.linalg.eigvalsh(op.matmat(torch.eye(op.shape[0], dtype=torch.float64))).flip(0)
    assert cb.last_metrics["eig_1"] == pytest.approx(float(expected[0]), rel=1e-7)
    assert cb.last_metrics["eig_2"] == pytest.approx(float(expected[1]), rel=1e-7)
    assert cb.last_metrics["loss"] == pytest.approx(op.loss, rel=1e-10)


# ---------------------------------------------------------------- cadence budget (fake clock)
class _FakeTime(pl.Callback):
    """A clock that only moves when told: ``train`` seconds per training batch, ``val`` per validation batch."""

    def __init__(self, train=1.0, val=0.0):
        self.now, self.train, self.val = 0.0, train, val

    def __call__(self):
        return self.now

    def on_train_batch_end(self, *args):
        self.now += self.train

    def on_validation_batch_end(self, *args):
        self.now += self.val


class _ValNet(Net):
    def validation_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])


def _budgeted_run(tmp_path, cb, steps, estimate_seconds, val_seconds=0.0, name="run"):
    """Fit with a fake clock: every training batch takes 1 s, every estimate ``estimate_seconds``."""
    clock = _FakeTime(val=val_seconds)
    cb.budget.clock = clock
    real = cb.estimate

    def estimate(*args, **kwargs):
        out = real(*args, **kwargs)
        clock.now += estimate_seconds
        return out

    cb.estimate = estimate
    logger = CSVLogger(tmp_path, name=name)
    val = {"val_check_interval": 10, "limit_val_batches": 2, "num_sanity_val_steps": 0} if val_seconds else {
        "limit_val_batches": 0}
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_steps=steps, callbacks=[clock, cb], logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                         accelerator="cpu", **val)
    loader = DataLoader(make_data(), batch_size=4, shuffle=True)
    trainer.fit(_ValNet(dropout=0.0), loader, *([DataLoader(make_data(1), batch_size=32)] if val_seconds else []))
    rows = rows_with(read_csv(logger), "curvature/lambda_max")
    return [int(r["step"]) for r in rows], rows


def _simulated_steps(budget, steps, estimate_seconds):
    """The steps a bare CadenceBudget picks when every step takes 1 s and every estimate ``estimate_seconds``."""
    now = [0.0]
    budget.clock = lambda: now[0]
    picked = []
    for step in range(steps):
        budget.on_step(step)
        if budget.due(step):
            picked.append(step)
            with budget.measure():
                now[0] += estimate_seconds
        now[0] += 1.0
    return picked


def _cheap(**kw):
    return CurvatureMonitor(metrics=["eigenvalues"], max_iter=8, tol=1e-2, **kw)


def test_default_cadence_keeps_estimates_within_the_overhead_budget(tmp_path):
    from lightning_curvature.budget import CadenceBudget

    cb = _cheap()
    assert cb.every_n_train_steps is None and cb.budget.max_overhead == 0.05
    # 1 s per step, 2 s per estimate: 5% allows one estimate per 40 steps
    steps, rows = _budgeted_run(tmp_path, cb, 200, estimate_seconds=2.0)
    expected = _simulated_steps(CadenceBudget(0.05), 200, 2.0)
    assert steps == expected and steps[0] == 0 and len(steps) >= 4
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    # the first (cold) estimate is charged and predicts the second at half its cost (3 s to earn: 60 steps); from then
    # on never more often than 5% allows, the steady gap being 40
    assert gaps[0] == 60 and all(g >= 40 for g in gaps[1:]) and gaps[-1] <= 41
    assert [float(r["curvature/every_n_steps"]) for r in rows[1:]] == gaps  # the effective cadence is logged
    overheads = [float(r["curvature/overhead"]) for r in rows[1:]]
    assert overheads[-1] == pytest.approx(2.0 * (len(steps) - 1) / steps[-1], rel=1e-9)  # estimates / training
    assert overheads[-1] <= 0.05 + 2.0 / steps[-1]  # within budget, up to the one in flight


def test_validation_time_is_not_training_time_for_the_budget(tmp_path):
    plain, _ = _budgeted_run(tmp_path, _cheap(), 120, estimate_seconds=2.0, name="plain")
    slow_val, _ = _budgeted_run(tmp_path, _cheap(), 120, estimate_seconds=2.0, val_seconds=50.0, name="val")
    assert slow_val == plain  # 100 s of validation every 10 steps would otherwise buy an estimate at every step


def test_explicit_cadence_is_exact_and_a_budget_only_when_asked(tmp_path):
    from lightning_curvature.budget import CadenceBudget

    exact, rows = _budgeted_run(tmp_path, _cheap(every_n_train_steps=7), 50, estimate_seconds=100.0, name="exact")
    assert exact == list(range(0, 50, 7))  # 100 s estimates against 1 s steps: still exactly every 7
    assert [float(r["curvature/every_n_steps"]) for r in rows[1:]] == [7.0] * (len(exact) - 1)
    both, _ = _budgeted_run(tmp_path, _cheap(every_n_train_steps=5, max_overhead=0.1), 120, estimate_seconds=2.0,
                            name="both")
    assert both == _simulated_steps(CadenceBudget(0.1, min_every=5), 120, 2.0)
    assert all(s % 5 == 0 for s in both) and all(b - a >= 20 for a, b in zip(both[1:], both[2:]))
