"""``CurvatureMonitor``: a thin Lightning adapter over the operators and estimators."""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from ._guard import rng_guard, training_state_guard
from .dynamics import UnsupportedOptimizer, adam_preconditioner, stability_info
from .estimators import (
    DISTRIBUTIONS,
    SpectralDensity,
    TraceResult,
    block_hutchinson_traces,
    deflated_hutchinson_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from .operators import (
    BACKENDS,
    BlockOperator,
    DistributedOperator,
    GGNOperator,
    HessianOperator,
    HVPUnsupportedError,
    ScaledOperator,
    _cast,
    module_loss_fn,
)

__all__ = ["CurvatureMonitor"]

METRICS: tuple[str, ...] = (
    "trace", "eigenvalues", "lambda_min", "density", "eos", "preconditioned", "grad_curvature", "layers"
)
DEFAULT_METRICS: tuple[str, ...] = ("trace", "eigenvalues", "eos", "grad_curvature")
LAYER_METRICS: tuple[str, ...] = ("trace", "lambda_max", "eig_mass")
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
GGN_LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
OUTPUTS_HOOK = "curvature_outputs"
EIGEN_SOLVERS: tuple[str, ...] = ("lanczos", "power")
TRACE_ESTIMATORS: tuple[str, ...] = ("auto", "hutchinson", "hutchpp", "deflated")
DATA: tuple[str, ...] = ("current", "fixed")
MODES: tuple[str, ...] = ("eval", "train")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
LOSS_HOOK = "curvature_loss"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")


def _check_choices(name: str, values: str | Sequence[str], allowed: Sequence[str]) -> list[str]:
    """A non-empty list of allowed names (a single string is one name)."""
    values = [values] if isinstance(values, str) else list(values)
    if not values:
        raise ValueError(f"`{name}` must name at least one of {tuple(allowed)}, got an empty list.")
    for v in values:
        _check_choice(name, v, allowed)
    return values


class CurvatureMonitor(Callback):
    r"""Log Hessian curvature of the training loss every N optimizer steps, next to the loss.

    At each estimate the callback builds the Hessian operator ``H = ∇²_θ L(θ)`` of the training loss with respect to
    the module's trainable parameters (``requires_grad=True``), on the batch about to be trained on (or on fixed
    batches), at the current weights, and runs Hutchinson's trace estimator and power iteration on it. ``L`` is the
    loss exactly as ``training_step`` returns it (a mean loss gives a Hessian ``1/N`` of a summed one). The top
    eigenvalues come from Lanczos (largest algebraic, warm-started from the previous estimate's eigenvectors) and the
    trace from Hutchinson's estimator deflated by those eigenvectors (see ``trace_estimator``).

    **Which Hessian.** With ``mode="eval"`` (default) the network is evaluated in eval mode (BatchNorm uses running
    statistics, dropout is off). With ``mode="train"`` it runs in train mode, BatchNorm normalises with batch
    statistics without updating the running ones, and dropout masks are fixed for all products of one estimate.

    **Invisible to training.** Nothing is backpropagated into ``.grad``; parameters, buffers (BatchNorm running
    statistics), train/eval flags, optimizer state, torchmetrics states, and the torch/CUDA/NumPy/Python RNG streams
    are as before after each estimate, and ``self.log`` calls inside ``training_step`` are silenced while it is
    re-run. Probes come from the callback's own ``torch.Generator``. A run with the callback ends with the same
    weights, bit for bit, as one without.

    **When.** At the start of every training batch whose ``trainer.global_step`` (optimizer steps taken so far) is a
    multiple of ``every_n_train_steps``, once per optimizer step (gradient accumulation does not repeat it), never
    during sanity checking or validation. Step 0 (the initial weights) is measured. Values go to every attached
    logger at the step the loss of that batch is logged at, and into ``trainer.callback_metrics`` (so
    ``ModelCheckpoint``/``EarlyStopping`` can monitor them).

    **Logged keys** (with the default ``log_prefix="curvature/"``):

    - ``curvature/loss``: the loss at which the Hessian was measured (same batch, mode and weights).
    - ``curvature/trace``: estimate of ``tr(H)``; ``curvature/trace_stderr``: its standard error.
    - ``curvature/eig_1`` ... ``curvature/eig_k``: the ``top_k`` eigenvalues, sorted descending (algebraic). With
      ``eigen_solver="lanczos"`` (default) they are the largest algebraic eigenvalues; with ``"power"`` the largest
      *magnitudes*, so a large negative eigenvalue can appear among them.
    - ``curvature/lambda_max``: the largest eigenvalue (sharpness), ``= eig_1``; logged with ``"lanczos"`` only.
    - ``curvature/eig_converged``: 1 if every eigenpair met ``tol``, else 0.
    - ``curvature/lambda_min``: the smallest (most negative) eigenvalue, by Lanczos; with ``"lambda_min"`` in
      ``metrics``. ``curvature/lambda_min_ratio``: ``lambda_min / lambda_max`` when both are known.
    - ``curvature/density``: with ``"density"`` in ``metrics``, the stochastic Lanczos quadrature eigenvalue density
      as a TensorBoard histogram (TensorBoard loggers only); ``curvature/density_mean`` (``≈ tr(H)/P``) as a scalar.
    - ``curvature/num_hvps``: Hessian-vector products spent on this estimate.
    - ``curvature/seconds``: wall time of this estimate.

    **The loss.** By default the callback calls ``training_step(batch, batch_idx)`` and uses its return value (a
    tensor, or a dict with ``"loss"``). A module may instead define ``curvature_loss(self, batch) -> Tensor``; it is
    used when present (needed for manual optimisation, whose ``training_step`` steps optimizers).

    **Faults.** A non-finite loss or product skips that estimate with one warning; training continues and later
    estimates run. An op without second derivatives in both backends gives one warning and switches the callback
    off for the rest of the run.

    Args:
        every_n_train_steps: estimate every this many optimizer steps (>= 1).
        top_k: number of top eigenvalues (>= 1).
        num_probes: maximum Hutchinson probes per estimate (>= 2).
        trace_rtol: stop the trace estimate once ``stderr <= trace_rtol * |trace|`` (after 5 probes; default 5%);
            ``None`` always uses ``num_probes``.
        trace_estimator: ``"auto"`` (``"deflated"`` when eigenvalues are computed, else ``"hutchpp"``),
            ``"hutchinson"``, ``"hutchpp"`` (``num_probes`` is its product budget) or ``"deflated"`` (Hutchinson on
            the complement of the top-k eigenvectors, whose Ritz values give the rest of the trace exactly).
        eigen_solver: ``"lanczos"`` (largest algebraic eigenvalues) or ``"power"`` (power iteration, largest
            magnitudes).
        max_iter: maximum products: the Krylov dimension for Lanczos, per eigenpair for power iteration (>= 1).
        tol: relative residual tolerance of every eigenpair, ``‖Hv − λv‖ ≤ tol·|λ|`` (> 0).
        data: ``"current"`` (the batch about to be trained on) or ``"fixed"`` (``num_batches`` batches drawn once
            at fit start from the train dataloader and reused, so curves are comparable over time).
        num_batches: with ``data="fixed"``, how many batches; the Hessian is their batch-size weighted average.
        mode: ``"eval"`` or ``"train"`` (see above).
        backend: ``"auto"``, ``"double-backward"`` or ``"forward-over-reverse"``
            (see :class:`~lightning_curvature.HessianOperator`).
        dtype: ``"float32"`` or ``"float64"``, the dtype of the products (autocast is always off for them).
        distribution: Hutchinson probes, ``"rademacher"`` or ``"normal"``.
        warm_start: start the eigensolver from the previous estimate's eigenvectors (kept in checkpoints).
        density_probes: probes of the spectral density (with ``"density"`` in ``metrics``).
        density_steps: Lanczos steps per density probe.
        seed: seed of the callback's own generator.
        metrics: which to compute, any of ``("trace", "eigenvalues", "lambda_min", "density")``; default
            ``("trace", "eigenvalues")``.
        log_prefix: prefix of every logged key.
    """

    def __init__(
        self,
        every_n_train_steps: int = 100,
        top_k: int = 1,
        num_probes: int = 20,
        trace_rtol: float | None = 0.05,
        trace_estimator: str = "auto",
        eigen_solver: str = "lanczos",
        max_iter: int = 100,
        tol: float = 1e-3,
        data: str = "current",
        num_batches: int = 1,
        mode: str = "eval",
        backend: str = "auto",
        dtype: str = "float32",
        distribution: str = "rademacher",
        warm_start: bool = True,
        density_probes: int = 3,
        density_steps: int = 30,
        seed: int = 0,
        metrics: Sequence[str] = DEFAULT_METRICS,
        modules: Sequence[str] | None = None,
        module_depth: int | None = None,
        layer_metrics: Sequence[str] = ("trace",),
        curvature: str = "hessian",
        ggn_loss: str = "cross_entropy",
        log_prefix: str = "curvature/",
    ) -> None:
        _check_int("every_n_train_steps", every_n_train_steps, 1)
        _check_int("top_k", top_k, 1)
        _check_int("num_probes", num_probes, 2)
        _check_int("max_iter", max_iter, 1)
        _check_int("num_batches", num_batches, 1)
        _check_int("seed", seed, 0)
        _check_int("density_probes", density_probes, 1)
        _check_int("density_steps", density_steps, 2)
        _check_choice("trace_estimator", trace_estimator, TRACE_ESTIMATORS)
        _check_choice("eigen_solver", eigen_solver, EIGEN_SOLVERS)
        if trace_rtol is not None and (isinstance(trace_rtol, bool) or not isinstance(trace_rtol, (int, float))
                                       or not trace_rtol > 0):
            raise ValueError(f"`trace_rtol` must be a positive float or None, got {trace_rtol!r}.")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
            raise ValueError(f"`tol` must be a positive float, got {tol!r}.")
        _check_choice("data", data, DATA)
        _check_choice("mode", mode, MODES)
        _check_choice("backend", backend, BACKENDS)
        _check_choice("dtype", dtype, tuple(DTYPES))
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        metrics = _check_choices("metrics", metrics, METRICS)
        _check_choice("curvature", curvature, CURVATURES)
        _check_choice("ggn_loss", ggn_loss, GGN_LOSSES)
        if module_depth is not None:
            _check_int("module_depth", module_depth, 1)
        if isinstance(modules, str):
            modules = [modules]
        if modules is not None and (not list(modules) or not all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"`modules` must be a non-empty list of module names or globs, got {modules!r}.")
        layer_metrics = _check_choices("layer_metrics", layer_metrics, LAYER_METRICS)
        wants_layers = modules is not None or module_depth is not None
        if "layers" in metrics and not wants_layers:
            raise ValueError("`metrics` has 'layers' but neither `modules` nor `module_depth` says which modules.")
        if wants_layers and "layers" not in metrics:
            metrics = [*metrics, "layers"]
        if data == "current" and num_batches != 1:
            raise ValueError(
                f"`num_batches={num_batches}` needs `data='fixed'`; with data='current' the estimate uses the one "
                "batch being trained on."
            )
        if not isinstance(log_prefix, str):
            raise ValueError(f"`log_prefix` must be a string, got {log_prefix!r}.")
        if not isinstance(warm_start, bool):
            raise ValueError(f"`warm_start` must be True or False, got {warm_start!r}.")
        self.every_n_train_steps = every_n_train_steps
        self.top_k = top_k
        self.num_probes = num_probes
        self.trace_rtol = trace_rtol
        self.trace_estimator = trace_estimator
        self.eigen_solver = eigen_solver
        self.max_iter = max_iter
        self.tol = float(tol)
        self.data = data
        self.num_batches = num_batches
        self.mode = mode
        self.backend = backend
        self.dtype = dtype
        self.distribution = distribution
        self.warm_start = warm_start
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.seed = seed
        self.metrics = tuple(dict.fromkeys(metrics))
        self.modules = None if modules is None else list(modules)
        self.module_depth = module_depth
        self.layer_metrics = tuple(dict.fromkeys(layer_metrics))
        self.curvature = curvature
        self.ggn_loss = ggn_loss
        self.log_prefix = log_prefix
        self._blocks: dict[str, list[str]] = {}
        self._update_snapshot: tuple[int, Tensor] | None = None

        self._generator = torch.Generator().manual_seed(seed)
        self._last_step = -1
        self._num_estimates = 0
        self._eigenvectors: Tensor | None = None
        self._min_eigenvectors: Tensor | None = None
        self._precond_vectors: Tensor | None = None
        self.last_density: SpectralDensity | None = None
        self._fixed_batches: list[Any] | None = None
        self._disabled = False
        self._warned: set[str] = set()
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def state_key(self) -> str:
        # Lightning asks for it several times per batch; the arguments it depends on are fixed at construction
        if getattr(self, "_state_key", None) is None:
            self._state_key = self._generate_state_key(
                every_n_train_steps=self.every_n_train_steps, top_k=self.top_k, log_prefix=self.log_prefix
            )
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "num_estimates": self._num_estimates,
            "generator_state": self._generator.get_state(),
            "eigenvectors": None if self._eigenvectors is None else self._eigenvectors.detach().cpu(),
            "min_eigenvectors": None if self._min_eigenvectors is None else self._min_eigenvectors.detach().cpu(),
            "precond_vectors": None if self._precond_vectors is None else self._precond_vectors.detach().cpu(),
            # the weights one step before the next estimate, when a checkpoint falls between the two
            "update_snapshot_step": -1 if self._update_snapshot is None else self._update_snapshot[0],
            "update_snapshot": None if self._update_snapshot is None else self._update_snapshot[1].cpu(),
            "disabled": self._disabled,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._num_estimates = int(state_dict["num_estimates"])
        self._generator.set_state(state_dict["generator_state"])
        self._eigenvectors = state_dict.get("eigenvectors")
        self._min_eigenvectors = state_dict.get("min_eigenvectors")
        self._precond_vectors = state_dict.get("precond_vectors")
        snapshot = state_dict.get("update_snapshot")
        self._update_snapshot = None if snapshot is None else (int(state_dict["update_snapshot_step"]), snapshot)
        self._disabled = bool(state_dict.get("disabled", False))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(p.requires_grad for p in pl_module.parameters()):
            raise ValueError(
                f"CurvatureMonitor: {type(pl_module).__name__} has no trainable parameters (none with "
                "requires_grad=True), so there is no Hessian to measure."
            )
        if not pl_module.automatic_optimization and not callable(getattr(pl_module, LOSS_HOOK, None)):
            raise ValueError(
                f"CurvatureMonitor: {type(pl_module).__name__} uses manual optimisation, whose training_step steps the "
                f"optimizers and cannot be re-run. Define `{LOSS_HOOK}(self, batch) -> Tensor` returning the loss."
            )
        check_strategy(trainer.strategy)
        if self.curvature == "ggn" and not callable(getattr(pl_module, OUTPUTS_HOOK, None)):
            raise ValueError(
                f"CurvatureMonitor(curvature='ggn') needs the network output and the targets separately: define "
                f"`{OUTPUTS_HOOK}(self, batch) -> (outputs, targets)` on {type(pl_module).__name__}; the loss applied "
                f"to them is `ggn_loss` ({self.ggn_loss!r}, mean over the batch)."
            )
        if "layers" in self.metrics:
            self._blocks = select_blocks(pl_module, self.modules, self.module_depth)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "preconditioned" in self.metrics:
            opt = trainer.optimizers[0] if trainer.optimizers else None
            if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                name = type(opt).__name__ if opt is not None else "none"
                raise ValueError(
                    "CurvatureMonitor: metric 'preconditioned' (Adam's preconditioned sharpness) needs an Adam or "
                    f"AdamW optimizer; this run has {name}. Available for it: 'eos' (sharpness against the "
                    "optimizer's own threshold)."
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "fixed" and self._fixed_batches is None:
            self._fixed_batches = self._draw_fixed_batches(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._disabled or trainer.sanity_checking:
            return
        step = trainer.global_step
        if "grad_curvature" in self.metrics and (step + 1) % self.every_n_train_steps == 0:
            if self._update_snapshot is None or self._update_snapshot[0] != step:
                self._update_snapshot = (step, _flat_params(pl_module))
        if step % self.every_n_train_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        batches = self._fixed_batches if self.data == "fixed" else [(batch, batch_idx)]
        assert batches is not None
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        previous = None
        if self._update_snapshot is not None and self._update_snapshot[0] == step - 1:
            previous = self._update_snapshot[1]
        self._update_snapshot = None
        values = self.estimate(pl_module, batches, optimizer=optimizer, previous_params=previous)
        if values:
            self._log(trainer, values)

    # ------------------------------------------------------------------ the estimate
    def estimate(
        self,
        pl_module: pl.LightningModule,
        batches: list[tuple[Any, int]],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        previous_params: Tensor | None = None,
    ) -> dict[str, float]:
        """Measure the curvature of ``pl_module``'s training loss on ``batches`` (``(batch, batch_idx)`` pairs).

        Args:
            pl_module: the module (left exactly as it was).
            batches: ``(batch, batch_idx)`` pairs; several are averaged weighted by batch size.
            optimizer: for the ``"eos"``/``"preconditioned"`` metrics.
            previous_params: flat trainable parameters one optimizer step earlier, for ``update_curvature``.

        Returns:
            The metrics (keys without prefix), or ``{}`` when the estimate was skipped.
        """
        start = time.perf_counter()
        dtype = DTYPES[self.dtype]
        out: dict[str, float] = {}
        with training_state_guard(pl_module):
            params = {k: p for k, p in pl_module.named_parameters() if p.requires_grad}
            op: Any = self._operator(pl_module, batches, params, dtype)
            if _world_size() > 1:
                op = DistributedOperator(op)
            try:
                out = self._run_estimators(op, params, optimizer, previous_params)
            except HVPUnsupportedError as err:
                self._disabled = True
                self._warn_once("unsupported", f"CurvatureMonitor switched off: {err}")
                return {}
            except _SkipEstimate as skip:
                self._warn_once(skip.key, str(skip))
                return {}
            finally:
                op.release()
        self._num_estimates += 1
        out["num_hvps"] = float(op.num_matvecs)
        out["seconds"] = time.perf_counter() - start
        self.last_metrics = out
        return out

    def _operator(
        self, pl_module: pl.LightningModule, batches: list[tuple[Any, int]], params: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> HessianOperator:
        """This process's operator; under DDP it is wrapped in a :class:`DistributedOperator` by the caller."""
        seed = self._num_estimates
        if self.curvature == "hessian":
            closure = self._loss_closure(pl_module, batches, dtype)
            loss_fn, theta = module_loss_fn(pl_module, closure, params=params, dtype=dtype, mode=self.mode, seed=seed)
            return HessianOperator(loss_fn, theta, backend=self.backend, dtype=dtype)  # type: ignore[arg-type]
        # GGN: outputs of all batches concatenated; the loss is their batch-size weighted mean
        hook = getattr(pl_module, OUTPUTS_HOOK)
        with torch.no_grad():
            targets = [_cast(hook(_cast(b, dtype))[1], dtype) for b, _ in batches]
        sizes, weights = _batch_weights(batches)

        def outputs(module: pl.LightningModule) -> Tensor:
            return torch.cat([hook(_cast(b, dtype))[0].reshape(n, -1) for (b, _), n in zip(batches, sizes)])

        output_fn, theta = module_loss_fn(pl_module, outputs, params=params, dtype=dtype, mode=self.mode, seed=seed)
        criterion = torch.nn.functional.cross_entropy if self.ggn_loss == "cross_entropy" else _mse

        def loss_of_output(f: Tensor) -> Tensor:
            parts = torch.split(f, sizes)
            return sum(w * criterion(p.reshape(t.shape) if self.ggn_loss == "mse" else p, t)
                       for w, p, t in zip(weights, parts, targets))  # type: ignore[return-value]

        return GGNOperator(output_fn, loss_of_output, theta, dtype=dtype)

    def _run_estimators(
        self, op: HessianOperator, params: dict[str, Tensor], optimizer: torch.optim.Optimizer | None,
        previous_params: Tensor | None,
    ) -> dict[str, float]:
        loss = op.loss
        if not math.isfinite(loss):
            raise _SkipEstimate(
                "nonfinite",
                f"CurvatureMonitor skipped an estimate: the loss is {loss}. Estimates resume once it is finite.",
            )
        out: dict[str, float] = {"loss": loss}
        top = None
        if "eigenvalues" in self.metrics:
            init = self._warm(self._eigenvectors, op)
            if self.eigen_solver == "lanczos":
                top = lanczos(op, self.top_k, which="LA", max_iter=self.max_iter, tol=self.tol, init=init,
                              generator=self._generator)
            else:
                top = power_iteration(op, self.top_k, max_iter=self.max_iter, tol=self.tol, init=init,
                                      generator=self._generator)
            self._check_finite(top.eigenvalues)
            self._eigenvectors = top.eigenvectors.detach()
            values = torch.sort(top.eigenvalues, descending=True).values.tolist()
            for i, value in enumerate(values, start=1):
                out[f"eig_{i}"] = value
            if self.eigen_solver == "lanczos":
                out["lambda_max"] = values[0]
            out["eig_converged"] = float(bool(top.converged.all()))
        if "lambda_min" in self.metrics:
            bottom = lanczos(op, 1, which="SA", max_iter=self.max_iter, tol=self.tol,
                             init=self._warm(self._min_eigenvectors, op), generator=self._generator)
            self._check_finite(bottom.eigenvalues)
            self._min_eigenvectors = bottom.eigenvectors.detach()
            out["lambda_min"] = float(bottom.eigenvalues[0])
            if "lambda_max" in out and out["lambda_max"] != 0:
                out["lambda_min_ratio"] = out["lambda_min"] / out["lambda_max"]
        if "trace" in self.metrics:
            tr = self._trace(op, top)
            self._check_finite(torch.tensor([tr.value]))
            out["trace"] = tr.value
            out["trace_stderr"] = tr.stderr
        if "density" in self.metrics:
            dens = spectral_density(op, num_probes=self.density_probes, num_steps=self.density_steps,
                                    generator=self._generator)
            self._check_finite(dens.nodes)
            self.last_density = dens
            out["density_mean"] = dens.moments(1)
        if "grad_curvature" in self.metrics:
            out.update(self._directional(op, previous_params))
        if "eos" in self.metrics or "preconditioned" in self.metrics:
            out.update(self._stability(op, params, optimizer, out.get("lambda_max")))
        if "layers" in self.metrics:
            out.update(self._layers(op, top))
        return out

    def _directional(self, op: HessianOperator, previous_params: Tensor | None) -> dict[str, float]:
        """Curvature along the gradient, ``gᵀHg/‖g‖²``, and along the last update, ``uᵀHu/‖u‖²``."""
        out: dict[str, float] = {}
        for key, direction in (("grad_curvature", op.gradient()),
                               ("update_curvature", None if previous_params is None else
                                op.flatten(list(op.params.values())) - previous_params.to(op.device, op.dtype))):
            if direction is None:
                continue
            norm2 = float(direction.to(torch.float64).pow(2).sum())
            if norm2 == 0.0:
                continue
            value = float(torch.dot(direction, op.matvec(direction)).to(torch.float64)) / norm2
            self._check_finite(torch.tensor([value]))
            out[key] = value
        return out

    def _stability(
        self, op: HessianOperator, params: dict[str, Tensor], optimizer: torch.optim.Optimizer | None,
        lambda_max: float | None,
    ) -> dict[str, float]:
        """``eos_ratio`` = sharpness / the optimizer's stability threshold (Cohen et al. 2021, 2022)."""
        if optimizer is None:
            return {}
        try:
            info = stability_info(optimizer)
        except UnsupportedOptimizer as err:
            self._warn_once("optimizer", f"CurvatureMonitor: eos_ratio is skipped: {err}.")
            return {}
        out = {"stability_threshold": info.threshold}
        if info.kind == "sgd":
            if lambda_max is None:
                top = lanczos(op, 1, max_iter=self.max_iter, tol=self.tol, init=self._warm(self._eigenvectors, op),
                              generator=self._generator)
                lambda_max = float(top.eigenvalues[0])
            out["eos_ratio"] = (lambda_max + info.weight_decay) / info.threshold
            return out
        d = adam_preconditioner(optimizer, list(params.values()))
        if d is None:  # before Adam's first step there is no preconditioner yet
            return {}
        # coupled weight decay (Adam, not AdamW) adds wd·I to H, i.e. wd·P^{-1} to the preconditioned curvature
        shift = info.weight_decay * d**2 if info.weight_decay else None
        pop = ScaledOperator(op, d, add_diagonal=shift)
        top = lanczos(pop, 1, max_iter=self.max_iter, tol=self.tol, init=self._warm(self._precond_vectors, op),
                      generator=self._generator)
        self._check_finite(top.eigenvalues)
        self._precond_vectors = top.eigenvectors.detach()
        value = float(top.eigenvalues[0])
        out["preconditioned_lambda_max"] = value
        out["eos_ratio"] = value / info.threshold
        return out

    def _layers(self, op: HessianOperator, top: Any) -> dict[str, float]:
        """Per-module diagonal blocks: trace, top eigenvalue, and the top eigenvector's mass in each block."""
        out: dict[str, float] = {}
        offsets, start = {}, 0
        for name, n in zip(op.names, op.numels):
            offsets[name] = (start, start + n)
            start += n
        index = {
            module: torch.cat([torch.arange(*offsets[p]) for p in names if p in offsets])
            for module, names in self._blocks.items()
        }
        if "trace" in self.layer_metrics:
            traces = block_hutchinson_traces(op, list(index.values()), self.num_probes,
                                             distribution=self.distribution,  # type: ignore[arg-type]
                                             generator=self._generator)
            for module, tr in zip(index, traces):
                out[f"trace/{module}"] = tr.value
        if "lambda_max" in self.layer_metrics:
            for module, idx in index.items():
                block = lanczos(BlockOperator(op, idx), 1, max_iter=self.max_iter, tol=self.tol,
                                generator=self._generator)
                out[f"lambda_max/{module}"] = float(block.eigenvalues[0])
        if "eig_mass" in self.layer_metrics and top is not None:
            v = top.eigenvectors[:, 0].to(torch.float64)
            for module, idx in index.items():
                out[f"eig_mass/{module}"] = float(v[idx.to(v.device)].pow(2).sum() / v.pow(2).sum())
        return out

    def _trace(self, op: HessianOperator, top: Any) -> TraceResult:
        method = self.trace_estimator
        if method == "auto":
            method = "deflated" if top is not None else "hutchpp"
        kwargs: dict[str, Any] = {"rtol": self.trace_rtol, "distribution": self.distribution,
                                  "generator": self._generator}
        if method == "deflated":
            if top is None:
                return deflated_hutchinson_trace(op, self._require_vectors(op), self.num_probes, **kwargs)
            return deflated_hutchinson_trace(op, top.eigenvectors, self.num_probes, eigenvalues=top.eigenvalues,
                                             **kwargs)
        if method == "hutchpp" and self.num_probes >= 6:  # below that the sketch leaves too few probes
            return hutchpp_trace(op, self.num_probes, **kwargs)
        return hutchinson_trace(op, self.num_probes, **kwargs)

    def _require_vectors(self, op: HessianOperator) -> Tensor:
        init = self._warm(self._eigenvectors, op)
        if init is None:
            init = lanczos(op, self.top_k, max_iter=self.max_iter, tol=self.tol, generator=self._generator).eigenvectors
        return init

    def _warm(self, vectors: Tensor | None, op: HessianOperator) -> Tensor | None:
        if not self.warm_start or vectors is None or vectors.shape[0] != op.shape[0]:
            return None
        return vectors.to(device=op.device, dtype=op.dtype)

    def _check_finite(self, values: Tensor) -> None:
        if not bool(torch.isfinite(values).all()):
            raise _SkipEstimate(
                "nonfinite", "CurvatureMonitor skipped an estimate: a Hessian-vector product is not finite."
            )

    def _loss_closure(self, pl_module: pl.LightningModule, batches: list[tuple[Any, int]], dtype: torch.dtype) -> Any:
        hook = getattr(pl_module, LOSS_HOOK, None)
        _, weights = _batch_weights(batches)
        takes_idx = "batch_idx" in inspect.signature(pl_module.training_step).parameters

        def closure(module: pl.LightningModule) -> Tensor:
            loss: Tensor | None = None
            for (batch, idx), w in zip(batches, weights):
                batch = _cast(batch, dtype)
                if callable(hook):
                    value = module.curvature_loss(batch)  # type: ignore[operator]
                else:
                    value = module.training_step(batch, idx) if takes_idx else module.training_step(batch)
                value = _extract_loss(value)
                term = value if len(batches) == 1 else w * value
                loss = term if loss is None else loss + term
            assert loss is not None
            return loss

        return closure

    # ------------------------------------------------------------------ data
    def _draw_fixed_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[tuple[Any, int]]:
        """Draw ``num_batches`` batches once, with a generator of their own (so a resumed run draws the same)."""
        loader: Any = trainer.train_dataloader
        if isinstance(loader, CombinedLoader):
            loader = loader.flattened[0]
        generator = torch.Generator().manual_seed(self.seed)
        raw: list[Any] = []
        with rng_guard([pl_module.device]):
            torch.manual_seed(self.seed)
            if (
                isinstance(loader, DataLoader)
                and not isinstance(loader.dataset, IterableDataset)
                and loader.batch_size is not None
                and hasattr(loader.dataset, "__len__")
            ):
                n = len(loader.dataset)  # type: ignore[arg-type]
                world, rank = _world_size(), _rank()
                # every process draws the same permutation and takes its own shard, as a DistributedSampler would
                order = torch.randperm(n, generator=generator)[: loader.batch_size * self.num_batches * world]
                order = order[rank::world]
                for chunk in order.split(loader.batch_size):
                    raw.append(loader.collate_fn([loader.dataset[int(i)] for i in chunk]))
            else:
                if isinstance(loader, DataLoader):
                    loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
                for batch in loader:
                    raw.append(batch)
                    if len(raw) == self.num_batches:
                        break
        if not raw:
            raise ValueError("CurvatureMonitor(data='fixed'): the train dataloader yielded no batch.")
        out = []
        for i, batch in enumerate(raw):
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
            out.append((batch, i))
        return out

    # ------------------------------------------------------------------ output
    def _log(self, trainer: pl.Trainer, values: dict[str, float]) -> None:
        metrics = {self.log_prefix + k: v for k, v in values.items()}
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)
        self._log_tensorboard(trainer, values, step)

    def _log_tensorboard(self, trainer: pl.Trainer, values: dict[str, float], step: int) -> None:
        """TensorBoard extras: the custom-scalars layout (once), eigenvalue and density histograms."""
        from .tensorboard import custom_scalars_layout, log_density, log_histogram, write_layout

        eigs = [values[k] for k in sorted((k for k in values if k.startswith("eig_") and k[4:].isdigit()),
                                          key=lambda k: int(k[4:]))]
        loss_tags = sorted({k for k in trainer.callback_metrics if "loss" in k and not k.startswith(self.log_prefix)})
        layout = custom_scalars_layout(self.log_prefix, self.top_k, loss_tags or ["train/loss", "train_loss", "loss"])
        for logger in trainer.loggers:
            write_layout(logger, layout)
            if eigs:
                log_histogram(logger, self.log_prefix + "eigenvalues", torch.tensor(eigs), step)
            if "density_mean" in values and self.last_density is not None:
                d = self.last_density
                log_density(logger, self.log_prefix + "density", d.grid, d.density, step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)


class _SkipEstimate(Exception):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _extract_loss(value: Any) -> Tensor:
    if isinstance(value, Mapping):
        if "loss" not in value:
            raise ValueError(f"training_step returned a dict without 'loss' (keys: {sorted(value)}).")
        value = value["loss"]
    if value is None:
        raise _SkipEstimate("none", "CurvatureMonitor skipped an estimate: training_step returned None.")
    if not isinstance(value, Tensor):
        raise TypeError(f"The training loss must be a tensor, got {type(value).__name__}.")
    return value


SUPPORTED_STRATEGIES = "single device (CPU or one GPU), DDP (strategy='ddp', 'ddp_spawn', 'ddp_notebook')"


def check_strategy(strategy: Any) -> None:
    """Refuse strategies whose parameters are sharded (the operator needs each process to hold every parameter)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    sharded = any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__)  # a DDPStrategy subclass
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not sharded:
        return
    raise ValueError(
        f"CurvatureMonitor does not support {type(strategy).__name__}: it shards the parameters across processes, "
        f"and the Hessian-vector products need every process to hold all of them. Supported: {SUPPORTED_STRATEGIES}."
    )


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1


def _rank() -> int:
    return torch.distributed.get_rank() if _world_size() > 1 else 0


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).mean()


def _flat_params(module: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]).clone()


def select_blocks(
    module: torch.nn.Module, patterns: Sequence[str] | None, depth: int | None
) -> dict[str, list[str]]:
    """Map each selected submodule to the names of its trainable parameters (as in ``named_parameters``).

    Args:
        module: the root module.
        patterns: module names or ``fnmatch`` globs (``"net.*"``), matched against ``named_modules()``.
        depth: select the modules ``depth`` levels below the root (``1``: direct children).

    Raises:
        ValueError: a pattern matches no module with trainable parameters; the message lists those available.
    """
    import fnmatch

    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    candidates = {}
    for name, _ in module.named_modules():
        if not name:
            continue
        owned = [p for p in trainable if p.startswith(name + ".")]
        if owned:
            candidates[name] = owned
    selected: dict[str, list[str]] = {}
    for pattern in patterns or []:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"CurvatureMonitor: no module with trainable parameters matches {pattern!r}. Available: "
                f"{sorted(candidates)}."
            )
        for n in hits:
            selected[n] = candidates[n]
    if depth is not None:
        hits = [n for n in candidates if n.count(".") == depth - 1]
        if not hits:
            raise ValueError(f"CurvatureMonitor: no module with trainable parameters at depth {depth}. Available: "
                             f"{sorted(candidates)}.")
        for n in hits:
            selected[n] = candidates[n]
    return selected


def _batch_weights(batches: list[tuple[Any, int]]) -> tuple[list[int], list[float]]:
    """Batch sizes and their shares of the total: several batches are averaged weighted by batch size."""
    sizes = [_batch_size(b) for b, _ in batches]
    total = float(sum(sizes))
    return sizes, [n / total for n in sizes]


def _batch_size(batch: Any) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return int(extract_batch_size(batch))
        except Exception:
            return 1
