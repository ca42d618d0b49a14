"""Curvature operators: Hessian-vector products of a loss with respect to a parameter dict.

This module is plain torch (no Lightning import). An operator represents a symmetric ``(P, P)`` matrix
``H`` implicitly, through ``matvec(v) = H v`` on flat vectors of length ``P = sum(p.numel())``, and
``matmat(V) = H V`` on ``(P, m)`` blocks. Estimators in :mod:`lightning_curvature.estimators` only need
this interface, so they also accept a dense matrix wrapped by :func:`as_operator`.

Hessian-vector products never form ``H``: with ``g(θ) = ∇L(θ)``, ``H v = d/dε g(θ + ε v)|₀``
(Pearlmutter 1994, "Fast Exact Multiplication by the Hessian"). Two ways to evaluate it:

* **forward-over-reverse**: ``torch.func.jvp`` of ``torch.func.grad(L)`` in direction ``v``;
  one forward-mode pass through the backward graph, nothing kept between products.
* **double-backward**: ``g = autograd.grad(L, θ, create_graph=True)`` is built *once* per operator
  (the parameters and the batch are fixed for its lifetime), and every product is one more reverse
  pass ``autograd.grad(g, θ, grad_outputs=v)`` through that retained graph. This is what makes an HVP
  cost fewer than two gradients inside one estimate.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "BlockOperator",
    "GGNOperator",
    "ScaledOperator",
    "CurvatureOperator",
    "DenseOperator",
    "DistributedOperator",
    "HessianOperator",
    "HVPUnsupportedError",
    "ModuleLoss",
    "ReentrantCheckpointError",
    "as_operator",
    "module_loss_fn",
    "private_copy",
]

Backend = Literal["auto", "double-backward", "forward-over-reverse"]
BACKENDS: tuple[str, ...] = ("auto", "double-backward", "forward-over-reverse")


class HVPUnsupportedError(RuntimeError):
    """Raised when no backend can form a Hessian-vector product of the loss.

    Typical cause: an op in the model has no second derivative (a custom ``autograd.Function`` whose
    backward is not differentiable, some fused kernels).
    """


@runtime_checkable
class CurvatureOperator(Protocol):
    """What estimators need from an operator: a symmetric ``(P, P)`` linear map."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor:  # pragma: no cover - protocol
        """Return ``H v`` for a flat vector ``v`` of length ``P``."""
        ...

    def matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - protocol
        """Return ``H V`` for a ``(P, m)`` block ``V``."""
        ...


class DenseOperator:
    """An explicit symmetric matrix behind the operator interface (used by tests and small problems).

    Args:
        matrix: a square ``(P, P)`` tensor. Symmetry is the caller's promise; it is not checked.

    Example:
        >>> op = DenseOperator(torch.diag(torch.tensor([3.0, -1.0])))
        >>> op.matvec(torch.tensor([1.0, 1.0]))
        tensor([ 3., -1.])
    """

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"A dense operator needs a square matrix, got shape {tuple(matrix.shape)}.")
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_matvecs = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return self.matrix @ v

    def matmat(self, V: Tensor) -> Tensor:
        self.num_matvecs += V.shape[1]
        return self.matrix @ V


def as_operator(A: Any) -> CurvatureOperator:
    """Return ``A`` if it is an operator, or wrap a dense square tensor in :class:`DenseOperator`."""
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if hasattr(A, "matvec") and hasattr(A, "shape"):
        return A
    raise TypeError(f"Expected a curvature operator (with matvec and shape) or a square tensor, got {type(A)!r}.")


class ReentrantCheckpointError(HVPUnsupportedError):
    """The loss uses reentrant activation checkpointing, which cannot be differentiated twice.

    ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` is incompatible with ``autograd.grad``, and silently
    drops the gradients of the checkpointed parameters when no input of the checkpointed block requires grad.
    """


def _refuse_reentrant(cls: type, *args: Any, **kwargs: Any) -> Any:
    raise ReentrantCheckpointError(
        "the model uses reentrant activation checkpointing (torch.utils.checkpoint.checkpoint(..., "
        "use_reentrant=True)), which cannot be differentiated twice. Pass use_reentrant=False (the same memory "
        "savings, and PyTorch's recommended default), or use backend='finite-difference'."
    )


@contextlib.contextmanager
def _no_reentrant_checkpoint() -> Iterator[None]:
    """Turn a reentrant checkpoint inside the body into :class:`ReentrantCheckpointError` at once.

    Instead of a Hessian silently missing the checkpointed blocks, or an obscure error later.
    """
    from torch.utils.checkpoint import CheckpointFunction

    own = CheckpointFunction.__dict__.get("apply")
    CheckpointFunction.apply = classmethod(_refuse_reentrant)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        if own is None:
            del CheckpointFunction.apply
        else:
            CheckpointFunction.apply = own  # type: ignore[method-assign]


@contextlib.contextmanager
def _second_order_context(device: torch.device) -> Iterator[None]:
    """Grad on, autocast off, the math SDPA kernel (the fused ones have no double backward), no reentrant checkpoint."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.enable_grad())
        for dev in {device.type, "cpu"}:
            if dev in ("cpu", "cuda"):
                stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(_no_reentrant_checkpoint())
        yield


class HessianOperator:
    """The Hessian of a scalar loss with respect to a dict of parameters, as a linear operator.

    ``H = ∇²_θ L(θ)`` with ``θ`` the concatenation of the flattened values of ``params`` in their
    dict order. The loss is measured exactly as ``loss_fn`` reduces it (a mean loss gives ``1/N`` times the
    Hessian of a summed one). Parameters the loss does not use get zero rows and columns.

    Args:
        loss_fn: maps a ``dict[str, Tensor]`` with the same keys as ``params`` to a scalar tensor. It must be a
            fixed function for the operator's lifetime (same batch, no fresh dropout masks); see
            :func:`module_loss_fn` for a module.
        params: the point ``θ`` at which ``H`` is taken, e.g. ``dict(model.named_parameters())``. The values are
            detached and copied; the originals and their ``.grad`` are never touched.
        backend: ``"auto"`` (default), ``"double-backward"`` or ``"forward-over-reverse"``. ``"auto"`` uses
            double backward with the first-order graph built once and reused (fewest gradients per product),
            and switches to forward-over-reverse if the loss cannot be differentiated twice in reverse mode or
            if a used parameter's gradient comes out detached from the graph (a backward that is not
            differentiable would otherwise give silent zeros); :class:`HVPUnsupportedError` if neither works.
        dtype: compute in this floating dtype (e.g. ``torch.float64``); default: the parameters' dtype.
        block_size: ``0`` (default): ``matmat`` loops over columns with the backend above. ``n > 0``: ``matmat``
            pushes blocks of up to ``n`` columns through one ``torch.func.vmap`` of the forward-over-reverse product
            (memory grows with ``n``), falling back to the loop where vmap fails (e.g. dropout in train mode).
            Measured per column (benchmarks/run.py, block of 32): 2.2 gradients on an MLP, where the reused
            double-backward graph costs 1.7, and 1.8 on a CNN, where it costs 2.2.

    Example:
        The seed notebook's closed form: for ``L = (w·x + b - y)²``, ``H = 2 [[x xᵀ, x], [xᵀ, 1]]``.

        >>> x, y = torch.tensor([1.0, 2.0]), torch.tensor(0.5)
        >>> params = {"w": torch.zeros(2), "b": torch.zeros(())}
        >>> op = HessianOperator(lambda p: (p["w"] @ x + p["b"] - y) ** 2, params)
        >>> op.matvec(torch.tensor([0.0, 0.0, 1.0]))  # last column: 2 [x, 1]
        tensor([2., 4., 2.])
    """

    def __init__(
        self,
        loss_fn: Callable[[dict[str, Tensor]], Tensor],
        params: Mapping[str, Tensor],
        *,
        backend: Backend = "auto",
        dtype: torch.dtype | None = None,
        block_size: int = 0,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0: no vectorisation), got {block_size!r}.")
        self.block_size = block_size
        self._vmap_failed = False
        if len(params) == 0:
            raise ValueError("HessianOperator needs at least one parameter; got an empty dict.")
        self.loss_fn = loss_fn
        self.requested_backend: str = backend
        self.backend: str | None = None if backend == "auto" else backend
        first = next(iter(params.values()))
        self.dtype = dtype or first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {self.dtype}.")
        self.device = first.device
        self.names = list(params)
        self.params = {k: v.detach().to(self.dtype).clone() for k, v in params.items()}
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        P = sum(self.numels)
        self.shape = (P, P)
        ends = torch.tensor(self.numels).cumsum(0).tolist()
        self._slices = [(e - n, e) for e, n in zip(ends, self.numels)]
        self.num_matvecs = 0
        self._graph: tuple[list[Tensor], list[Tensor], list[int]] | None = None
        self._loss_value: float | None = None
        #: the dtype the loss came back in (a model may compute it in another dtype than the products ask for)
        self.loss_dtype: torch.dtype | None = None
        self._gradient: Tensor | None = None
        self._detached: list[str] = []
        self._blocked = ""
        self._errors: list[str] = []
        self._forward_ok = False
        self._auto_pending = backend == "auto"  # the first product may still fall back to the other backend

    # ------------------------------------------------------------------ flat <-> dict
    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length ``P`` into a dict shaped like the parameters."""
        parts = torch.split(v, self.numels)
        return {k: part.view(shape) for k, part, shape in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor | None] | list[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors (``None`` meaning zero) into a flat vector."""
        values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        values = [t.to_dense() if t is not None and t.layout != torch.strided else t for t in values]
        if all(t is not None for t in values):
            return torch.cat([t.reshape(-1) for t in values]).to(self.dtype)  # type: ignore[union-attr]
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for t, (start, stop) in zip(values, self._slices):
            if t is not None:
                out[start:stop] = t.reshape(-1)
        return out

    # ------------------------------------------------------------------ public API
    @property
    def loss(self) -> float:
        """The loss value at ``θ`` (computed on first use)."""
        if self._loss_value is None:
            self.gradient()
        assert self._loss_value is not None
        return self._loss_value

    def gradient(self) -> Tensor:
        """The flat gradient ``∇L(θ)`` (free once the double-backward graph exists)."""
        if self._gradient is None:
            if self.backend is None:
                self._resolve_backend()
            if self.backend == "double-backward":
                self._ensure_graph()
            else:
                try:
                    with _second_order_context(self.device):
                        grads, loss = torch.func.grad_and_value(self.loss_fn)(self.params)
                except HVPUnsupportedError:
                    raise
                except (RuntimeError, NotImplementedError, TypeError) as err:
                    if self.requested_backend != "auto":
                        raise self._as_unsupported(err, "forward-over-reverse") from err
                    self._unsupported(f"forward-over-reverse: {type(err).__name__}: {err}")
                self._check_loss(loss)
                self._loss_value = float(loss.detach())
                self.loss_dtype = loss.dtype
                self._gradient = self.flatten(grads).detach()
        assert self._gradient is not None
        return self._gradient

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` for a flat vector ``v`` of length ``P``."""
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a flat vector of length {self.shape[0]}, got shape {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.dtype)
        if self._auto_pending:
            return self._auto_matvec(v)
        try:
            out = self._matvec_double_backward(v) if self.backend == "double-backward" else self._matvec_fwd_rev(v)
        except HVPUnsupportedError:
            raise
        except (RuntimeError, NotImplementedError, TypeError) as err:
            raise self._as_unsupported(err, self.backend or "auto") from err
        self.num_matvecs += 1
        return out

    def _as_unsupported(self, err: BaseException, backend: str) -> BaseException:
        """``err`` as :class:`HVPUnsupportedError` when it is the backend's (the plain forward runs), else as is."""
        if backend == "double-backward" and self._graph is not None:
            pass  # the forward ran when the graph was built: only the differentiation can have failed
        else:
            try:
                with torch.no_grad():
                    self.loss_fn({k: p.detach() for k, p in self.params.items()})
            except Exception:  # noqa: BLE001 - the model fails by itself: its own error, not the backend's
                return err
        return HVPUnsupportedError(f"{backend}: {type(err).__name__}: {err}")

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``H V`` for a ``(P, m)`` block: a loop of products, or vmapped blocks (see ``block_size``)."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a ({self.shape[0]}, m) block, got shape {tuple(V.shape)}.")
        if self.block_size and V.shape[1] > 1 and not self._vmap_failed:
            V = V.to(device=self.device, dtype=self.dtype)
            try:
                out = torch.cat([self._matmat_vmap(V[:, i:i + self.block_size])
                                 for i in range(0, V.shape[1], self.block_size)], dim=1)
            except (RuntimeError, NotImplementedError, TypeError):
                self._vmap_failed = True  # unsupported under vmap: loop from now on
            else:
                self.num_matvecs += V.shape[1]
                return out
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _matmat_vmap(self, V: Tensor) -> Tensor:
        def hvp(t: Tensor) -> Tensor:
            _, hv = torch.func.jvp(torch.func.grad(self.loss_fn), (self.params,), (self.unflatten(t),))
            return torch.cat([hv[k].reshape(-1) for k in self.names])

        with _second_order_context(self.device):
            return torch.func.vmap(hvp, in_dims=1, out_dims=1)(V).detach()

    def release(self) -> None:
        """Free the retained first-order graph (the operator stays usable; it is rebuilt on demand)."""
        self._graph = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"HessianOperator(P={self.shape[0]}, dtype={self.dtype}, backend={self.backend or 'auto'})"

    # ------------------------------------------------------------------ backends
    def _auto_matvec(self, v: Tensor) -> Tensor:
        """``"auto"``'s first product: resolve the backend, and fall back if the chosen one fails on it."""
        if self.backend is None:
            self._resolve_backend()
        if self.backend == "double-backward":
            try:
                out = self._matvec_double_backward(v)
            except ReentrantCheckpointError:
                raise
            except (RuntimeError, NotImplementedError, TypeError) as err:
                self._errors.append(f"double-backward: {type(err).__name__}: {err}")
                self.release()
                self.backend = "forward-over-reverse"
            else:
                self._auto_pending = False
                self.num_matvecs += 1
                return out
        try:
            out = self._matvec_fwd_rev(v)
        except HVPUnsupportedError:
            raise
        except (RuntimeError, NotImplementedError, TypeError) as err:
            self._unsupported(f"forward-over-reverse: {type(err).__name__}: {err}")
        self._auto_pending = False
        self.num_matvecs += 1
        return out

    def _resolve_backend(self) -> None:
        """``"auto"``: double backward when the first-order graph can be trusted, else forward-over-reverse."""
        try:
            self._ensure_graph()
            if not self._detached and not self._blocked:
                self.backend = "double-backward"
                return
            if self._blocked:
                self._errors.append(
                    f"double-backward: the first-order graph contains ops whose backward is not differentiable "
                    f"({self._blocked}); their second-order terms would be silently dropped"
                )
            else:
                self._errors.append(
                    f"double-backward: the gradient of {self._detached} is detached from the graph (a backward that is "
                    "not differentiable, or a loss linear in them), so reverse-over-reverse cannot be trusted"
                )
        except ReentrantCheckpointError:
            raise
        except (RuntimeError, NotImplementedError, TypeError) as err:
            if not self._forward_ok:  # the forward itself failed: another backend would fail the same way
                raise
            self._errors.append(f"double-backward: {type(err).__name__}: {err}")
        self.release()
        self.backend = "forward-over-reverse"

    def _unsupported(self, error: str) -> None:
        self.backend = None
        raise HVPUnsupportedError(
            "No backend could compute a Hessian-vector product of this loss (an op without second "
            "derivatives?).\n" + "\n".join([*self._errors, error])
        )

    def _ensure_graph(self) -> tuple[list[Tensor], list[Tensor], list[int]]:
        if self._graph is None:
            leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
            self._forward_ok = False
            with _second_order_context(self.device):
                loss = self.loss_fn(leaves)
                self._forward_ok = True  # an exception before this is the model's own, not the backend's
                self._check_loss(loss)
                try:
                    grads = self._replay(lambda: torch.autograd.grad(loss, list(leaves.values()), create_graph=True,
                                                                     allow_unused=True))
                except HVPUnsupportedError:
                    raise
                except (RuntimeError, NotImplementedError, TypeError) as err:
                    if self.requested_backend == "auto":
                        raise
                    raise HVPUnsupportedError(f"double-backward: {type(err).__name__}: {err}") from err
            self._loss_value = float(loss.detach())
            self.loss_dtype = loss.dtype
            self._gradient = self.flatten(list(grads)).detach()
            # Differentiate only the gradient blocks that depend on θ. Unused parameters (None) have zero rows. A
            # used parameter whose gradient has no graph is either constant in θ or came out of a backward that is
            # not differentiable; reverse mode cannot tell which, so flag it.
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._detached = [self.names[i] for i, g in enumerate(grads) if g is not None and not g.requires_grad]
            # A backward marked @once_differentiable hangs a DelayedError node off the first-order graph. Its inputs
            # are detached, so a second backward never reaches it and silently drops those terms: look for it.
            blocked = _nondifferentiable_nodes([grads[i] for i in live])
            self._blocked = blocked
            if blocked:
                if self.backend == "double-backward":
                    raise HVPUnsupportedError(
                        f"double-backward: the first-order graph contains ops whose backward is not differentiable "
                        f"({blocked}); their second-order terms would be silently dropped."
                    )
            if self._detached and self.backend == "double-backward" and not blocked:
                warnings.warn(
                    f"HessianOperator(backend='double-backward'): the gradient of {self._detached} does not depend "
                    "on the parameters in the autograd graph; their Hessian blocks are taken as zero. If an op in "
                    "the model has no second derivative this is wrong: use backend='auto'.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._graph = ([grads[i] for i in live], list(leaves.values()), live)
        return self._graph

    def _check_loss(self, loss: Tensor) -> None:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}.")

    def _matvec_double_backward(self, v: Tensor) -> Tensor:
        grads, leaves, live = self._ensure_graph()
        if not live:
            return torch.zeros_like(v)
        grad_outputs = [v[self._slices[i][0]:self._slices[i][1]].view(self.shapes[i]) for i in live]
        # A reverse pass through the retained graph; with activation checkpointing it recomputes forward pieces, in
        # the graph's own context (see _replay)
        hv = self._replay(lambda: torch.autograd.grad(grads, leaves, grad_outputs=grad_outputs, retain_graph=True,
                                                      allow_unused=True))
        return self.flatten(list(hv))

    def _replay(self, fn: Callable[[], Any]) -> Any:
        return _replaying(self.loss_fn, fn, self.device)

    def _matvec_fwd_rev(self, v: Tensor) -> Tensor:
        tangents = self.unflatten(v)
        with _second_order_context(self.device):
            _, hv = torch.func.jvp(torch.func.grad(self.loss_fn), (self.params,), (tangents,))
        return self.flatten(hv).detach()

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        criterion: Callable[[Any, Any], Tensor],
        inputs: Any,
        targets: Any,
        *,
        params: Mapping[str, Tensor] | None = None,
        backend: Backend = "auto",
        dtype: torch.dtype | None = None,
        mode: Literal["eval", "train"] = "eval",
        block_size: int = 0,
    ) -> HessianOperator:
        """The Hessian of ``criterion(module(inputs), targets)`` with respect to the module's parameters.

        Args:
            module: any ``nn.Module``; it is not modified (its buffers, flags and ``.grad`` stay as they are).
            criterion: e.g. ``nn.functional.cross_entropy``; its reduction defines the Hessian's scale.
            inputs: the batch's inputs, passed to ``module(inputs)``.
            targets: the batch's targets.
            params: which parameters to differentiate; default: all with ``requires_grad``.
            backend: see :class:`HessianOperator`.
            dtype: compute dtype (``torch.float64`` casts parameters, buffers and floating inputs).
            mode: ``"eval"`` (default) measures the network in eval mode; ``"train"`` in train mode with
                BatchNorm running statistics frozen and dropout masks fixed for the operator's lifetime.
            block_size: vmapped ``matmat`` blocks (see :class:`HessianOperator`).
        """
        loss_fn, theta = module_loss_fn(
            module, lambda m: criterion(m(_cast(inputs, dtype)), _cast(targets, dtype)), params=params,
            dtype=dtype, mode=mode,
        )
        return cls(loss_fn, theta, backend=backend, dtype=dtype, block_size=block_size)


def _replaying(source: Any, fn: Callable[[], Any], device: torch.device) -> Any:
    """Run the backward pass ``fn`` in the context its forward ran in, when that forward will be recomputed.

    Non-reentrant activation checkpointing recomputes forward pieces inside a backward pass, which would otherwise run
    on the module's own parameters, with its own flags, RNG state and kernels (different values, or a
    ``CheckpointError``). A :class:`ModuleLoss` knows whether its last call checkpointed (``recomputes``) and can
    re-enter that call's context (``replay``); everything else runs ``fn`` as it is.
    """
    if not getattr(source, "recomputes", False):
        return fn()
    with _second_order_context(device):
        return source.replay(fn)


def _nondifferentiable_nodes(tensors: list[Tensor]) -> str:
    """Names of the autograd nodes reachable from ``tensors`` that cannot be differentiated again.

    Returns ``""`` when there are none. Custom ``autograd.Function`` nodes are listed too when such a node is found,
    to help name the culprit.
    """
    seen: set[int] = set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    bad: list[str] = []
    custom: list[str] = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        name = node.name()
        if name.rsplit("::", 1)[-1] in ("DelayedError", "Error", "NotImplemented"):
            bad.append(name)
        elif isinstance(node, torch.autograd.function.BackwardCFunction):
            custom.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    if not bad:
        return ""
    found = ", ".join(sorted(set(bad)))
    return f"{found}; custom autograd Functions in the graph: {', '.join(sorted(set(custom)))}" if custom else found


class _Closure(nn.Module):
    """Wraps a module so that ``functional_call`` can run any thunk with the module's tensors substituted."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, thunk: Callable[[], Any]) -> Any:
        return thunk()


def _map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside a (nested) batch: dicts, lists, tuples and namedtuples."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return type(x)({k: _map_tensors(v, fn) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_map_tensors(v, fn) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def _cast(x: Any, dtype: torch.dtype | None) -> Any:
    """Cast floating tensors inside a (nested) batch to ``dtype``."""
    if dtype is None:
        return x
    return _map_tensors(x, lambda t: t.to(dtype) if t.is_floating_point() else t)


def private_copy(x: Any, dtype: torch.dtype | None = None) -> Any:
    """A copy of every tensor inside a (nested) batch, floating ones cast to ``dtype``.

    Code that edits its batch in place then edits the copy.
    """
    return _map_tensors(x, lambda t: t.to(dtype, copy=True) if dtype is not None and t.is_floating_point()
                        else t.clone())


@contextlib.contextmanager
def _mode(module: nn.Module, training: bool) -> Iterator[None]:
    """Set train/eval flags for the duration, restoring each module's own flag after.

    In train mode, BatchNorm layers normalise with batch statistics but do not track running statistics
    (``track_running_stats=False`` for the duration), so the measured function has no side effects.
    """
    flags = [(m, m.training) for m in module.modules()]
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if training else []
    tracking = [m.track_running_stats for m in norms]
    try:
        module.train(training)
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        for m, track in zip(norms, tracking):
            m.track_running_stats = track


@contextlib.contextmanager
def _dense_embeddings(module: nn.Module) -> Iterator[None]:
    """``sparse=False`` on embeddings for the duration.

    The same values, dense gradients (which autograd can differentiate again and the flat vectors can hold).
    """
    sparse = [m for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    try:
        for m in sparse:
            m.sparse = False
        yield
    finally:
        for m in sparse:
            m.sparse = True


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Ignore ``torch.compile`` for the duration.

    Products run the original modules eagerly, never through dynamo, so they neither trigger recompilation nor evict
    or bypass the training's compiled graphs.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # torch < 2.6
        from torch._dynamo import config as dynamo_config

        with dynamo_config.patch(disable=True):
            yield
        return
    with set_stance("force_eager"):
        yield


@contextlib.contextmanager
def _watch_checkpoints(owner: Any) -> Iterator[None]:
    """Set ``owner.recomputes`` when non-reentrant checkpointing runs inside the body.

    Where the torch version offers no hook to tell, it is always set.
    """
    import torch.utils.checkpoint as ckpt

    original = getattr(ckpt, "_checkpoint_without_reentrant_generator", None)
    if original is None:
        owner.recomputes = True
        yield
        return

    def watched(*args: Any, **kwargs: Any) -> Any:
        owner.recomputes = True
        return original(*args, **kwargs)

    owner.recomputes = False
    ckpt._checkpoint_without_reentrant_generator = watched
    try:
        yield
    finally:
        ckpt._checkpoint_without_reentrant_generator = original


class ModuleLoss:
    """``closure(module)`` as a pure function ``θ ↦ loss`` of a parameter dict, for :class:`HessianOperator`.

    Each call runs ``closure`` with the module's differentiated parameters replaced by ``θ``
    (``torch.func.functional_call``) and every other parameter and buffer replaced by a private copy made for that
    call (so BatchNorm running statistics, counters and frozen weights written in place never change, and every call
    sees the same values); with the train/eval flags set by ``mode``; with the global RNG forked and set to the same
    state (so every call draws the same dropout masks and the caller's stream is untouched); with ``torch.compile``
    ignored (the original modules run eagerly: compiled graphs cannot be differentiated twice, and running them here
    would recompile or evict the training's graphs); with sparse embeddings producing dense gradients; and with the
    Python-level state of every submodule (``self.hidden``, counters, lists of outputs) restored after the call, so
    a stateful ``training_step`` is one fixed function.

    :meth:`replay` re-enters the context of the last call (the same tensors, flags and RNG state): autograd needs it
    when it recomputes a forward during backward (non-reentrant activation checkpointing), which would otherwise run
    on the module's own parameters, outside all of the above. :attr:`recomputes` says whether the last call
    checkpointed anything (re-entering costs about as much as a forward's Python overhead, so it is skipped when
    there is nothing to recompute).

    Args:
        module: the model; not modified.
        closure: computes the scalar loss from the module, e.g. ``lambda m: F.mse_loss(m(x), y)``.
        params: parameters to differentiate (default: all with ``requires_grad``).
        dtype: optional compute dtype; parameters and floating buffers are cast to it.
        mode: ``"eval"`` or ``"train"``.
        seed: seed of the forked RNG inside each call.
    """

    def __init__(
        self,
        module: nn.Module,
        closure: Callable[[nn.Module], Tensor],
        *,
        params: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        mode: Literal["eval", "train"] = "eval",
        seed: int = 0,
    ) -> None:
        from .isolation import ModuleState

        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be one of ('eval', 'train'), got {mode!r}.")
        if params is None:
            params = {k: p for k, p in module.named_parameters() if p.requires_grad}
        if len(params) == 0:
            raise ValueError(f"{type(module).__name__} has no trainable parameters (none with requires_grad=True).")
        self.module, self.closure, self.mode, self.dtype = module, closure, mode, dtype
        self.params = {k: p.detach() if dtype is None else p.detach().to(dtype) for k, p in params.items()}
        self._wrapper = _Closure(module)
        self._others: dict[str, Tensor] = {}
        for name, p in module.named_parameters():
            if name not in params:
                self._others["inner." + name] = p.detach()
        for name, b in module.named_buffers():
            self._others["inner." + name] = b.detach()
        self._cuda = [d for d in {p.device for p in self.params.values()} if d.type == "cuda"]
        self._cpu_state = torch.Generator().manual_seed(seed).get_state()
        self._seed = seed
        self._python_state = ModuleState(module)
        self._last: dict[str, Tensor] | None = None
        #: whether the last call ran non-reentrant activation checkpointing (its backward recomputes forward pieces)
        self.recomputes = False

    def _private(self, t: Tensor) -> Tensor:
        if self.dtype is not None and t.is_floating_point():
            return t.to(self.dtype, copy=True)
        return t.clone()

    def __call__(self, theta: dict[str, Tensor]) -> Tensor:
        state = {k: self._private(t) for k, t in self._others.items()}
        state.update({"inner." + k: v for k, v in theta.items()})
        self._last = state
        with _watch_checkpoints(self):
            return self._run(state, lambda: self.closure(self.module))

    def replay(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` inside the context of the last call (before the first call: as it is)."""
        return fn() if self._last is None else self._run(self._last, fn)

    def _run(self, state: dict[str, Tensor], thunk: Callable[[], Any]) -> Any:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=self._cuda))
            stack.enter_context(_mode(self.module, self.mode == "train"))
            stack.enter_context(_dense_embeddings(self.module))
            stack.enter_context(_eager())
            stack.enter_context(self._python_state.restoring())
            # the same stream on every call (same dropout masks); set_rng_state is far cheaper than manual_seed,
            # which also queues lazy seeding of every accelerator backend
            torch.set_rng_state(self._cpu_state)
            for d in self._cuda:
                with torch.cuda.device(d):
                    torch.cuda.manual_seed(self._seed)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*functional_call.*")
                return torch.func.functional_call(self._wrapper, state, (thunk,), strict=False, tie_weights=True)


def module_loss_fn(
    module: nn.Module,
    closure: Callable[[nn.Module], Tensor],
    *,
    params: Mapping[str, Tensor] | None = None,
    dtype: torch.dtype | None = None,
    mode: Literal["eval", "train"] = "eval",
    seed: int = 0,
) -> tuple[ModuleLoss, dict[str, Tensor]]:
    """Turn ``closure(module) -> loss`` into a pure function of a parameter dict, for :class:`HessianOperator`.

    See :class:`ModuleLoss` for what each call isolates.

    Returns:
        ``(loss_fn, params)`` ready for ``HessianOperator(loss_fn, params)``.
    """
    loss_fn = ModuleLoss(module, closure, params=params, dtype=dtype, mode=mode, seed=seed)
    return loss_fn, loss_fn.params


class ScaledOperator:
    """``D H D`` for a diagonal ``D = diag(d)``: e.g. the preconditioned Hessian ``P^{-1/2} H P^{-1/2}``.

    Its eigenvalues are those of ``P^{-1} H`` (similar matrices), the curvature an optimizer with diagonal
    preconditioner ``P`` actually sees (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability").

    Args:
        op: the symmetric operator ``H``.
        d: the flat diagonal ``d`` (length ``P``), e.g. ``P^{-1/2}``.
        add_diagonal: optional flat diagonal ``s`` added after scaling: ``D H D + diag(s)`` (e.g. coupled weight
            decay ``wd · d²``).
    """

    def __init__(self, op: CurvatureOperator, d: Tensor, add_diagonal: Tensor | None = None) -> None:
        if d.shape != (op.shape[0],):
            raise ValueError(f"d must have shape ({op.shape[0]},), got {tuple(d.shape)}.")
        self.op = op
        self.d = d.to(device=op.device, dtype=op.dtype)
        self.s = None if add_diagonal is None else add_diagonal.to(device=op.device, dtype=op.dtype)
        self.shape = op.shape
        self.dtype = op.dtype
        self.device = op.device
        self.space = getattr(op, "space", None)  # diagonal scaling keeps sharded vectors sharded

    def matvec(self, v: Tensor) -> Tensor:
        out = self.d * self.op.matvec(self.d * v)
        return out if self.s is None else out + self.s * v

    def matmat(self, V: Tensor) -> Tensor:
        out = self.d[:, None] * self.op.matmat(self.d[:, None] * V)
        return out if self.s is None else out + self.s[:, None] * V


class BlockOperator:
    """The diagonal block ``H[idx, idx]`` of an operator, for the coordinates in ``idx``.

    Args:
        op: the full operator.
        index: 1-D long tensor of coordinates (e.g. the parameters of one layer).
        space: for an operator on sharded vectors, the block's own
            :class:`~lightning_curvature.spaces.ShardedSpace` (the pieces of its parameters; ``index`` then holds
            this process's coordinates of them, possibly none).
    """

    def __init__(self, op: CurvatureOperator, index: Tensor, space: Any = None) -> None:
        self.op = op
        self.index = index.to(op.device)
        self.space = space
        n = int(index.numel())
        if n == 0 and (space is None or space.dim == 0):
            raise ValueError("A block needs at least one coordinate.")
        self.shape = (n, n)
        self.dtype = op.dtype
        self.device = op.device

    def matvec(self, v: Tensor) -> Tensor:
        full = torch.zeros(self.op.shape[0], dtype=self.dtype, device=self.device)
        full[self.index] = v
        return self.op.matvec(full)[self.index]

    def matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)


class GGNOperator(HessianOperator):
    r"""The generalised Gauss-Newton matrix ``G = Jᵀ H_out J`` of a loss ``ℓ(f(θ))``.

    ``J = ∂f/∂θ`` is the Jacobian of the network output and ``H_out = ∇²_f ℓ`` the Hessian of the loss with respect
    to the output (Schraudolph 2002, "Fast Curvature Matrix-Vector Products for Second-Order Gradient Descent";
    Martens 2020). ``G`` drops the term ``Σ (∂ℓ/∂f) ∇²f`` of the Hessian; it is positive semi-definite when ``ℓ`` is
    convex in ``f`` (mean squared error, cross-entropy), and equals ``H`` for a model linear in ``θ``.

    Each product is ``v ↦ Jᵀ (H_out (J v))``: ``J v`` by the double-vjp trick through the output graph, which is
    built once per operator (like the double-backward Hessian backend), ``H_out`` by autograd on the small output,
    ``Jᵀ`` by one more backward.

    Args:
        output_fn: maps the parameter dict to the network output (any shape).
        loss_of_output: maps that output to the scalar loss (e.g. ``lambda f: F.cross_entropy(f, y)``).
        params: the point ``θ``.
        dtype: compute dtype.
    """

    def __init__(
        self,
        output_fn: Callable[[dict[str, Tensor]], Tensor],
        loss_of_output: Callable[[Tensor], Tensor],
        params: Mapping[str, Tensor],
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(lambda p: loss_of_output(output_fn(p)), params, backend="double-backward", dtype=dtype)
        self.output_fn = output_fn
        self.loss_of_output = loss_of_output
        self._ggn: dict[str, Any] | None = None

    def release(self) -> None:
        super().release()
        self._ggn = None

    def _ensure_ggn(self) -> dict[str, Any]:
        if self._ggn is None:
            leaves = {k: p.detach().requires_grad_(True) for k, p in self.params.items()}
            with _second_order_context(self.device):
                out = self.output_fn(leaves)
                u = torch.zeros_like(out, requires_grad=True)
                ju = self._replay(lambda: torch.autograd.grad(out, list(leaves.values()), u, create_graph=True,
                                                              allow_unused=True))
                out_d = out.detach().requires_grad_(True)
                loss = self.loss_of_output(out_d)
                self._check_loss(loss)
                gl = torch.autograd.grad(loss, out_d, create_graph=True)[0]
            self._loss_value = float(loss.detach())
            live = [i for i, g in enumerate(ju) if g is not None and g.requires_grad]
            self._ggn = {"out": out, "u": u, "ju": [ju[i] for i in live], "live": live,
                         "leaves": list(leaves.values()), "out_d": out_d, "gl": gl}
        return self._ggn

    def gradient(self) -> Tensor:
        if self._gradient is None:
            c = self._ensure_ggn()
            with _second_order_context(self.device):
                g = self._replay(lambda: torch.autograd.grad(c["out"], c["leaves"], c["gl"].detach(), retain_graph=True,
                                                             allow_unused=True))
            self._gradient = self.flatten(list(g)).detach()
        return self._gradient

    def matvec(self, v: Tensor) -> Tensor:
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a flat vector of length {self.shape[0]}, got shape {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.dtype)
        c = self._ensure_ggn()
        self.num_matvecs += 1
        if not c["live"]:
            return torch.zeros_like(v)
        parts = self.unflatten(v)
        def product() -> tuple[Tensor | None, ...]:
            # J v: the vjp Jᵀu is linear in u, so its derivative along v with respect to u is J v
            jv = torch.autograd.grad(c["ju"], c["u"], [parts[self.names[i]] for i in c["live"]], retain_graph=True)[0]
            hjv = torch.autograd.grad(c["gl"], c["out_d"], jv, retain_graph=True)[0]
            return torch.autograd.grad(c["out"], c["leaves"], hjv, retain_graph=True, allow_unused=True)

        gv = self._replay(product)
        return self.flatten(list(gv)).detach()

    def _replay(self, fn: Callable[[], Any]) -> Any:
        return _replaying(self.output_fn, fn, self.device)

    def __repr__(self) -> str:
        return f"GGNOperator(P={self.shape[0]}, dtype={self.dtype})"


class DistributedOperator:
    """The mean over processes of per-process operators: ``H = (1/W) Σ_r H_r`` (data-parallel training).

    Under data parallelism (DDP) each process holds a shard of the batch and the gradient the optimizer uses is the
    mean of the per-process gradients; the Hessian of that training objective is the mean of the per-process
    Hessians, so every product is all-reduced (``torch.distributed``, sum then divide by the world size). Every
    process must call ``matvec`` with the same vector (same generator state) and in the same order, which the
    estimators guarantee when all processes run them with identically seeded generators: every branch they take
    depends only on all-reduced values. Averaging per-process eigenvalues instead would be wrong (only an upper
    bound on the eigenvalues of the mean, by convexity of ``λ_max``).

    Args:
        op: this process's operator (its own shard of the batch).
        group: the process group (default: the world).
    """

    def __init__(self, op: HessianOperator, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.op = op
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.shape = op.shape
        self.dtype = op.dtype
        self.device = op.device
        self._loss: float | None = None
        self._gradient: Tensor | None = None
        #: the first exception this process raised computing its share; it contributed NaN instead, so every process
        #: still takes part in every all-reduce (an exception here would leave the others waiting forever)
        self.local_error: BaseException | None = getattr(op, "local_error", None)

    def __getattr__(self, name: str) -> Any:  # names, numels, params, flatten, unflatten, release, num_matvecs
        return getattr(self.op, name)

    def _mean(self, t: Tensor) -> Tensor:
        t = t.clone()
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t / self.world_size

    def _local(self, fn: Callable[[], Tensor], shape: tuple[int, ...]) -> Tensor:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - reported through local_error after the collective
            if self.local_error is None:
                self.local_error = err
            return torch.full(shape, float("nan"), dtype=self.dtype, device=self.device)

    @property
    def loss(self) -> float:
        if self._loss is None:
            local = self._local(lambda: torch.tensor([self.op.loss], dtype=self.dtype, device=self.device), (1,))
            self._loss = float(self._mean(local.to(torch.float64)))
        return self._loss

    def gradient(self) -> Tensor:
        if self._gradient is None:
            self._gradient = self._mean(self._local(self.op.gradient, (self.shape[0],)))
        return self._gradient

    @property
    def loss_fn(self) -> Callable[[dict[str, Tensor]], Tensor]:
        """The loss of the whole (all-processes) batch as a function of the parameters: the mean of the local ones."""
        local = self.op.loss_fn

        def mean_loss(theta: dict[str, Tensor]) -> Tensor:
            value = self._local(lambda: local(theta).detach().reshape(1).to(self.dtype), (1,))
            return self._mean(value).reshape(())

        return mean_loss

    def matvec(self, v: Tensor) -> Tensor:
        return self._mean(self._local(lambda: self.op.matvec(v), (self.shape[0],)))

    def matmat(self, V: Tensor) -> Tensor:
        return self._mean(self._local(lambda: self.op.matmat(V), (self.shape[0], V.shape[1])))
