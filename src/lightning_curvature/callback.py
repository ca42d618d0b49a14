"""``CurvatureMonitor``: the Lightning adapter. When to measure, on which batch, and where the numbers go.

What is measured lives in :mod:`~lightning_curvature.plan` (plain torch), how a Lightning run becomes an operator in
:mod:`~lightning_curvature._lightning`, and what keeps an estimate invisible and never fatal to training in
:mod:`~lightning_curvature.isolation`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from ._lightning import (
    LOSS_HOOK,
    OUTPUTS_HOOK,
    any_rank,
    build_operator,
    check_strategy,
    differentiated_parameters,
    draw_fixed_batches,
    is_compiled,
    is_sharded,
    max_over_ranks,
    world_size,
)
from .budget import CadenceBudget
from .finite_difference import race_backends, sharded_space
from .isolation import ErrorBoundary, NonFiniteError, isolated
from .operators import HVPUnsupportedError
from .options import DEFAULT_METRICS, MonitorOptions, args_doc
from .plan import MeasurementPlan, metric_keys_doc, select_blocks
from .spaces import shard_of, whole_of

__all__ = ["CurvatureMonitor", "check_strategy", "select_blocks"]

_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(MonitorOptions))


def _warn(message: str) -> None:
    rank_zero_warn(message, category=RuntimeWarning)


class CurvatureMonitor(Callback):
    r"""Log Hessian curvature of the training loss every N optimizer steps, next to the loss.

    At each estimate the callback builds the Hessian operator ``H = ∇²_θ L(θ)`` of the training loss with respect to
    the parameters the optimizer trains, on the batch about to be trained on (or on fixed batches), at the current
    weights, and measures it: the top eigenvalues by Lanczos (largest algebraic, warm-started from the previous
    estimate's eigenvectors), the trace by Hutchinson's estimator deflated by those eigenvectors, and whatever else
    ``metrics`` asks for. ``L`` is the loss exactly as ``training_step`` returns it (a mean loss gives a Hessian
    ``1/N`` of a summed one).

    **Which Hessian.** With ``mode="eval"`` (default) the network is evaluated in eval mode (BatchNorm uses running
    statistics, dropout is off). With ``mode="train"`` it runs in train mode, BatchNorm normalises with batch
    statistics without updating the running ones, and dropout masks are fixed for all products of one estimate.

    **Invisible to training.** ``training_step`` is re-run on a private copy of the batch, with the parameters
    substituted (``torch.func.functional_call``), buffers and frozen weights replaced by private copies,
    ``torch.compile`` bypassed (the original modules run eagerly; the training's compiled graphs are neither used nor
    recompiled), ``self.log`` silenced, and the Python-level state of every submodule (``self.hidden``, counters,
    ``self.training_step_outputs``) restored after every call. After the estimate, ``.grad``, parameters, buffers,
    tensor attributes written in place, train/eval flags, optimizer state and the torch/CUDA/NumPy/Python RNG streams
    are as before. Nothing is backpropagated into ``.grad``; probes come from the callback's own generator. A run
    with the callback ends with the same weights, bit for bit, as one without.

    **Never fatal.** Nothing an estimate raises reaches ``fit``. A cause that will recur (an op without second
    derivatives, reentrant activation checkpointing) switches the callback off with one warning; a transient one
    (non-finite values, an exception on one batch, out of memory) skips that estimate with one warning, repeated only
    if it comes back after a successful estimate. Configuration errors known before training raise at construction
    (bad values) or at setup (``top_k`` larger than the number of parameters, a module name that does not exist,
    ``data="fixed"`` asking for more batches than the loader has).

    **When.** At the start of a training batch, once per optimizer step, never during sanity checking or
    validation; step 0 (the initial weights) is measured. By default the cadence is a budget: the callback times its
    estimates and the training between them and stretches the gap so that the estimates, the first (cold) one
    included, take at most ``max_overhead`` (5%) of the training wall time
    (:class:`~lightning_curvature.budget.CadenceBudget`; the gap is logged as ``every_n_steps``, the share so far as
    ``overhead``). With ``every_n_train_steps=n`` the estimates come exactly at
    every multiple of ``n`` of ``trainer.global_step`` (optimizer steps taken so far). With
    gradient accumulation the estimate measures the whole step's objective at its last micro-batch (see
    ``accumulation``). Under DDP every process takes the same decisions (the slowest process's times). The
    values go to every attached logger at the step the loss of that batch is logged at, and
    into ``trainer.callback_metrics`` (so ``ModelCheckpoint``/``EarlyStopping`` can monitor them).

    **The loss.** By default the callback calls ``training_step`` as Lightning does (with the batch index whenever
    the method takes a second positional argument) and uses its return value (a tensor, or a dict with ``"loss"``).
    A module may instead define ``curvature_loss(self, batch) -> Tensor``; it is used when present (needed for manual
    optimisation, whose ``training_step`` steps optimizers).

    **Logged keys** (with the default ``log_prefix="curvature/"``):

    <KEYS>

    TensorBoard loggers also get the ``curvature/eigenvalues`` histogram, with ``"density"`` the
    ``curvature/density`` histogram, and a Custom Scalars layout.

    <ARGS>
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        max_overhead: float | None = None,
        top_k: int = 1,
        num_probes: int = 20,
        trace_rtol: float | None = 0.05,
        trace_estimator: str = "auto",
        eigen_solver: str = "lanczos",
        max_iter: int = 100,
        tol: float = 1e-3,
        data: str = "current",
        num_batches: int = 1,
        accumulation: str = "step",
        mode: str = "eval",
        backend: str = "auto",
        dtype: str = "float32",
        distribution: str = "rademacher",
        warm_start: bool = True,
        density_probes: int = 3,
        density_steps: int = 30,
        landscape_radius: float | None = None,
        landscape_points: int = 21,
        seed: int = 0,
        metrics: Sequence[str] = DEFAULT_METRICS,
        modules: Sequence[str] | None = None,
        module_depth: int | None = None,
        layer_metrics: Sequence[str] = ("trace",),
        curvature: str = "hessian",
        ggn_loss: str = "cross_entropy",
        parameters: str = "optimizer",
        log_prefix: str = "curvature/",
    ) -> None:
        args = {k: v for k, v in locals().items() if k in _OPTION_NAMES}
        self.options = MonitorOptions(**args)
        self.plan = MeasurementPlan(self.options, warn=_warn)
        self.boundary = ErrorBoundary("CurvatureMonitor", recurring=(HVPUnsupportedError,), warn=_warn)
        self._last_step = -1
        self._seen_step = -1
        self._clock = time.perf_counter  # of the backend comparison (tests pass a fake one)
        self._micro_step, self._micro = -1, []  # micro-batches of the step being collected (accumulation="step")
        self._num_estimates = 0
        self._first_order = False  # "auto" found no exact backend, or a faster one: finite differences from now on
        self._raced = False  # "auto" on a compiled module: the two backends were compared (once)
        self._sharded = False  # FSDP2: finite differences of the strategy's own (already averaged) gradients
        self._vectors: str | None = None  # FSDP2: "local" (each process its shards of every vector) or "whole"
        self._update_snapshot: tuple[int, dict[str, Tensor]] | None = None
        self._fixed_batches: list[Any] | None = None
        self.budget = CadenceBudget(self.options.budget_overhead, min_every=self.options.every_n_train_steps or 1)
        self.last_metrics: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        # the options read as attributes (cb.top_k, cb.metrics, ...)
        if name in _OPTION_NAMES and "options" in self.__dict__:
            return getattr(self.__dict__["options"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def last_density(self) -> Any:
        """The spectral density of the latest estimate (with ``"density"`` in ``metrics``)."""
        return self.plan.last_density

    @property
    def disabled(self) -> bool:
        """Whether the callback switched itself off (see "Never fatal")."""
        return self.boundary.disabled

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def state_key(self) -> str:
        # Lightning asks for it several times per batch; the arguments it depends on are fixed at construction
        if self.__dict__.get("_state_key") is None:
            self._state_key = self._generate_state_key(
                every_n_train_steps=self.options.every_n_train_steps, top_k=self.options.top_k,
                log_prefix=self.options.log_prefix,
            )
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        snapshot = self._update_snapshot
        if self._vectors == "local":
            # this process's shards: a checkpoint keeps rank zero's state only, which every process would load as its
            # own (a resumed run skips one update_curvature instead)
            snapshot = None
        return {
            "last_step": self._last_step,
            "num_estimates": self._num_estimates,
            "plan": self.plan.state_dict(),
            # the weights one step before the next estimate, when a checkpoint falls between the two
            "update_snapshot_step": -1 if snapshot is None else snapshot[0],
            "update_snapshot": None if snapshot is None else {k: v.cpu() for k, v in snapshot[1].items()},
            "disabled": self.boundary.disabled,
            "first_order": self._first_order,
            "budget": self.budget.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._num_estimates = int(state_dict["num_estimates"])
        if "plan" in state_dict:
            self.plan.load_state_dict(state_dict["plan"])
        elif "generator_state" in state_dict:  # checkpoints of version 0.1 (their vectors carry no layout: dropped)
            self.plan.generator.set_state(state_dict["generator_state"])
        snapshot = state_dict.get("update_snapshot")
        self._update_snapshot = None if not isinstance(snapshot, dict) else (
            int(state_dict["update_snapshot_step"]), snapshot)
        self.boundary.disabled = bool(state_dict.get("disabled", False))
        self._first_order = bool(state_dict.get("first_order", False))
        if isinstance(state_dict.get("budget"), dict):
            self.budget.load_state_dict(state_dict["budget"])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(pl_module).__name__
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise ValueError(
                f"CurvatureMonitor: {name} has no trainable parameters (none with requires_grad=True), so there is no "
                "Hessian to measure."
            )
        if not pl_module.automatic_optimization and not callable(getattr(pl_module, LOSS_HOOK, None)):
            raise ValueError(
                f"CurvatureMonitor: {name} uses manual optimisation, whose training_step steps the optimizers and "
                f"cannot be re-run. Define `{LOSS_HOOK}(self, batch) -> Tensor` returning the loss."
            )
        check_strategy(trainer.strategy, self.options.backend)
        self._sharded = is_sharded(trainer.strategy)
        if self.options.curvature == "ggn" and not callable(getattr(pl_module, OUTPUTS_HOOK, None)):
            raise ValueError(
                f"CurvatureMonitor(curvature='ggn') needs the network output and the targets separately: define "
                f"`{OUTPUTS_HOOK}(self, batch) -> (outputs, targets)` on {name}; the loss applied to them is "
                f"`ggn_loss` ({self.options.ggn_loss!r}, mean over the batch)."
            )
        if "layers" in self.options.metrics:
            self.plan.blocks = select_blocks(pl_module, self.options.modules, self.options.module_depth)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        o = self.options
        if "preconditioned" in o.metrics:
            opt = trainer.optimizers[0] if trainer.optimizers else None
            if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                raise ValueError(
                    "CurvatureMonitor: metric 'preconditioned' (Adam's preconditioned sharpness) needs an Adam or "
                    f"AdamW optimizer; this run has {type(opt).__name__ if opt is not None else 'none'}. Available "
                    "for it: 'eos' (sharpness against the optimizer's own threshold)."
                )
        params = differentiated_parameters(pl_module, trainer.optimizers, o.parameters)
        count = sum(p.numel() for p in params.values())
        if o.top_k > count:
            raise ValueError(
                f"CurvatureMonitor: `top_k={o.top_k}` exceeds the number of parameters the Hessian is taken over "
                f"({count}, `parameters={o.parameters!r}`); use `top_k` <= {count}."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if world_size() > 1:  # every process must take the same cadence decisions
            self.budget.reduce = functools.partial(max_over_ranks, device=pl_module.device)
        if self.options.data == "fixed" and self._fixed_batches is None:
            self._fixed_batches = draw_fixed_batches(trainer, pl_module, self.options.num_batches, self.options.seed)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.boundary.disabled or trainer.sanity_checking:
            return
        o = self.options
        step, budget = trainer.global_step, self.budget
        budget.on_step(step)  # the training time since the previous step; decides whether this step is due
        due = budget.due(step) and step != self._last_step
        whole_step = o.accumulation == "step" and o.data == "current" and trainer.accumulate_grad_batches > 1
        if whole_step:  # collect the step's micro-batches; measure at the last one, before the optimizer moves
            if step != self._micro_step:
                self._micro_step, self._micro = step, []
            if due:
                self._micro.append((batch, batch_idx))
            if not _last_micro_batch(trainer, batch_idx):
                return
        elif step == self._seen_step:  # later micro-batches of a step: nothing new to do
            return
        self._seen_step = step
        previous = None
        if due and self._update_snapshot is not None and self._update_snapshot[0] == step - 1:
            previous = self._update_snapshot[1]
        if "grad_curvature" in o.metrics and budget.next_step == step + 1:  # the weights before this step, for the next
            self.boundary.run(lambda: self._remember_weights(trainer, pl_module, step), rearm=False)
        elif due:
            self._update_snapshot = None
        if not due:
            return
        self._last_step = step
        weights = None
        if o.data == "fixed":
            batches = self._fixed_batches
        elif whole_step:
            batches, self._micro = self._micro, []
            weights = [1.0 / trainer.accumulate_grad_batches] * len(batches)  # as Lightning scales each loss
        else:
            batches = [(batch, batch_idx)]
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        params = differentiated_parameters(pl_module, trainer.optimizers, o.parameters)
        with budget.measure():  # its seconds are the estimate's, not training's
            values = self.estimate(pl_module, batches, optimizer=optimizer, previous_params=previous,  # type: ignore
                                   params=params, weights=weights)
            if world_size() > 1:  # every process decides together, or the collectives would hang
                self.boundary.disabled = any_rank(self.boundary.disabled, pl_module.device)
                self._first_order = any_rank(self._first_order, pl_module.device)
            if values:
                if budget.every is not None:
                    values["every_n_steps"] = float(budget.every)
                if budget.overhead is not None:
                    values["overhead"] = budget.overhead
                self.boundary.run(lambda: self._log(trainer, values), rearm=False)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.pause()  # validation is neither training nor estimate time

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.budget.resume()

    def _remember_weights(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        params = differentiated_parameters(pl_module, trainer.optimizers, self.options.parameters)
        take = shard_of if self._vectors_for(pl_module, params) == "local" else whole_of
        self._update_snapshot = (step, {k: take(p.detach()).clone() for k, p in params.items()})

    def _vectors_for(self, pl_module: pl.LightningModule, params: dict[str, Tensor]) -> str:
        """FSDP2, FSDP1: ``"local"`` (every vector split like the parameters) where the parameters' layout allows it.

        FSDP2 parameters that are not all sharded over one 1-D mesh (some left unsharded, a 2-D mesh) have no split
        the estimators know: those runs keep whole vectors on every process (``O(P)`` each). Said once in a log line,
        and again if the choice changes. (FSDP1 has no such fallback: its flat slices cannot take whole vectors, and
        the operator says why.)
        """
        if not self._sharded:
            return "whole"
        why = None
        try:
            sharded_space(list(params.values()), pl_module)
        except ValueError as err:
            why = str(err).split(";")[0]
        vectors = "whole" if why else "local"
        if vectors != self._vectors:
            self._vectors = vectors
            if why:
                rank_zero_info(f"CurvatureMonitor: sharded parameters: every process holds whole estimator vectors "
                               f"(P entries each): {why}.")
            else:
                rank_zero_info("CurvatureMonitor: sharded parameters: every estimator vector is sharded like the "
                               "parameters (P / world entries per process).")
        return vectors

    # ------------------------------------------------------------------ the estimate
    def estimate(
        self,
        pl_module: pl.LightningModule,
        batches: list[tuple[Any, int]],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        previous_params: dict[str, Tensor] | None = None,
        params: dict[str, Tensor] | None = None,
        weights: list[float] | None = None,
    ) -> dict[str, float]:
        """Measure the curvature of ``pl_module``'s training loss on ``batches`` (``(batch, batch_idx)`` pairs).

        Runs inside the isolation and the error boundary: ``pl_module`` is left exactly as it was, and a failure is a
        warning (the result is then ``{}``).

        Args:
            pl_module: the module.
            batches: ``(batch, batch_idx)`` pairs; several are averaged weighted by batch size.
            optimizer: for the ``"eos"``/``"preconditioned"`` metrics.
            previous_params: the differentiated parameters one optimizer step earlier, by name, for
                ``update_curvature``.
            params: the parameters to differentiate, by name (default: all with ``requires_grad``).
            weights: of each batch's loss (default: by batch size, summing to one).

        Returns:
            The metrics (keys without prefix), or ``{}`` when the estimate was skipped.
        """
        start = time.perf_counter()
        if params is None:
            params = {k: p for k, p in pl_module.named_parameters() if p.requires_grad}

        def attempt(backend: str | None) -> tuple[dict[str, float], Any]:
            op = build_operator(pl_module, batches, params, self.options, seed=self._num_estimates,
                                weights=weights, backend=backend, sharded=self._sharded,
                                vectors=self._vectors_for(pl_module, params))
            try:
                return self.plan.run(op, params=params, optimizer=optimizer, previous_params=previous_params), op
            except NonFiniteError:
                error = getattr(op, "local_error", None)
                if error is not None:  # under DDP: this process failed and sent NaN; report its own error
                    raise error from None
                raise
            finally:
                op.release()

        def measure() -> dict[str, float]:
            if not params:
                raise ValueError("no parameter with requires_grad=True is in the optimizer's parameter groups")
            with isolated(pl_module):
                if self._race_due(pl_module, params):
                    self._race(pl_module, batches, params, weights)
                why = None
                try:
                    out, op = attempt("finite-difference" if self._first_order else None)
                except HVPUnsupportedError as err:
                    if self.options.backend != "auto" or self._first_order:
                        raise
                    why = f"are not possible here ({err})"
                except torch.OutOfMemoryError as err:
                    # one process only: under DDP another process may not have run out, and would not follow
                    if self.options.backend != "auto" or self._first_order or world_size() > 1:
                        raise
                    why = f"ran out of memory ({str(err).splitlines()[0] if str(err) else 'no message'})"
                if why is not None:  # outside the except clause: its traceback no longer holds the failed graph
                    self._first_order = True  # no exact backend works for this model: first-order products
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    rank_zero_info(f"CurvatureMonitor: exact Hessian-vector products {why}; using "
                                   "backend='finite-difference' (central differences of ordinary gradients).")
                    out, op = attempt("finite-difference")
            out["num_hvps"] = float(op.num_matvecs)
            return out

        out = self.boundary.run(measure)
        if out is None:
            return {}
        self._num_estimates += 1
        out["seconds"] = time.perf_counter() - start
        self.last_metrics = out
        return out

    def _race_due(self, pl_module: pl.LightningModule, params: dict[str, Tensor]) -> bool:
        """Whether to compare the backends now: ``"auto"`` on a compiled module, the first time.

        Only where the finite-difference products can run the training's own compiled graphs: ``mode="train"`` (an
        eval-mode gradient through a compiled module compiles another graph), the parameters' own dtype, the
        Hessian, one process.
        """
        o = self.options
        return (o.backend == "auto" and not self._raced and not self._first_order and not self._sharded
                and o.curvature == "hessian" and o.mode == "train" and world_size() == 1 and is_compiled(pl_module)
                and all(p.dtype == o.torch_dtype for p in params.values()))

    def _race(self, pl_module: pl.LightningModule, batches: list[tuple[Any, int]], params: dict[str, Tensor],
              weights: list[float] | None) -> None:
        """Time exact products (on the original modules) against finite differences (through the compiled graphs).

        The faster is used from now on, the finite differences only where they agree with the exact products (see
        :func:`~lightning_curvature.finite_difference.race_backends`); said once in a log line. A comparison that
        fails leaves the exact products in place.
        """
        self._raced = True
        ops: list[Any] = []
        try:
            for backend in (None, "finite-difference"):
                ops.append(build_operator(pl_module, batches, params, self.options, seed=self._num_estimates,
                                          weights=weights, backend=backend))
            race = race_backends(ops[0], ops[1], generator=torch.Generator().manual_seed(self._num_estimates),
                                 clock=self._clock)
        except Exception as err:  # e.g. no exact backend works: the estimate's own fallback handles it
            rank_zero_info(f"CurvatureMonitor: could not compare the backends on this compiled module "
                           f"({type(err).__name__}: {err}); exact products on the original modules.")
            return
        finally:
            for op in ops:
                op.release()
        self._first_order = race.first_order_wins
        choice = ("finite-difference products through the compiled graphs" if race.first_order_wins
                  else "exact products on the original modules")
        rank_zero_info(f"CurvatureMonitor: compiled module, backend='auto': {race.describe()}; using {choice}.")

    # ------------------------------------------------------------------ output
    def _log(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        prefix = self.options.log_prefix
        metrics = {prefix + k: v for k, v in values.items()}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        self._log_tensorboard(trainer, values, step)

    def _log_tensorboard(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        """TensorBoard extras: the custom-scalars layout (once), eigenvalue and density histograms."""
        from .tensorboard import (
            custom_scalars_layout,
            log_density,
            log_histogram,
            log_landscape,
            log_trace_band,
            write_layout,
        )

        prefix = self.options.log_prefix
        eigs = [values[k] for k in sorted((k for k in values if k.startswith("eig_") and k[4:].isdigit()),
                                          key=lambda k: int(k[4:]))]
        loss_tags = sorted({k for k in trainer.callback_metrics if "loss" in k and not k.startswith(prefix)})
        layout = custom_scalars_layout(prefix, self.options.top_k, loss_tags or ["train/loss", "train_loss", "loss"],
                                       metrics=self.options.metrics)
        density = self.plan.last_density
        for logger in trainer.loggers:
            write_layout(logger, layout)
            log_trace_band(logger, prefix, values, step)
            if eigs:
                log_histogram(logger, prefix + "eigenvalues", torch.tensor(eigs), step)
            if "density_mean" in values and density is not None:
                log_density(logger, prefix + "density", density.grid, density.density, step)
            for name, landscape in self.plan.last_landscapes.items():
                log_landscape(logger, prefix + name, landscape, step)


def _last_micro_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer steps after this batch (the last micro-batch of an accumulated step)."""
    try:
        return not trainer.fit_loop.epoch_loop._should_accumulate()
    except AttributeError:  # pragma: no cover - Lightning without the private helper
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


CurvatureMonitor.__doc__ = (CurvatureMonitor.__doc__ or "").replace("<KEYS>", metric_keys_doc()).replace(
    "<ARGS>", args_doc(indent=8).lstrip())
