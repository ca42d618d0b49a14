"""Structured configs (schemas) for Hydra.

:class:`CurvatureMonitorConfig` mirrors :class:`~lightning_curvature.CurvatureMonitor`'s ``__init__`` argument for
argument (same names, types and defaults; a test pins them). Registered in Hydra's ``ConfigStore`` by
:func:`register_configs`, it is the schema of ``configs/callbacks/curvature.yaml``: a misspelt key or a value of the
wrong type then fails when the config is composed, before anything trains, e.g.::

    $ python examples/train.py callbacks.curvature.top_kk=3
    Could not override 'callbacks.curvature.top_kk'.
    Key 'top_kk' not in 'CurvatureMonitorConfig'

Range checks (``every_n_train_steps >= 1``, allowed strings, ...) stay in the callback's constructor.

Hydra is an optional dependency (``pip install 'lightning-curvature[examples]'``): it is imported only inside
:func:`register_configs`, and nothing else in the package imports this module. Neither does it import Lightning.
"""

from dataclasses import dataclass

__all__ = ["SCHEMA_GROUP", "CurvatureMonitorConfig", "register_configs"]

#: ConfigStore group holding the schemas; ``callbacks/curvature.yaml`` extends ``/schema/curvature``.
SCHEMA_GROUP = "schema"


@dataclass
class CurvatureMonitorConfig:
    """Schema of :class:`~lightning_curvature.CurvatureMonitor`: one field per ``__init__`` argument.

    See the callback's docstring for the meaning of each field. ``metrics``, ``modules`` and ``layer_metrics`` are
    ``Sequence[str]`` in the callback and ``tuple[str, ...]`` here (OmegaConf has no ``Sequence``); they compose to
    lists.
    """

    _target_: str = "lightning_curvature.CurvatureMonitor"
    every_n_train_steps: int = 100
    top_k: int = 1
    num_probes: int = 20
    trace_rtol: float | None = 0.05
    trace_estimator: str = "auto"
    eigen_solver: str = "lanczos"
    max_iter: int = 100
    tol: float = 1e-3
    data: str = "current"
    num_batches: int = 1
    mode: str = "eval"
    backend: str = "auto"
    dtype: str = "float32"
    distribution: str = "rademacher"
    warm_start: bool = True
    density_probes: int = 3
    density_steps: int = 30
    seed: int = 0
    metrics: tuple[str, ...] = ("trace", "eigenvalues", "eos", "grad_curvature")
    modules: tuple[str, ...] | None = None
    module_depth: int | None = None
    layer_metrics: tuple[str, ...] = ("trace",)
    curvature: str = "hessian"
    ggn_loss: str = "cross_entropy"
    log_prefix: str = "curvature/"


def register_configs() -> None:
    """Store the schemas in Hydra's ``ConfigStore`` (idempotent).

    After this, a config can extend ``/schema/curvature`` in its defaults list::

        # configs/callbacks/curvature.yaml (package `callbacks`)
        defaults:
          - /schema/curvature@curvature
          - _self_
        curvature:
          every_n_train_steps: 10

    Raises:
        ImportError: when hydra-core is not installed.
    """
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The Hydra configs need hydra-core: pip install 'lightning-curvature[examples]'."
        ) from err
    ConfigStore.instance().store(group=SCHEMA_GROUP, name="curvature", node=CurvatureMonitorConfig)
