"""lightning-curvature: Hessian curvature of the training loss, logged next to it while Lightning trains.

The math layers (:mod:`~lightning_curvature.operators`, :mod:`~lightning_curvature.estimators`) are plain torch;
:class:`CurvatureMonitor` (which imports Lightning) is loaded on first access, so
``from lightning_curvature import HessianOperator, hutchinson_trace`` never imports Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .estimators import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    block_hutchinson_traces,
    deflated_hutchinson_trace,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    random_probes,
    spectral_density,
)
from .isolation import ErrorBoundary, ModuleState, isolated
from .operators import (
    BlockOperator,
    DenseOperator,
    GGNOperator,
    HessianOperator,
    HVPUnsupportedError,
    ScaledOperator,
    as_operator,
    module_loss_fn,
)
from .options import MonitorOptions
from .plan import MeasurementPlan

if TYPE_CHECKING:
    from .callback import CurvatureMonitor

__version__ = "0.1.0"

__all__ = [
    "BlockOperator",
    "CurvatureMonitor",
    "DenseOperator",
    "EigenResult",
    "ErrorBoundary",
    "MeasurementPlan",
    "ModuleState",
    "MonitorOptions",
    "GGNOperator",
    "SpectralDensity",
    "HVPUnsupportedError",
    "HessianOperator",
    "ScaledOperator",
    "TraceResult",
    "as_operator",
    "block_hutchinson_traces",
    "deflated_hutchinson_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "isolated",
    "lanczos",
    "module_loss_fn",
    "power_iteration",
    "random_probes",
    "spectral_density",
]


def __getattr__(name: str) -> Any:
    if name == "CurvatureMonitor":
        from .callback import CurvatureMonitor

        return CurvatureMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
