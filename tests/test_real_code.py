"""Other people's training code: each case trains to the end, logs finite values or warns once with the cause, and
ends bit-identical to the same run without the callback.

Models this project did not write: Lightning's demo LSTM (stateful ``self.hidden``) and Transformer, a tiny Hugging Face
GPT-2 built from a local config (when ``transformers`` is installed), ``torch.compile``, activation checkpointing,
Lightning's ``BackboneFinetuning``, and the patterns of Lightning's own docs (``self.training_step_outputs``).
"""

from __future__ import annotations

import math
import pickle
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import LightningLSTM, LightningTransformer, SimpleLSTM, Transformer
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_curvature import CurvatureMonitor, HessianOperator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------------------------------------------- harness
def classification_data(n=64, d=6, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g))


def token_data(n=32, length=12, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length + 1), generator=g)
    return TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())


def train(model_fn, callbacks=(), *, steps=6, data=None, batch_size=16, shuffle=True, seed=0, **trainer_kwargs):
    pl.seed_everything(seed, verbose=False)
    model = model_fn()
    loader = DataLoader(data if data is not None else classification_data(), batch_size=batch_size, shuffle=shuffle)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=list(callbacks), logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
        num_sanity_val_steps=0, limit_val_batches=0, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, loader)
    return trainer, model


def same_run(model_fn, monitor, *, steps=6, **kwargs):
    """Train without and with ``monitor``; assert bit-identical final weights and buffers.

    Returns the run with the monitor, its module, and the messages of the warnings the monitor gave.
    """
    _, reference = train(model_fn, (), steps=steps, **kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, model = train(model_fn, (monitor,), steps=steps, **kwargs)
    assert trainer.global_step == steps
    expected, got = reference.state_dict(), model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs from the run without the callback"
    messages = [str(w.message) for w in record if "CurvatureMonitor" in str(w.message)]
    return trainer, model, reference, messages


def finite(values, *keys):
    return all(math.isfinite(values[k]) for k in keys)


def monitor(**kw):
    kw.setdefault("every_n_train_steps", 2)
    kw.setdefault("num_probes", 4)
    kw.setdefault("max_iter", 20)
    return CurvatureMonitor(**kw)


class MLP(pl.LightningModule):
    def __init__(self, dropout=0.0, batchnorm=False):
        super().__init__()
        layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batchnorm else []) + [nn.Tanh(), nn.Dropout(dropout)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


# ---------------------------------------------------------------------------------------------------- state
class DemoLSTM(LightningLSTM):
    """Lightning's demo LSTM language model and its stateful training_step, at a test size and on local tokens."""

    def __init__(self):
        super().__init__(vocab_size=40)
        self.model = SimpleLSTM(vocab_size=40, ninp=8, nhid=8, nlayers=2, dropout=0.2)

    def prepare_data(self):
        pass


def test_lightning_demo_lstm_keeps_its_hidden_state_stream():
    cb = monitor(top_k=2, every_n_train_steps=1)
    _, model, reference, messages = same_run(DemoLSTM, cb, data=token_data(), batch_size=8, shuffle=False, steps=3)
    assert messages == [] and cb._num_estimates == 3
    assert finite(cb.last_metrics, "eig_1", "trace", "grad_curvature")


class DemoTransformer(LightningTransformer):
    """Lightning's demo Transformer (nn.Transformer encoder-decoder, dropout) at a test size."""

    def __init__(self):
        super().__init__(vocab_size=40)
        self.model = Transformer(vocab_size=40, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.1)

    def prepare_data(self):
        pass


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_lightning_demo_transformer(mode):
    cb = monitor(mode=mode)
    _, _, _, messages = same_run(DemoTransformer, cb, data=token_data(), batch_size=8)
    assert messages == [] and cb._num_estimates == 3
    assert finite(cb.last_metrics, "eig_1", "trace")


class Stateful(MLP):
    """The patterns of Lightning's docs and of distillation code: counters, step-output lists, an EMA teacher."""

    def __init__(self):
        super().__init__(dropout=0.2)
        self.calls = 0
        self.training_step_outputs = []
        self.history = {"losses": [], "outputs_per_epoch": []}
        self.teacher = nn.Linear(6, 3).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls += 1
        x.mul_(1.5)  # edits the batch in place
        logits = self(x)
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), (self.head.weight @ self.body[0].weight, self.head.bias)):
                t.mul_(0.9).add_(0.1 * s)  # a frozen teacher updated in place
        loss = F.cross_entropy(logits, y) + 0.1 * F.mse_loss(logits, self.teacher(x))
        self.training_step_outputs.append(loss)
        self.history["losses"].append(float(loss))
        return loss

    def on_train_epoch_end(self):
        self.history["outputs_per_epoch"].append(len(self.training_step_outputs))
        self.training_step_outputs.clear()


def test_counters_step_outputs_teacher_and_batch_edits_are_untouched():
    cb = monitor(mode="train", metrics=["trace", "eigenvalues", "grad_curvature"])
    _, model, reference, messages = same_run(Stateful, cb, steps=3)
    assert messages == [] and cb._num_estimates == 2
    assert model.calls == reference.calls == 3
    assert model.history == reference.history and model.history["outputs_per_epoch"] == [3]


# ---------------------------------------------------------------------------------------------------- signatures
class NoIndex(MLP):
    def training_step(self, batch, batch_nb):
        self.seen = batch_nb
        return super().training_step(batch, batch_nb)


class Varargs(MLP):
    def training_step(self, *args):
        assert len(args) == 2
        return super().training_step(*args)


class OneArg(MLP):
    def training_step(self, batch):
        return super().training_step(batch, 0)


@pytest.mark.parametrize("cls", [NoIndex, Varargs, OneArg])
def test_training_step_is_called_as_lightning_calls_it(cls):
    cb = monitor()
    _, _, _, messages = same_run(cls, cb, steps=3)
    assert messages == [] and cb._num_estimates == 2 and finite(cb.last_metrics, "trace")


# ---------------------------------------------------------------------------------------------------- faults
class FailsOnlyWhenRerun(MLP):
    def training_step(self, batch, batch_idx):
        if not isinstance(self.head.weight, nn.Parameter):  # true only inside the callback's functional re-run
            raise RuntimeError("this step cannot run functionally")
        return super().training_step(batch, batch_idx)


def test_an_exception_only_in_the_rerun_is_one_warning():
    cb = monitor(every_n_train_steps=1)
    _, _, _, messages = same_run(FailsOnlyWhenRerun, cb, steps=4)
    assert len(messages) == 1, messages
    assert "skipped an estimate: RuntimeError: this step cannot run functionally" in messages[0]
    assert "test_real_code.py" in messages[0]  # where it was raised
    assert cb._num_estimates == 0 and not cb.disabled


class InfInput(MLP):
    """One batch carries an infinite input: finite loss, non-finite products; the module sanitises its gradients."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.trainer.global_step == 2:
            x = x.clone()
            x[0, 0] = float("inf")
        return F.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        for p in self.parameters():
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)


@pytest.mark.parametrize("metrics", [["eigenvalues", "trace"], ["lambda_min"], ["density"]])
def test_an_infinite_input_skips_that_estimate_with_one_warning(metrics):
    cb = monitor(every_n_train_steps=1, metrics=metrics)
    _, _, _, messages = same_run(InfInput, cb, steps=5)
    assert len(messages) == 1 and "skipped an estimate" in messages[0] and "not finite" in messages[0], messages
    assert cb._num_estimates == 4


def test_a_transient_failure_warns_again_after_a_success():
    class Flaky(MLP):
        def training_step(self, batch, batch_idx):
            if not isinstance(self.head.weight, nn.Parameter) and self.trainer.global_step in (0, 1, 3):
                raise RuntimeError("flaky")
            return super().training_step(batch, batch_idx)

    cb = monitor(every_n_train_steps=1)
    _, _, _, messages = same_run(Flaky, cb, steps=5)
    assert len(messages) == 2  # steps 0-1 (one streak), then again at 3 after the success at 2
    assert cb._num_estimates == 2


def test_top_k_larger_than_the_parameters_raises_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"top_k=100.*exceeds the number of parameters.*\(83"):
        train(MLP, [monitor(top_k=100, max_iter=100)], steps=2)


def test_callback_pickles_for_ddp_spawn():
    cb = monitor(top_k=2)
    cb.plan.generator.manual_seed(7)
    expected = torch.rand(3, generator=cb.plan.generator)
    cb.plan.generator.manual_seed(7)
    clone = pickle.loads(pickle.dumps(cb))
    assert torch.equal(torch.rand(3, generator=clone.plan.generator), expected)
    assert clone.options == cb.options
    _, _, _, messages = same_run(MLP, clone, steps=3)
    assert messages == [] and clone._num_estimates == 2


# ---------------------------------------------------------------------------------------------------- checkpointing
class Checkpointed(MLP):
    def __init__(self, reentrant=False, dropout=0.3, batchnorm=True, use=True):
        super().__init__(dropout=dropout, batchnorm=batchnorm)
        self.reentrant, self.use = reentrant, use

    def forward(self, x):
        if self.use:
            h = checkpoint(self.body, x.requires_grad_(self.reentrant), use_reentrant=self.reentrant)
        else:
            h = self.body(x)
        return self.head(h)


@pytest.mark.parametrize("mode,dtype", [("eval", "float32"), ("train", "float32"), ("eval", "float64")])
def test_non_reentrant_checkpointing_gives_the_unchecked_models_values(mode, dtype):
    cb = monitor(mode=mode, dtype=dtype, top_k=2, tol=1e-6, max_iter=60, metrics=["eigenvalues", "grad_curvature"])
    same_run(Checkpointed, cb, steps=3)
    assert cb._num_estimates == 2
    # the same weights and batch through the model without checkpointing, by the same callback settings
    checked = Checkpointed()
    plain = Checkpointed(use=False)
    plain.load_state_dict(checked.state_dict())
    x, y = classification_data().tensors
    outs = []
    for model in (checked, plain):
        m = monitor(mode=mode, dtype=dtype, top_k=2, tol=1e-6, max_iter=60, metrics=["eigenvalues", "grad_curvature"])
        outs.append(m.estimate(model, [((x[:16], y[:16]), 0)]))
    for key in ("loss", "eig_1", "eig_2", "grad_curvature"):
        assert outs[0][key] == pytest.approx(outs[1][key], rel=1e-5 if dtype == "float32" else 1e-10), key


def test_the_backward_replays_the_forward_context_only_when_checkpointing_recomputes():
    from lightning_curvature import module_loss_fn

    x, y = classification_data().tensors
    for use, expected in ((True, True), (False, False)):
        model = Checkpointed(use=use)
        loss_fn, theta = module_loss_fn(model, lambda m: F.cross_entropy(m(x), y))
        loss_fn(theta)
        assert loss_fn.recomputes is expected


def test_reentrant_checkpointing_switches_an_exact_backend_off_naming_the_fix():
    cb = monitor(every_n_train_steps=1, backend="double-backward")
    _, _, _, messages = same_run(lambda: Checkpointed(reentrant=True), cb, steps=3)
    assert len(messages) == 1 and "switched off" in messages[0] and "use_reentrant=False" in messages[0]
    assert cb.disabled


def test_reentrant_checkpointing_gets_first_order_products_under_auto():
    cb = monitor(every_n_train_steps=1, top_k=2, tol=1e-4, max_iter=40, metrics=["eigenvalues", "grad_curvature"])
    _, model, _, messages = same_run(lambda: Checkpointed(reentrant=True, dropout=0.0, batchnorm=False), cb, steps=3)
    assert messages == [] and cb._num_estimates == 3 and cb._first_order
    plain = Checkpointed(use=False, dropout=0.0, batchnorm=False)
    plain.load_state_dict(model.state_dict())
    x, y = classification_data().tensors
    fd = monitor(top_k=2, tol=1e-4, max_iter=40, backend="finite-difference", metrics=["eigenvalues"])
    exact = monitor(top_k=2, tol=1e-4, max_iter=40, metrics=["eigenvalues"])
    a, b = fd.estimate(model, [((x[:16], y[:16]), 0)]), exact.estimate(plain, [((x[:16], y[:16]), 0)])
    assert a["eig_1"] == pytest.approx(b["eig_1"], rel=1e-3) and a["eig_2"] == pytest.approx(b["eig_2"], rel=1e-3)


# ---------------------------------------------------------------------------------------------------- parameters
class SparseEmbedding(pl.LightningModule):
    def __init__(self, sparse=True):
        super().__init__()
        self.emb = nn.Embedding(40, 4, sparse=sparse)
        self.head = nn.Linear(4, 40)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(torch.tanh(self.emb(x))).reshape(-1, 40), y.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sparse_embeddings_give_the_dense_models_products():
    cb = monitor(top_k=2, dtype="float64", tol=1e-8, max_iter=100, metrics=["eigenvalues", "grad_curvature"])
    same_run(SparseEmbedding, cb, data=token_data(), batch_size=8, steps=3)
    assert cb._num_estimates == 2
    sparse, dense = SparseEmbedding(), SparseEmbedding(sparse=False)
    dense.load_state_dict(sparse.state_dict())
    x, y = token_data().tensors
    outs = [monitor(top_k=2, dtype="float64", tol=1e-8, max_iter=100).estimate(m, [((x[:8], y[:8]), 0)])
            for m in (sparse, dense)]
    for key in ("eig_1", "eig_2", "trace"):
        assert outs[0][key] == pytest.approx(outs[1][key], rel=1e-9), key


class Backbone(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(filter(lambda p: p.requires_grad, self.parameters()), lr=0.1)


def test_backbone_finetuning_changes_the_trainable_set_between_estimates():
    from lightning.pytorch.callbacks import BackboneFinetuning

    cb = monitor(every_n_train_steps=1, top_k=2, metrics=["eigenvalues", "trace", "grad_curvature"])
    sizes = []

    class Sizes(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cb.plan.layout is not None:
                sizes.append(sum(math.prod(shape) for _, shape in cb.plan.layout))

    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = train(Backbone, [finetune, cb, Sizes()], steps=8, batch_size=16)  # 4 steps per epoch
    assert trainer.global_step == 8
    assert not [w for w in record if "CurvatureMonitor" in str(w.message)]
    assert cb._num_estimates == 8
    assert sizes[0] == 27 and sizes[-1] == 27 + 56  # the head alone, then head and backbone
    assert "update_curvature" in cb.last_metrics


def test_parameters_outside_every_optimizer_are_not_differentiated():
    class Partial(MLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.head.parameters(), lr=0.1)  # the body has requires_grad but never moves

    cb = monitor(metrics=["eigenvalues"])
    same_run(Partial, cb, steps=3)
    assert [name for name, _ in cb.plan.layout] == ["head.weight", "head.bias"]
    cb_all = monitor(metrics=["eigenvalues"], parameters="trainable")
    same_run(Partial, cb_all, steps=3)
    assert len(cb_all.plan.layout) == 4


# ---------------------------------------------------------------------------------------------------- torch.compile
class Compiled(MLP):
    def __init__(self, backend, dropout=0.2):
        super().__init__(dropout=dropout)
        self.body = torch.compile(self.body, backend=backend)


def _counting_backend():
    calls = {"compiled": 0, "graphs": 0}

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        calls["graphs"] += 1

        def compiler(fx_graph, _):
            def run(*args):
                calls["compiled"] += 1
                return fx_graph(*args)

            return run

        return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)(gm, example_inputs)

    return backend, calls


@pytest.mark.slow
def test_compiled_modules_keep_their_compiled_graph_and_get_exact_values():
    torch._dynamo.reset()
    backend, without = _counting_backend()
    _, reference = train(lambda: Compiled(backend), (), steps=6)
    torch._dynamo.reset()
    backend2, with_cb = _counting_backend()
    cb = monitor(top_k=2, tol=1e-6, max_iter=40, metrics=["eigenvalues", "grad_curvature"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, model = train(lambda: Compiled(backend2), (cb,), steps=6)
    assert not [w for w in record if "CurvatureMonitor" in str(w.message)]
    # every training step ran the compiled forward and backward (2 calls a step), nothing recompiled
    assert with_cb == without and without["compiled"] == 2 * 6 and without["graphs"] == 1
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert cb._num_estimates == 3
    # the values are those of the eager module (the products never go through dynamo: no silent zeros)
    eager = MLP(dropout=0.2)
    eager.load_state_dict({k.replace("._orig_mod", ""): v for k, v in model.state_dict().items()})
    x, y = classification_data().tensors
    out_c = monitor(top_k=2, tol=1e-6, max_iter=40).estimate(model, [((x[:16], y[:16]), 0)])
    out_e = monitor(top_k=2, tol=1e-6, max_iter=40).estimate(eager, [((x[:16], y[:16]), 0)])
    assert out_c["eig_1"] > 0 and out_c["eig_1"] == pytest.approx(out_e["eig_1"], rel=1e-6)


@pytest.mark.slow
def test_finite_difference_products_run_the_compiled_graph_without_recompiling():
    torch._dynamo.reset()
    backend, without = _counting_backend()
    _, reference = train(lambda: Compiled(backend), (), steps=4)
    torch._dynamo.reset()
    backend2, with_cb = _counting_backend()
    # train mode: the training's own graph serves the products (eval mode would compile a second graph, once)
    cb = monitor(top_k=1, tol=1e-3, max_iter=20, backend="finite-difference", mode="train", metrics=["eigenvalues"])
    trainer, model = train(lambda: Compiled(backend2), (cb,), steps=4)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert cb._num_estimates == 2 and with_cb["graphs"] == without["graphs"] == 1  # no recompilation
    # every gradient of the products ran the compiled forward and backward: 2 calls each, 2 gradients a product
    # and one more per estimate (the kink check's gradient at θ)
    products = cb.last_metrics["num_hvps"]
    assert with_cb["compiled"] - without["compiled"] >= 2 * (2 * products + 1)


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.mark.slow
@pytest.mark.parametrize("first_order_faster", [True, False])
def test_auto_on_a_compiled_module_uses_the_faster_of_the_backends(first_order_faster, monkeypatch, caplog):
    """backend='auto', mode='train': exact products on the original modules and finite differences through the
    compiled graphs are timed once (a fake clock: 2 s an exact product, 1 s or 3 s a first-order one); the faster is
    used from then on, the training's graphs are never recompiled, and the values are those of the eager module."""
    from lightning_curvature.finite_difference import FiniteDifferenceOperator

    clock = _FakeClock()
    for cls, seconds in ((HessianOperator, 2.0), (FiniteDifferenceOperator, 1.0 if first_order_faster else 3.0)):
        def timed(self, v, original=cls.matvec, seconds=seconds):
            clock.now += seconds
            return original(self, v)

        monkeypatch.setattr(cls, "matvec", timed)
    torch._dynamo.reset()
    backend, without = _counting_backend()
    _, reference = train(lambda: Compiled(backend, dropout=0.0), (), steps=4)
    torch._dynamo.reset()
    backend2, with_cb = _counting_backend()
    cb = monitor(mode="train", top_k=1, tol=1e-5, max_iter=40, metrics=["eigenvalues"])
    cb._clock = clock
    trainer, model = train(lambda: Compiled(backend2, dropout=0.0), (cb,), steps=4)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    assert cb._num_estimates == 2 and with_cb["graphs"] == without["graphs"] == 1  # nothing recompiled
    assert cb._first_order is first_order_faster
    lines = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(lines) == 1, lines  # compared once, said once
    assert ("using finite-difference products through the compiled graphs" in lines[0]) is first_order_faster
    assert "finite-difference products 1000.0 ms, exact 2000.0 ms" in lines[0] or not first_order_faster
    # the products of the chosen backend give the eager module's value
    eager = MLP()
    eager.load_state_dict({k.replace("._orig_mod", ""): v for k, v in model.state_dict().items()})
    x, y = classification_data().tensors
    batch = [((x[:16], y[:16]), 0)]
    got = cb.estimate(model, batch)["eig_1"]
    exact = monitor(mode="train", top_k=1, tol=1e-6, max_iter=40).estimate(eager, batch)["eig_1"]
    assert got == pytest.approx(exact, rel=1e-3 if first_order_faster else 1e-5)


@pytest.mark.slow
def test_auto_on_a_compiled_module_keeps_exact_products_when_finite_differences_disagree(monkeypatch, caplog):
    """Finite differences that are faster but wrong (here: perturbed by 1%) are not used."""
    from lightning_curvature.finite_difference import FiniteDifferenceOperator

    original = FiniteDifferenceOperator.matvec
    monkeypatch.setattr(FiniteDifferenceOperator, "matvec", lambda self, v: 1.01 * original(self, v))
    cb = monitor(mode="train", top_k=1, metrics=["eigenvalues"])
    cb._clock = _FakeClock()  # every product takes no time: the first-order one is not slower
    torch._dynamo.reset()
    backend, _ = _counting_backend()
    train(lambda: Compiled(backend, dropout=0.0), (cb,), steps=2)
    assert cb._raced and not cb._first_order
    lines = [r.getMessage() for r in caplog.records if "backend='auto'" in r.getMessage()]
    assert len(lines) == 1 and "relative difference 0.01" in lines[0] and "exact products" in lines[0]


def test_auto_compares_the_backends_only_where_finite_differences_run_the_training_graph():
    backend, _ = _counting_backend()
    compiled, plain = Compiled(backend, dropout=0.0), MLP()
    params = dict(compiled.named_parameters())
    assert monitor(mode="train")._race_due(compiled, params)
    assert not monitor(mode="eval")._race_due(compiled, params)  # an eval-mode gradient compiles another graph
    assert not monitor(mode="train")._race_due(plain, params)  # not compiled: exact products
    assert not monitor(mode="train", dtype="float64")._race_due(compiled, params)  # a cast recompiles
    assert not monitor(mode="train", backend="double-backward")._race_due(compiled, params)  # an explicit choice


# ---------------------------------------------------------------------------------------------------- Hugging Face
class TinyGPT2(pl.LightningModule):
    def __init__(self, checkpointing=False):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(config)
        if checkpointing:
            self.model.gradient_checkpointing_enable()

    def training_step(self, batch, batch_idx):
        x, _ = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("mode,checkpointing", [("eval", False), ("train", False), ("train", True)])
def test_hugging_face_gpt2(mode, checkpointing):
    pytest.importorskip("transformers")
    cb = monitor(mode=mode, metrics=["eigenvalues", "trace", "eos", "grad_curvature"])
    _, model, _, messages = same_run(lambda: TinyGPT2(checkpointing), cb, data=token_data(), batch_size=8, steps=3)
    assert messages == [] and cb._num_estimates == 2
    assert finite(cb.last_metrics, "eig_1", "trace", "eos_ratio", "grad_curvature")
    if checkpointing:  # values, not a switch-off: and the same values as without checkpointing
        plain = TinyGPT2(False)
        plain.load_state_dict(model.state_dict())
        x, _ = token_data().tensors
        outs = [monitor(mode=mode, tol=1e-6, max_iter=60).estimate(m, [((x[:8], x[:8]), 0)]) for m in (model, plain)]
        assert outs[0]["eig_1"] == pytest.approx(outs[1]["eig_1"], rel=1e-4)


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
def test_finite_differences_in_eval_mode_measure_the_eval_mode_hessian(model):
    """The callback's first-order products keep ``mode="eval"`` for every gradient of a module with dropout (our MLP
    with BatchNorm, Hugging Face's GPT-2), though the wrapper that restores the module's Python state after each
    gradient puts back the ``training`` flags it had when the estimate started (it used to: 24x the exact product)."""
    if model == "gpt2":
        pl_module = TinyGPT2()
        x, _ = token_data().tensors
        batch = [((x[:8], x[:8]), 0)]
    else:
        torch.manual_seed(0)
        pl_module = MLP(dropout=0.5, batchnorm=True)
        x, y = classification_data().tensors
        batch = [((x[:16], y[:16]), 0)]
    pl_module.train()  # as during training
    values = {backend: monitor(mode="eval", tol=1e-6, max_iter=60, metrics=["eigenvalues"],
                               backend=backend).estimate(pl_module, batch)["eig_1"]
              for backend in ("finite-difference", "auto")}
    assert values["finite-difference"] == pytest.approx(values["auto"], rel=1e-3)
    assert pl_module.training


def test_estimates_of_a_huggingface_model_match_a_dense_hessian_of_its_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=12, n_positions=8, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    for name, p in model.named_parameters():
        p.requires_grad_(name == "transformer.ln_f.weight")
    x = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(0))

    class Wrapped(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    op = HessianOperator(lambda p: torch.func.functional_call(model, p, (), {"input_ids": x, "labels": x}).loss,
                         params, backend="forward-over-reverse")
    H = op.matmat(torch.eye(op.shape[0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="loss comes back in torch.float32"):  # GPT-2 takes logits.float()
        out = monitor(top_k=2, tol=1e-10, max_iter=8, dtype="float64", metrics=["eigenvalues"]).estimate(
            Wrapped(), [(x, 0)])
    expected = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert out["eig_1"] == pytest.approx(float(expected[0]), rel=1e-8)
    assert out["eig_2"] == pytest.approx(float(expected[1]), rel=1e-8)


def test_a_process_that_fails_sends_nan_so_collectives_never_hang(tmp_path):
    """DistributedOperator: an exception in this process's share becomes NaN in the all-reduce plus local_error."""
    import torch.distributed as dist

    from lightning_curvature.operators import DistributedOperator

    class Broken:
        shape, dtype, device = (3, 3), torch.float64, torch.device("cpu")

        @property
        def loss(self):
            raise RuntimeError("this rank's batch is broken")

        def matvec(self, v):
            raise RuntimeError("this rank's batch is broken")

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        op = DistributedOperator(Broken())
        assert math.isnan(op.loss)
        assert torch.isnan(op.matvec(torch.ones(3, dtype=torch.float64))).all()
        assert "broken" in str(op.local_error)
    finally:
        dist.destroy_process_group()


class UpcastsInside(MLP):
    """Hugging Face models compute the loss on ``logits.float()``: a float64 request is silently float32 there."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x).float(), y)


def test_float64_products_of_a_loss_computed_in_float32_warn_once():
    cb = monitor(every_n_train_steps=1, dtype="float64")
    _, _, _, messages = same_run(UpcastsInside, cb, steps=3)
    assert len(messages) == 1 and "dtype='float64' was asked, but the loss comes back in torch.float32" in messages[0]
    assert cb._num_estimates == 3
