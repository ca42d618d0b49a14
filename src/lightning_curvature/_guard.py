"""Keep an estimate invisible to training: snapshot and restore everything a forward pass could touch.

Plain torch (torchmetrics optional). Used by the callback around each estimate.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

try:  # numpy is a torch dependency in practice, but not a hard one
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


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


def _metric_states(module: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Snapshots of every torchmetrics ``Metric`` inside ``module`` (a training_step may update them)."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover
        return []
    out = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {name: copy.deepcopy(getattr(m, name)) for name in m._defaults}
            state["_update_count"] = m._update_count
            state["_computed"] = copy.deepcopy(m._computed)
            out.append((m, state))
    return out


@contextlib.contextmanager
def training_state_guard(module: nn.Module, *, silence: tuple[str, ...] = ("log", "log_dict")) -> Iterator[None]:
    """Leave ``module`` exactly as it was: train/eval flags, buffers, ``.grad``, metric states and RNG streams.

    Also replaces the methods named in ``silence`` (Lightning's ``self.log``/``self.log_dict``) by no-ops for the
    duration, so a ``training_step`` re-run for a curvature estimate logs nothing.
    """
    flags = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    metrics = _metric_states(module)
    devices = list({p.device for p in module.parameters()})
    patched = [name for name in silence if hasattr(module, name)]
    for name in patched:
        object.__setattr__(module, name, _noop)
    try:
        with rng_guard(devices), torch.no_grad():
            yield
    finally:
        for name in patched:
            object.__delattr__(module, name)
        for m, flag in flags:
            m.training = flag
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if not torch.equal(b, saved):
                    b.copy_(saved)
        for m, state in metrics:
            for name, value in state.items():
                setattr(m, name, value)
