"""The measurement plan: given an operator and the options, which estimators run, in which order, sharing what.

Plain torch (no Lightning): usable from a plain PyTorch loop::

    plan = MeasurementPlan(MonitorOptions(top_k=3))
    for step, (x, y) in enumerate(loader):
        if step % 100 == 0:
            op = HessianOperator.from_module(model, F.cross_entropy, x, y)
            print(plan.run(op, params=dict(model.named_parameters()), optimizer=opt))
        ...

Order and sharing: the top eigenpairs come first (Lanczos, warm-started from the previous estimate's eigenvectors);
the trace is deflated by them (their Ritz values give that part of the trace exactly); ``lambda_min``, the
preconditioned sharpness and per-module blocks warm-start from their own previous vectors; ``eos`` reuses
``lambda_max`` when it was measured; the curvature along the gradient reuses the gradient the operator already has.
Every product is checked for NaN/Inf before it reaches an eigen-decomposition (:class:`CheckedOperator`).
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .dynamics import UnsupportedOptimizer, adam_preconditioner, stability_info
from .estimators import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    _sum,
    block_hutchinson_traces,
    deflated_hutchinson_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from .isolation import NonFiniteError
from .landscape import Landscape, loss_cut, loss_surface
from .operators import BlockOperator, ScaledOperator
from .options import MonitorOptions
from .spaces import ShardedSpace, space_of

__all__ = ["METRIC_KEYS", "CheckedOperator", "MeasurementPlan", "metric_keys_doc", "select_blocks"]

#: Every key the plan (and the callback) can log, without prefix: ``(key, when, meaning)``.
METRIC_KEYS: tuple[tuple[str, str, str], ...] = (
    ("loss", "always", "the loss at which the Hessian was measured (same batch, mode and weights)"),
    ("eig_1 ... eig_k", "``eigenvalues``", "the ``top_k`` eigenvalues, descending; largest algebraic with Lanczos "
     "(default), largest magnitude with ``eigen_solver=\"power\"``"),
    ("lambda_max", "``eigenvalues``, Lanczos", "the sharpness, ``= eig_1``"),
    ("eig_converged", "``eigenvalues``", "1 if every pair met ``‖Hv − λv‖ ≤ tol·|λ|`` and (Lanczos, ``top_k > 1``) a "
     "deflated check found no eigenvalue above the k-th left out, else 0"),
    ("trace", "``trace``", "estimate of ``tr(H)`` (see ``trace_estimator``)"),
    ("trace_stderr", "``trace``", "its standard error"),
    ("stability_threshold", "``eos``", "the optimizer's threshold: ``(2 + 2β)/(η(1 − d))`` for SGD (momentum β, "
     "dampening d), ``(2 + 2β₁)/(η(1 − β₁))`` for Adam/AdamW"),
    ("eos_ratio", "``eos``", "SGD: ``(λ_max + wd)/threshold`` (coupled weight decay wd); Adam: "
     "``preconditioned_lambda_max/threshold`` (from Adam's first step)"),
    ("preconditioned_lambda_max", "``eos`` or ``preconditioned``, Adam/AdamW",
     "top eigenvalue of ``P^{-1/2} (H + wd·I) P^{-1/2}``, ``P = (1 − β₁ᵗ)(diag(√v̂) + ε)``; coordinates Adam has "
     "never moved (``v = 0``, or no optimizer state) are left out"),
    ("grad_curvature", "``grad_curvature``", "``gᵀHg/‖g‖²`` along the batch gradient"),
    ("update_curvature", "``grad_curvature``", "``uᵀHu/‖u‖²`` along the last update ``u = θ_t − θ_{t−1}`` (from "
     "the second estimate on)"),
    ("lambda_min", "``lambda_min``", "the most negative eigenvalue (Lanczos ``SA``)"),
    ("lambda_min_ratio", "``lambda_min`` with Lanczos", "``lambda_min / lambda_max``"),
    ("density_mean", "``density``", "first moment of the SLQ density, ``≈ tr(H)/P``"),
    ("trace/<module>", "``modules``/``module_depth``", "Hutchinson trace of the module's diagonal Hessian block"),
    ("lambda_max/<module>", "``layer_metrics`` has ``lambda_max``", "top eigenvalue of that block"),
    ("eig_mass/<module>", "``layer_metrics`` has ``eig_mass``", "share of the top eigenvector's squared norm in "
     "that block"),
    ("num_hvps", "always", "Hessian-vector products spent on this estimate"),
    ("every_n_steps", "from the second estimate on", "optimizer steps since the previous estimate (the cadence the "
     "``max_overhead`` budget chose, or ``every_n_train_steps``)"),
    ("overhead", "from the second estimate on", "estimate seconds per training second so far (validation excluded), "
     "as the budget counts them"),
    ("seconds", "always", "wall time of this estimate"),
)


def metric_keys_doc(prefix: str = "curvature/", indent: int = 4) -> str:
    """A bullet list of :data:`METRIC_KEYS` for docstrings."""
    pad = " " * indent
    return "\n".join(f"{pad}- ``{prefix}{key}`` ({when}): {meaning}." for key, when, meaning in METRIC_KEYS)


class CheckedOperator:
    """An operator whose every product is checked for NaN/Inf (:class:`NonFiniteError`) before an estimator sees it.

    Without this, a batch with an infinite input (finite loss, non-finite products) dies deep inside
    ``torch.linalg.eigh``. Other attributes (``names``, ``params``, ``gradient``, ...) come from the wrapped operator.
    """

    def __init__(self, op: Any) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)

    def _check(self, out: Tensor, what: str) -> Tensor:
        # the sum is NaN or Inf when an entry is, and overflows only where entries come within a factor P of the
        # dtype's largest value (3.4e38 / P in float32: a curvature no training run survives): one read of the
        # vector, where ``isfinite(out).all()`` makes boolean tensors (2.2 ms against 0.05 ms at P = 1.6M on this
        # project's CPU VM, a tenth of a product)
        total = out.sum()
        space = space_of(self.op)
        if space is not None:  # sharded vectors: every process must raise together, or the others would hang
            total = space.sum(total)
        if not math.isfinite(float(total)):
            raise NonFiniteError(f"a {what} is not finite (NaN or Inf in the batch, the weights or the model, or "
                                 "entries too large to sum).")
        return out

    def matvec(self, v: Tensor) -> Tensor:
        return self._check(self.op.matvec(v), "Hessian-vector product")

    def matmat(self, V: Tensor) -> Tensor:
        return self._check(self.op.matmat(V), "Hessian-vector product")

    def gradient(self) -> Tensor:
        return self._check(self.op.gradient(), "gradient")

    @property
    def loss(self) -> float:
        value = self.op.loss
        if not math.isfinite(value):
            raise NonFiniteError(f"the loss is {value}.")
        return value


def select_blocks(
    module: torch.nn.Module, patterns: Sequence[str] | None, depth: int | None,
    trainable: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """Map each selected submodule to the names of its differentiated parameters (as in ``named_parameters``).

    Args:
        module: the root module.
        patterns: module names or ``fnmatch`` globs (``"net.*"``), matched against ``named_modules()``.
        depth: select the modules ``depth`` levels below the root (``1``: direct children).
        trainable: the differentiated parameter names (default: those with ``requires_grad``).

    Raises:
        ValueError: a pattern matches no module with trainable parameters; the message lists those available.
    """
    if trainable is None:
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


def _layout(op: Any) -> list[list[Any]]:
    """The parameters' names and shapes: what stored vectors index (with the shard's place, for sharded vectors)."""
    space = space_of(op)
    if space is None:
        return [[name, list(shape)] for name, shape in zip(op.names, op.shapes)]
    return [[name, list(piece.shape), list(piece.offset), list(piece.local_shape)]
            for name, piece in zip(op.names, space.pieces)]


class MeasurementPlan:
    """Runs the estimators the options ask for on one operator and returns a flat dict of metrics.

    Holds what carries over between estimates: the callback's own ``torch.Generator`` (probes, start vectors) and the
    warm-start vectors of every eigen-solve, tagged with the parameter layout they belong to; when the set of
    differentiated parameters or their shapes change (a layer frozen or unfrozen), they are dropped, never
    mis-sized. :meth:`state_dict` holds plain values and CPU tensors.

    Args:
        options: the validated options.
        blocks: per-module metrics: module name → names of its parameters (see :func:`select_blocks`).
        warn: called once per kind of note, e.g. an optimizer without a known stability threshold (default:
            ``warnings.warn``).
    """

    def __init__(
        self, options: MonitorOptions, blocks: Mapping[str, Sequence[str]] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.blocks = dict(blocks or {})
        self.warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self._warned: set[str] = set()
        self.generator = torch.Generator().manual_seed(options.seed)
        self.vectors: dict[str, Tensor] = {}
        self.layout: list[list[Any]] | None = None
        self.last_density: SpectralDensity | None = None
        #: the loss landscapes of the latest estimate (``"landscape"``, ``"landscape_2d"``), by metric name
        self.last_landscapes: dict[str, Landscape] = {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "vectors": {k: v.detach().cpu() for k, v in self.vectors.items()},
            "layout": self.layout,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator_state"])
        self.vectors = dict(state.get("vectors") or {})
        self.layout = state.get("layout")

    def __getstate__(self) -> dict[str, Any]:
        # a torch.Generator cannot be pickled (ddp_spawn pickles the callback): keep its state, rebuild it after. As
        # bytes, not a tensor: torch.multiprocessing would share a temporary tensor's memory, freed before the child
        # maps it. The warning function may not pickle: fall back to warnings.warn.
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state().numpy().tobytes()
        state["warn"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "generator": generator})
        if self.warn is None:
            self.warn = lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the estimate
    def run(
        self,
        op: Any,
        *,
        params: Mapping[str, Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        previous_params: Mapping[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """Measure. Keys are those of :data:`METRIC_KEYS` that the options ask for (without prefix).

        Args:
            op: the curvature operator (wrapped in a :class:`CheckedOperator` here).
            params: the module's real parameters by name (for Adam's preconditioner, whose state is keyed by them).
            optimizer: for ``eos`` and ``preconditioned``.
            previous_params: the differentiated parameters one optimizer step earlier, by name, for
                ``update_curvature`` (ignored when names or shapes differ from the operator's).

        Raises:
            NonFiniteError: a loss or product is not finite.
        """
        o = self.options
        op = op if isinstance(op, CheckedOperator) else CheckedOperator(op)
        layout = _layout(op)
        if layout != self.layout:  # the differentiated set changed: old vectors belong to other coordinates
            self.vectors = {}
            self.layout = layout
        out: dict[str, float] = {"loss": op.loss}
        loss_dtype = getattr(op, "loss_dtype", None)
        if op.dtype == torch.float64 and loss_dtype not in (None, torch.float64):
            self._note("dtype", f"CurvatureMonitor: dtype='float64' was asked, but the loss comes back in {loss_dtype} "
                       "(the model casts inside, e.g. Hugging Face's logits.float()): the products are only as "
                       f"accurate as {loss_dtype}.")
        top = None
        if "eigenvalues" in o.metrics:
            top = self._eigs(op, "top", o.top_k, "LA")
            values = torch.sort(top.eigenvalues, descending=True).values.tolist()
            for i, value in enumerate(values, start=1):
                out[f"eig_{i}"] = value
            if o.eigen_solver == "lanczos":
                out["lambda_max"] = values[0]
            out["eig_converged"] = float(bool(top.converged.all()))
        if "lambda_min" in o.metrics:
            bottom = self._eigs(op, "bottom", 1, "SA", solver="lanczos")
            out["lambda_min"] = float(bottom.eigenvalues[0])
            if "lambda_max" in out and out["lambda_max"] != 0:
                out["lambda_min_ratio"] = out["lambda_min"] / out["lambda_max"]
        if "trace" in o.metrics:
            tr = self._trace(op, top)
            _finite([tr.value], "trace estimate")
            out["trace"], out["trace_stderr"] = tr.value, tr.stderr
        if "density" in o.metrics:
            dens = spectral_density(op, num_probes=o.density_probes, num_steps=o.density_steps,
                                    generator=self.generator)
            _finite(dens.nodes.reshape(-1).tolist(), "spectral density")
            self.last_density = dens
            out["density_mean"] = dens.moments(1)
        if "grad_curvature" in o.metrics:
            out.update(self._directional(op, previous_params))
        if "eos" in o.metrics or "preconditioned" in o.metrics:
            out.update(self._stability(op, params, optimizer, out.get("lambda_max")))
        if "layers" in o.metrics:
            out.update(self._layers(op, top))
        self.last_landscapes = self._landscapes(op, top) if top is not None else {}
        return out

    def _landscapes(self, op: Any, top: EigenResult) -> dict[str, Landscape]:
        """The loss along the top eigenvectors (forward passes only; see :mod:`~lightning_curvature.landscape`)."""
        o = self.options
        wanted = [m for m in ("landscape", "landscape_2d") if m in o.metrics]
        loss_fn = getattr(op, "loss_fn", None)
        if not wanted or not callable(loss_fn):
            if wanted:
                self._note("landscape", "CurvatureMonitor: the loss landscape needs the loss as a function of the "
                           "parameters, which the finite-difference backend does not offer; it is skipped.")
            return {}
        order = torch.argsort(top.eigenvalues, descending=True)
        lams, vecs = top.eigenvalues[order], top.eigenvectors[:, order]
        radius = o.landscape_radius
        if radius is None:
            radius = math.sqrt(2 * abs(op.loss) / float(lams[0])) if float(lams[0]) > 0 and op.loss != 0 else 1.0
        grid = torch.linspace(-radius, radius, o.landscape_points, dtype=torch.float64)
        g = op.gradient()
        slopes = [float(torch.dot(g, vecs[:, i].to(g.dtype))) for i in range(min(2, vecs.shape[1]))]
        out: dict[str, Landscape] = {}
        if "landscape" in wanted:
            out["landscape"] = loss_cut(loss_fn, op.params, vecs[:, 0], grid, curvature=float(lams[0]),
                                        slope=slopes[0])
        if "landscape_2d" in wanted:
            out["landscape_2d"] = loss_surface(loss_fn, op.params, [vecs[:, 0], vecs[:, 1]], grid, grid,
                                               curvatures=[float(lams[0]), float(lams[1])], slopes=slopes)
        return out  # a non-finite loss far from θ is information, not a failed estimate

    def _eigs(self, op: Any, key: str, k: int, which: str, solver: str | None = None) -> EigenResult:
        """One eigen-solve, warm-started from (and storing) the vectors under ``key``."""
        o = self.options
        init = self._warm(key, op)
        if (solver or o.eigen_solver) == "lanczos":
            res = lanczos(op, k, which=which, max_iter=o.max_iter, tol=o.tol, init=init,  # type: ignore[arg-type]
                          generator=self.generator)
        else:
            res = power_iteration(op, k, max_iter=o.max_iter, tol=o.tol, init=init, generator=self.generator)
        _finite(res.eigenvalues.tolist(), "eigenvalue")
        self.vectors[key] = res.eigenvectors.detach()
        return res

    def _warm(self, key: str, op: Any) -> Tensor | None:
        """The stored vectors under ``key`` if they fit ``op``; for sharded vectors, only if they do on every process.

        (A warm start on some processes only would send them through collectives the others never call.)
        """
        vectors = self.vectors.get(key) if self.options.warm_start else None
        usable = vectors is not None and vectors.shape[0] == op.shape[0]
        space = space_of(op)
        if space is not None:
            usable = space.all(usable, op.device)
        return vectors if usable else None

    def _trace(self, op: Any, top: EigenResult | None) -> TraceResult:
        o = self.options
        method = o.trace_estimator
        if method == "auto":
            method = "deflated" if top is not None else "hutchpp"
        kwargs: dict[str, Any] = {"rtol": o.trace_rtol, "distribution": o.distribution, "generator": self.generator}
        if method == "deflated":
            if top is None:
                vectors = self._warm("top", op)
                if vectors is None:
                    vectors = self._eigs(op, "top", o.top_k, "LA", solver="lanczos").eigenvectors
                return deflated_hutchinson_trace(op, vectors.to(op.device, op.dtype), o.num_probes, **kwargs)
            return deflated_hutchinson_trace(op, top.eigenvectors, o.num_probes, eigenvalues=top.eigenvalues, **kwargs)
        if method == "hutchpp" and o.num_probes >= 6:  # below that the sketch leaves too few probes
            return hutchpp_trace(op, o.num_probes, **kwargs)
        return hutchinson_trace(op, o.num_probes, **kwargs)

    def _directional(self, op: Any, previous: Mapping[str, Tensor] | None) -> dict[str, float]:
        """Curvature along the gradient, ``gᵀHg/‖g‖²``, and along the last update, ``uᵀHu/‖u‖²``."""
        out: dict[str, float] = {}
        update = None
        space = space_of(op)
        usable = previous is not None and list(previous) == list(op.names) and all(
            tuple(previous[n].shape) == tuple(s) for n, s in zip(op.names, op.shapes))
        if space is not None:  # on every process, or none (a product some processes skip would hang the others)
            usable = space.all(usable, op.device)
        if usable:
            assert previous is not None
            update = op.flatten(list(op.params.values())) - op.flatten(
                [previous[n].to(op.device, op.dtype) for n in op.names])
        for key, direction in (("grad_curvature", op.gradient()), ("update_curvature", update)):
            if direction is None:
                continue
            norm2 = float(_sum(space, direction.to(torch.float64).pow(2).sum()))
            if norm2 == 0.0:
                continue
            value = float(_sum(space, torch.dot(direction, op.matvec(direction))).to(torch.float64)) / norm2
            _finite([value], key.replace("_", " "))
            out[key] = value
        return out

    def _stability(
        self, op: Any, params: Mapping[str, Tensor] | None, optimizer: torch.optim.Optimizer | None,
        lambda_max: float | None,
    ) -> dict[str, float]:
        """``eos_ratio`` = sharpness / the optimizer's stability threshold (Cohen et al. 2021, 2022)."""
        if optimizer is None:
            return {}
        try:
            info = stability_info(optimizer)
        except UnsupportedOptimizer as err:
            self._note("optimizer", f"CurvatureMonitor: eos_ratio is skipped: {err}.")
            return {}
        out = {"stability_threshold": info.threshold}
        if info.kind == "sgd":
            if lambda_max is None:
                lambda_max = float(self._eigs(op, "top", 1, "LA", solver="lanczos").eigenvalues[0])
            out["eos_ratio"] = (lambda_max + info.weight_decay) / info.threshold
            return out
        if params is None:
            return out
        d = adam_preconditioner(optimizer, [params[n] for n in op.names], local=space_of(op) is not None)
        if d is None:  # before Adam's first step there is no preconditioner yet
            return out
        # coupled weight decay (Adam, not AdamW) adds wd·I to H, i.e. wd·P^{-1} to the preconditioned curvature
        shift = info.weight_decay * d**2 if info.weight_decay else None
        pop = ScaledOperator(op, d, add_diagonal=shift)
        top = self._eigs(pop, "preconditioned", 1, "LA", solver="lanczos")
        value = float(top.eigenvalues[0])
        out["preconditioned_lambda_max"] = value
        out["eos_ratio"] = value / info.threshold
        return out

    def _note(self, key: str, message: str) -> None:
        """Warn once per kind of note."""
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def _layers(self, op: Any, top: EigenResult | None) -> dict[str, float]:
        """Per-module diagonal blocks: trace, top eigenvalue, and the top eigenvector's mass in each block."""
        o = self.options
        out: dict[str, float] = {}
        offsets, start = {}, 0
        for name, n in zip(op.names, op.numels):  # this process's entries, for sharded vectors
            offsets[_unwrapped(name)] = (start, start + n)
            start += n
        index = {
            module: torch.cat([torch.arange(*offsets[p]) for p in names if p in offsets])
            for module, names in self.blocks.items() if any(p in offsets for p in names)
        }
        space = space_of(op)
        spaces: dict[str, Any] = {}
        if space is not None:  # each block's own pieces: its probes and sums over the processes
            piece = dict(zip(map(_unwrapped, op.names), space.pieces))
            spaces = {module: ShardedSpace([piece[p] for p in names if p in piece], group=space.group)
                      for module, names in self.blocks.items() if module in index}
        if "trace" in o.layer_metrics and index:
            traces = block_hutchinson_traces(op, list(index.values()), o.num_probes,
                                             distribution=o.distribution,  # type: ignore[arg-type]
                                             generator=self.generator)
            for module, tr in zip(index, traces):
                out[f"trace/{module}"] = tr.value
        if "lambda_max" in o.layer_metrics:
            for module, idx in index.items():
                block = self._eigs(BlockOperator(op, idx, space=spaces.get(module)), f"block/{module}", 1, "LA",
                                   solver="lanczos")
                out[f"lambda_max/{module}"] = float(block.eigenvalues[0])
        if "eig_mass" in o.layer_metrics and top is not None:
            v = top.eigenvectors[:, 0].to(torch.float64)
            total = float(_sum(space, v.pow(2).sum()))
            for module, idx in index.items():
                out[f"eig_mass/{module}"] = float(_sum(space, v[idx.to(v.device)].pow(2).sum())) / total
        _finite(list(out.values()), "per-module estimate")
        return out


def _unwrapped(name: str) -> str:
    """A parameter's name as the user's module has it, without FSDP1's and activation checkpointing's wrappers.

    Per-module blocks are selected before ``configure_model`` wraps the model.
    """
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _finite(values: Sequence[float], what: str) -> None:
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteError(f"a {what} is not finite.")

