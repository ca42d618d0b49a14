"""The one source of truth for :class:`~lightning_curvature.CurvatureMonitor`'s options.

:class:`MonitorOptions` is a validated dataclass: one field per argument of the callback, with its default, its type,
the check it must pass and its documentation. Everything else is derived from it or pinned to it by a test: the
callback's signature and the ``Args:`` section of its docstring (:func:`args_doc`), the Hydra schema
(:mod:`lightning_curvature.config`), ``configs/callbacks/curvature.yaml`` and the README's option table.

Plain Python and torch (no Lightning, no Hydra): the measurement plan, usable from a plain PyTorch loop, takes the same
object.
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .estimators import DISTRIBUTIONS
from .operators import BACKENDS

__all__ = [
    "CURVATURES",
    "DATA",
    "DEFAULT_METRICS",
    "DTYPES",
    "EIGEN_SOLVERS",
    "GGN_LOSSES",
    "LAYER_METRICS",
    "METRICS",
    "MONITOR_BACKENDS",
    "ACCUMULATION",
    "MODES",
    "PARAMETERS",
    "TRACE_ESTIMATORS",
    "MonitorOptions",
    "args_doc",
]

METRICS: tuple[str, ...] = (
    "trace", "eigenvalues", "lambda_min", "density", "eos", "preconditioned", "grad_curvature", "layers",
    "landscape", "landscape_2d",
)
DEFAULT_METRICS: tuple[str, ...] = ("trace", "eigenvalues", "eos", "grad_curvature")
LAYER_METRICS: tuple[str, ...] = ("trace", "lambda_max", "eig_mass")
CURVATURES: tuple[str, ...] = ("hessian", "ggn")
GGN_LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
EIGEN_SOLVERS: tuple[str, ...] = ("lanczos", "power")
TRACE_ESTIMATORS: tuple[str, ...] = ("auto", "hutchinson", "hutchpp", "deflated")
DATA: tuple[str, ...] = ("current", "fixed")
MODES: tuple[str, ...] = ("eval", "train")
ACCUMULATION: tuple[str, ...] = ("step", "first")
PARAMETERS: tuple[str, ...] = ("optimizer", "trainable")
MONITOR_BACKENDS: tuple[str, ...] = (*BACKENDS, "finite-difference")
DEFAULT_MAX_OVERHEAD = 0.05  # the budget when neither `every_n_train_steps` nor `max_overhead` is given
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------------- checks
def _int(minimum: int) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        return value

    check.__doc__ = f"an integer >= {minimum}"
    return check


def _optional(inner: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        return None if value is None else inner(name, value)

    return check


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite positive number, got {value!r}.")
    return float(value)


def _choice(allowed: Sequence[str]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")
        return value

    return check


def _choices(allowed: Sequence[str]) -> Callable[[str, Any], Any]:
    """A non-empty list of allowed names (a single string is one name); duplicates are dropped, order kept."""

    def check(name: str, value: Any) -> Any:
        values = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else None
        if values is None:
            raise ValueError(f"`{name}` must be a list of names from {tuple(allowed)}, got {value!r}.")
        if not values:
            raise ValueError(f"`{name}` must name at least one of {tuple(allowed)}, got an empty list.")
        for v in values:
            _choice(allowed)(name, v)
        return tuple(dict.fromkeys(values))

    return check


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def _module_names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value) if isinstance(value, Sequence) else []
    if not values or not all(isinstance(m, str) and m for m in values):
        raise ValueError(f"`{name}` must be a non-empty list of module names or globs, got {value!r}.")
    return tuple(values)


def _prefix(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"`{name}` must be a non-empty string such as 'curvature/' (an empty prefix would log `loss` and `trace` "
            f"over the module's own keys), got {value!r}."
        )
    return value


def _opt(default: Any, doc: str, check: Callable[[str, Any], Any], price: str = "") -> Any:
    """A dataclass field carrying its documentation, its check and (for options that trade cost) its price."""
    metadata = {"doc": doc, "check": check, "price": price}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# ---------------------------------------------------------------------------------------------------- the options
@dataclass(frozen=True)
class MonitorOptions:
    """Every option of :class:`~lightning_curvature.CurvatureMonitor`, validated at construction.

    Raises:
        ValueError: naming the option and the allowed values, for any invalid value or combination.
    """

    every_n_train_steps: int | None = _opt(
        None, "``None``: the cadence follows the ``max_overhead`` budget (an estimate at step 0, then as often as the "
        "budget allows; the realised gap is logged as ``every_n_steps``). An integer ``n``: estimate when "
        "``global_step % n == 0``, once per optimizer step (gradient accumulation does not repeat it), step 0 "
        "included: exactly that cadence, unless ``max_overhead`` is also set.", _optional(_int(1)),
        price="a warm estimate at the defaults measured 40 to 190 gradients (21 to 42 products) on models of 1e5 "
        "to 1e7 parameters (the README's overhead table).")
    max_overhead: float | None = _opt(
        None, "the largest share of training wall time the estimates may take (``0.05``: 5%): the callback times "
        "its estimates and the training between them (validation excluded) and stretches the cadence to stay within "
        "it, the first (step 0, cold) estimate included: the second waits until training has paid for both. "
        "``None``: ``0.05`` when ``every_n_train_steps`` is ``None``, otherwise no budget (an explicit cadence is "
        "kept exactly). With both set: estimates only at multiples of ``every_n_train_steps``, as far apart as the "
        "budget needs.",
        _optional(_positive_float),
        price="sets the cost directly: estimates take at most this share of training time, counted over the run.")
    top_k: int = _opt(
        1, "number of top eigenvalues (``eig_1`` ... ``eig_k``).", _int(1),
        price="on the benchmark MLP and CNN, top-1 took 8 to 9 products cold and 5 to 7 warm-started; top-5 25 to 33 "
        "cold, 22 to 30 warm (the deflated check behind ``eig_converged`` included).")
    num_probes: int = _opt(
        20, "trace estimator budget: maximum Hutchinson probes (Hutch++: products), >= 2.", _int(2),
        price="one product per probe; the trace stops earlier on ``trace_rtol``.")
    trace_rtol: float | None = _opt(
        0.05, "stop the trace estimate once ``stderr <= trace_rtol * |trace|`` (after 5 probes); ``None``: always "
        "``num_probes``.", _optional(_positive_float),
        price="one product per probe; at 0.05 the deflated trace stopped after 5 to 20 probes in the overhead "
        "benchmark.")
    trace_estimator: str = _opt(
        "auto", "``\"auto\"`` (``\"deflated\"`` when eigenvalues are computed, else ``\"hutchpp\"``), "
        "``\"hutchinson\"``, ``\"hutchpp\"`` or ``\"deflated\"`` (Hutchinson on the complement of the top-k "
        "eigenvectors, whose Ritz values give the rest of the trace exactly).", _choice(TRACE_ESTIMATORS))
    eigen_solver: str = _opt(
        "lanczos", "``\"lanczos\"`` (largest algebraic eigenvalues) or ``\"power\"`` (power iteration, largest "
        "magnitudes).", _choice(EIGEN_SOLVERS),
        price="power iteration took 31 products for the MLP's top-1 (Lanczos 9) and 150 for its top-5 (Lanczos 25).")
    max_iter: int = _opt(
        100, "maximum products of one eigen-solve: Krylov dimension for Lanczos, per eigenpair for power "
        "iteration; >= ``top_k``.", _int(1), price="an upper bound; solves stop on ``tol`` first.")
    tol: float = _opt(
        1e-3, "every eigenpair is converged when ``‖Hv − λv‖ <= tol·|λ|`` (a finite positive number).",
        _positive_float, price="about one more product per halving of ``tol`` near convergence.")
    data: str = _opt(
        "current", "``\"current\"`` (the batch about to be trained on) or ``\"fixed\"`` (``num_batches`` batches "
        "drawn once at fit start and reused, so curves are comparable over time).", _choice(DATA))
    num_batches: int = _opt(
        1, "with ``data=\"fixed\"``: how many batches; the Hessian is their batch-size weighted average.", _int(1),
        price="every product runs over all of them.")
    accumulation: str = _opt(
        "step", "with gradient accumulation and ``data=\"current\"``: ``\"step\"`` measures the Hessian of the "
        "whole optimizer step's objective, all its micro-batches weighted as Lightning weights their losses "
        "(each ``1/accumulate_grad_batches``), estimated at the step's last micro-batch (the weights have not moved "
        "yet); ``\"first\"``: the step's first micro-batch only.", _choice(ACCUMULATION),
        price="``\"step\"``: every product runs over all ``accumulate_grad_batches`` micro-batches.")
    mode: str = _opt(
        "eval", "``\"eval\"`` (dropout off, BatchNorm running statistics) or ``\"train\"`` (batch statistics, not "
        "updated; dropout masks fixed within an estimate).", _choice(MODES))
    backend: str = _opt(
        "auto", f"Hessian-vector products: one of {MONITOR_BACKENDS}. ``\"auto\"``: exact products (double "
        "backward, else forward-over-reverse), and central differences of ordinary gradients "
        "(``\"finite-difference\"``) where no exact backend works (reentrant checkpointing, ops without "
        "second derivatives, an exact product out of memory in a one-process run), or, on a ``torch.compile``d "
        "module with ``mode=\"train\"``, where one timed product of each shows them faster and within 1e-3 of the "
        "exact one; said once in a log line. See Backends in the README.", _choice(MONITOR_BACKENDS),
        price="double backward: about 1.7 gradients a product; forward-over-reverse about 4.6; finite "
        "differences 2 (one more per estimate).")
    dtype: str = _opt(
        "float32", "``\"float32\"`` or ``\"float64\"``: the dtype of the products (autocast is always off for "
        "them).", _choice(tuple(DTYPES)), price="float64 products cost about 2x on CPU, far more on most GPUs.")
    distribution: str = _opt(
        "rademacher", f"trace probes: one of {DISTRIBUTIONS}.", _choice(DISTRIBUTIONS))
    warm_start: bool = _opt(
        True, "start each eigen-solve from the previous estimate's eigenvectors (kept in checkpoints).", _bool,
        price="saves about a third of the eigen-solve's products.")
    density_probes: int = _opt(
        3, "probes of the spectral density (with ``\"density\"`` in ``metrics``).", _int(1),
        price="``density_steps`` products each.")
    density_steps: int = _opt(30, "Lanczos steps per density probe.", _int(2),
                              price="one product per step and probe.")
    landscape_radius: float | None = _opt(
        None, "with ``\"landscape\"``/``\"landscape_2d\"`` in ``metrics``: the loss is evaluated at ``θ + α v₁`` "
        "(and ``+ β v₂``) for ``α, β`` in ``[-r, r]``, ``v`` the unit top eigenvectors. ``None``: "
        "``r = √(2 L / λ₁)``, where the quadratic model has doubled the loss.", _optional(_positive_float))
    landscape_points: int = _opt(
        21, "grid points per direction of the landscape (odd numbers include ``α = 0``).", _int(3),
        price="forward passes only: ``landscape_points`` for the cut, its square for the surface.")
    seed: int = _opt(0, "seed of the callback's own ``torch.Generator`` (probes, start vectors, fixed batches).",
                     _int(0))
    metrics: tuple[str, ...] = _opt(
        DEFAULT_METRICS, f"what to measure, any of {METRICS}.", _choices(METRICS),
        price="``eigenvalues`` and ``trace`` make most of the products (see ``top_k``, ``trace_rtol``); "
        "``grad_curvature`` 2; ``eos`` none with ``eigenvalues`` (it reuses ``lambda_max``), else one warm-started "
        "eigen-solve; ``lambda_min`` one more eigen-solve; "
        "``density`` ``density_probes × density_steps``; landscapes forward passes only.")
    modules: tuple[str, ...] | None = _opt(
        None, "per-module metrics for these module names or ``fnmatch`` globs (``[\"net.0\", \"encoder.*\"]``).",
        _module_names)
    module_depth: int | None = _opt(
        None, "or per-module metrics for every module this many levels below the root (1: direct children).",
        _optional(_int(1)))
    layer_metrics: tuple[str, ...] = _opt(
        ("trace",), f"per-module metrics, any of {LAYER_METRICS}.", _choices(LAYER_METRICS),
        price="``lambda_max`` runs one eigen-solve per module.")
    curvature: str = _opt(
        "hessian", "``\"hessian\"``, or ``\"ggn\"`` (generalised Gauss-Newton ``Jᵀ H_out J``; the module defines "
        "``curvature_outputs(self, batch) -> (outputs, targets)``).", _choice(CURVATURES))
    ggn_loss: str = _opt(
        "cross_entropy", "with ``curvature=\"ggn\"``: the loss on the outputs, ``\"cross_entropy\"`` or "
        "``\"mse\"`` (mean over the batch).", _choice(GGN_LOSSES))
    parameters: str = _opt(
        "optimizer", "which parameters the Hessian is taken over: ``\"optimizer\"`` (those with "
        "``requires_grad=True`` that are in an optimizer's parameter groups: what training moves) or "
        "``\"trainable\"`` (every parameter with ``requires_grad=True``).", _choice(PARAMETERS))
    log_prefix: str = _opt("curvature/", "prefix of every logged key (non-empty).", _prefix)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
        if self.max_iter < self.top_k:
            raise ValueError(
                f"`max_iter` ({self.max_iter}) must be >= `top_k` ({self.top_k}): an eigen-solve needs at least one "
                "product per eigenvalue."
            )
        wants_layers = self.modules is not None or self.module_depth is not None
        metrics = self.metrics
        if "layers" in metrics and not wants_layers:
            raise ValueError("`metrics` has 'layers' but neither `modules` nor `module_depth` says which modules.")
        if wants_layers and "layers" not in metrics:
            object.__setattr__(self, "metrics", (*metrics, "layers"))
        if wants_layers and "eig_mass" in self.layer_metrics and "eigenvalues" not in metrics:
            raise ValueError(
                "`layer_metrics` has 'eig_mass' (the top eigenvector's mass per module), which needs 'eigenvalues' "
                "in `metrics`."
            )
        landscapes = [m for m in ("landscape", "landscape_2d") if m in metrics]
        if landscapes and "eigenvalues" not in metrics:
            raise ValueError(f"`metrics` has {landscapes[0]!r} (the loss along the top eigenvectors), which needs "
                             "'eigenvalues' in `metrics` too.")
        if "landscape_2d" in metrics and self.top_k < 2:
            raise ValueError("`metrics` has 'landscape_2d' (the loss over the two sharpest directions), which needs "
                             f"`top_k` >= 2, got {self.top_k}.")
        if self.backend == "finite-difference" and self.curvature == "ggn":
            raise ValueError(
                "`backend='finite-difference'` measures the Hessian; `curvature='ggn'` needs an exact backend "
                "('auto', 'double-backward')."
            )
        if self.data == "current" and self.num_batches != 1:
            raise ValueError(
                f"`num_batches={self.num_batches}` needs `data='fixed'`; with data='current' the estimate uses the "
                "one batch being trained on."
            )

    @property
    def budget_overhead(self) -> float | None:
        """The cadence budget in force: ``max_overhead``, or 5% when neither it nor a cadence is given."""
        if self.max_overhead is None and self.every_n_train_steps is None:
            return DEFAULT_MAX_OVERHEAD
        return self.max_overhead

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples), e.g. for hyperparameter logging."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in dataclasses.fields(self)}


def args_doc(indent: int = 8) -> str:
    """The ``Args:`` section of the callback's docstring, generated from :class:`MonitorOptions`."""
    lines = ["Args:"]
    for f in dataclasses.fields(MonitorOptions):
        default = f.default
        text = f"{f.name}: {f.metadata['doc']} Default: ``{default!r}``."
        if f.metadata["price"]:
            text += f" Cost: {f.metadata['price']}"
        lines += textwrap.wrap(text, width=116 - indent, initial_indent="    ", subsequent_indent="        ")
    return textwrap.indent("\n".join(lines), " " * (indent - 4))
