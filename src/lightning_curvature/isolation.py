"""Leave no trace: everything that makes re-running user code invisible to training, and the one error boundary.

Plain torch (no Lightning). Three pieces:

* :func:`rng_guard`: the torch (CPU and CUDA), Python and NumPy random streams are restored on exit.
* :class:`ModuleState`: a snapshot of the *Python-level* state of every submodule (attributes that are not
  parameters, buffers or submodules: ``self.hidden``, counters, lists of step outputs, dicts), restored in place
  (containers keep their identity, their contents come back). With ``tensors=True`` it also keeps copies of every
  parameter, buffer and plain tensor attribute and writes back those whose version counter moved (an in-place write
  through any reference, e.g. an EMA teacher updated under ``no_grad``).
* :func:`isolated`: the context an estimate runs in: the above, plus train/eval flags, ``.grad``, silenced
  ``self.log``/``self.log_dict``, and ``torch.no_grad``.
* :class:`ErrorBoundary`: nothing raised by an estimate reaches the training loop. Causes that will recur (an op
  without second derivatives) switch the monitor off with one warning; transient ones (non-finite values, an exception
  on one batch, out of memory) skip that estimate with one warning per streak of failures.
"""

from __future__ import annotations

import collections
import contextlib
import random
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

try:  # numpy is a torch dependency in practice, but not a hard one
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["ErrorBoundary", "ModuleState", "NonFiniteError", "isolated", "rng_guard"]

T = TypeVar("T")


class NonFiniteError(ArithmeticError):
    """A loss, product or estimate came out NaN or infinite: the estimate is skipped (a transient cause)."""


@contextlib.contextmanager
def rng_guard(devices: list[torch.device] | None = None) -> Iterator[None]:
    """Restore the torch (CPU and the given CUDA devices), Python and NumPy RNG states on exit."""
    cuda = [d for d in (devices or []) if d.type == "cuda"]
    py_state = random.getstate()
    np_state = np.random.get_state() if np is not None else None
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py_state)
            if np is not None:
                np.random.set_state(np_state)


# ---------------------------------------------------------------------------------------------------- module state
_CONTAINERS = (list, dict, set, collections.deque, bytearray)
_MAX_DEPTH = 4


def _snapshot(obj: Any, memo: dict[int, Any], depth: int = 0) -> list[tuple[Any, list[Any]]]:
    """``[(container, its contents)]`` for ``obj`` and the containers nested in it (to ``_MAX_DEPTH`` levels)."""
    if not isinstance(obj, _CONTAINERS) or id(obj) in memo or depth > _MAX_DEPTH:
        return []
    contents: list[Any] = list(obj.items()) if isinstance(obj, dict) else list(obj)
    memo[id(obj)] = obj
    out = [(obj, contents)]
    for item in contents:
        for child in (item if isinstance(obj, dict) else (item,)):
            out += _snapshot(child, memo, depth + 1)
    return out


def _restore_contents(obj: Any, saved: list[Any]) -> None:
    if isinstance(obj, dict):
        items = list(obj.items())
        if len(items) != len(saved) or any(a is not c or b is not d for (a, b), (c, d) in zip(items, saved)):
            obj.clear()
            obj.update(saved)
    elif isinstance(obj, list):
        if len(obj) != len(saved) or any(a is not b for a, b in zip(obj, saved)):
            obj[:] = saved
    elif isinstance(obj, set):
        obj.clear()
        obj.update(saved)
    else:  # deque, bytearray
        obj.clear()
        obj.extend(saved)


class ModuleState:
    """The Python-level state of every submodule of ``module``, restorable in place.

    For each submodule, its ``__dict__`` entries are recorded by reference, and the contents of mutable containers
    (``list``, ``dict``, ``set``, ``deque``; ``_parameters``/``_buffers``/``_modules`` included), and of the containers
    nested in them (``self.history["loss"]``, four levels deep), are copied. :meth:`restore` removes attributes added
    since, puts replaced ones back, and refills containers in place (so other references to them see the old contents
    again). Other objects are kept by reference (a list of tensors is restored as the same tensors); the internal
    state of arbitrary user objects held in attributes is not tracked.

    Args:
        module: the root module.
        tensors: also copy every parameter, buffer and plain tensor attribute, and on :meth:`restore` write back the
            values of those whose version counter moved (an in-place write). Costs one copy of the module's tensors.

    FSDP1's wrappers (``FullyShardedDataParallel``) are left out, the modules they wrap are not: their attributes are
    the strategy's bookkeeping (lazy initialisation, training state, unshard flags), which a forward and backward
    leave consistent, and which must not be rolled back to a state from before the first forward.
    """

    def __init__(self, module: nn.Module, *, tensors: bool = False) -> None:
        self._modules = [m for m in module.modules() if type(m).__name__ != "FullyShardedDataParallel"]
        self._dicts: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._containers: list[tuple[Any, list[Any]]] = []
        memo: dict[int, Any] = {}
        for m in self._modules:
            d = m.__dict__
            self._dicts.append((d, dict(d)))
            for v in d.values():
                self._containers += _snapshot(v, memo)
        self._tensors: list[tuple[Tensor, int, Tensor]] = []
        if tensors:
            seen: set[int] = set()
            for m in self._modules:
                candidates = [*m._parameters.values(), *m._buffers.values(),
                              *(v for v in m.__dict__.values() if isinstance(v, Tensor))]
                for t in candidates:
                    if t is None or id(t) in seen or t.is_sparse:
                        continue
                    seen.add(id(t))
                    self._tensors.append((t, t._version, t.detach().clone()))

    def restore(self) -> None:
        """Put every recorded attribute, container content and (with ``tensors``) tensor value back."""
        for d, refs in self._dicts:
            for k in [k for k in d if k not in refs]:
                del d[k]
            for k, v in refs.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
        for container, saved in self._containers:
            _restore_contents(container, saved)
        if self._tensors:
            with torch.no_grad():
                for t, version, saved in self._tensors:
                    if t._version != version:
                        t.copy_(saved)

    def changed_tensors(self) -> int:
        """How many recorded tensors were written in place since the snapshot."""
        return sum(t._version != version for t, version, _ in self._tensors)

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Restore on exit, whatever happened inside."""
        try:
            yield
        finally:
            self.restore()


_MISSING = object()


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def isolated(module: nn.Module, *, silence: tuple[str, ...] = ("log", "log_dict")) -> Iterator[None]:
    """Run the body so that ``module`` and the process look untouched afterwards.

    Restored on exit: train/eval flags, every parameter's ``.grad`` (the same tensor objects), the values of
    parameters, buffers and plain tensor attributes written in place, the Python-level state of every submodule
    (:class:`ModuleState`), and the torch/CUDA/Python/NumPy RNG streams. The methods named in ``silence``
    (Lightning's ``self.log``/``self.log_dict``) are no-ops inside, so a re-run ``training_step`` logs nothing. The
    body runs under ``torch.no_grad`` (code that needs gradients enables them itself).
    """
    flags = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    state = ModuleState(module, tensors=True)
    devices = list({p.device for p in module.parameters()})
    patched = [name for name in silence if hasattr(module, name)]
    for name in patched:
        object.__setattr__(module, name, _noop)
    try:
        with rng_guard(devices), torch.no_grad():
            yield
    finally:
        for name in patched:
            module.__dict__.pop(name, None)
        state.restore()
        for m, flag in flags:
            m.training = flag
        for p, g in grads:
            if p.grad is not g:
                p.grad = g


# ---------------------------------------------------------------------------------------------------- error boundary
class ErrorBoundary:
    """The one place an estimate's exceptions are caught and turned into warnings, never into a failed ``fit``.

    * **Recurring causes** (``recurring`` exception types: an op without second derivatives, a model no backend can
      differentiate twice): the monitor is switched off (:attr:`disabled`) with one warning.
    * **Transient causes** (anything else: non-finite values, an exception raised on one batch, out of memory): that
      estimate is skipped with a warning naming the cause and what to do. The same cause warns once per streak of
      failures: a later successful estimate re-arms it, so a cause that comes back is reported again.

    ``KeyboardInterrupt`` and ``SystemExit`` are not caught.

    Args:
        name: who speaks in the warnings.
        recurring: exception types that switch the monitor off.
        warn: called with each message (default: ``warnings.warn(message, RuntimeWarning)``).
    """

    def __init__(
        self,
        name: str = "CurvatureMonitor",
        recurring: tuple[type[BaseException], ...] = (),
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.recurring = recurring
        self.warn = warn or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=4))
        self.disabled = False
        self.num_skipped = 0
        self._streak: set[str] = set()

    def run(self, fn: Callable[[], T], *, rearm: bool = True, hint: str = "") -> T | None:
        """Return ``fn()``, or ``None`` after a caught exception (see the class docstring).

        Args:
            fn: the work.
            rearm: whether a success ends the current streak of failures (true for estimates; false for bookkeeping
                around them, which says nothing about whether the cause is gone).
            hint: appended to the warning.
        """
        if self.disabled:
            return None
        try:
            out = fn()
        except Exception as err:  # noqa: BLE001 - this is the boundary: nothing may reach fit
            self.handle(err, hint)
            return None
        if rearm:
            self._streak.clear()
        return out

    def handle(self, err: BaseException, hint: str = "") -> None:
        """Classify ``err`` and warn (see the class docstring)."""
        if isinstance(err, self.recurring):
            self.disabled = True
            self.warn(f"{self.name} switched off for the rest of the run: {err}")
            return
        self.num_skipped += 1
        if isinstance(err, torch.OutOfMemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            key, message = "oom", (
                f"{self.name} skipped an estimate: out of memory ({err}). Training continues; lower `top_k`, "
                "`max_iter` or `num_batches`, or estimate less often."
            )
        elif isinstance(err, NonFiniteError):
            key, message = "nonfinite", f"{self.name} skipped an estimate: {err} Estimates resume once it is finite."
        else:
            key = f"{type(err).__name__}: {err}"
            where = _user_frame(err)
            message = (
                f"{self.name} skipped an estimate: {type(err).__name__}: {err}{where}. Training continues; the "
                "next estimate tries again."
            )
        if hint:
            message += " " + hint
        if key not in self._streak:
            self._streak.add(key)
            self.warn(message)


def _user_frame(err: BaseException) -> str:
    """`` (raised at file:line)``: the innermost frame of user code, else of this package, outside torch/Lightning."""
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename.replace("\\", "/") and "/lightning/" not in f.filename.replace("\\", "/")]
    user = [f for f in frames if "/lightning_curvature/" not in f.filename.replace("\\", "/")]
    frame = (user or frames or [None])[-1]
    return "" if frame is None else f" (raised at {frame.filename}:{frame.lineno})"
