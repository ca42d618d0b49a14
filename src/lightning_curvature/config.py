"""Structured configs (schemas) for Hydra.

:class:`CurvatureMonitorConfig` is derived from :class:`~lightning_curvature.options.MonitorOptions`, the one source of
truth of the callback's options (a test pins the callback's signature to it). Registered in Hydra's ``ConfigStore`` by
:func:`register_configs`, it is the schema of ``configs/callbacks/curvature.yaml``: a misspelt key or a value of the
wrong type then fails when the config is composed, before anything trains, e.g.::

    $ python examples/train.py callbacks.curvature.top_kk=3
    Could not override 'callbacks.curvature.top_kk'.
    Key 'top_kk' not in 'CurvatureMonitorConfig'

Range checks (``every_n_train_steps >= 1``, allowed strings, ...) stay in the callback's constructor.

Hydra is an optional dependency (``pip install 'lightning-curvature[examples]'``): it is imported only inside
:func:`register_configs`, and nothing else in the package imports this module. Neither does it import Lightning.
"""

import dataclasses
import typing
from typing import Any

from .options import MonitorOptions

__all__ = ["SCHEMA_GROUP", "CurvatureMonitorConfig", "register_configs"]

#: ConfigStore group holding the schemas; ``callbacks/curvature.yaml`` extends ``/schema/curvature``.
SCHEMA_GROUP = "schema"


def _schema() -> type:
    """``CurvatureMonitorConfig``: ``_target_`` plus the fields of ``MonitorOptions``.

    Same names, types and defaults, in the same order; derived, so the two cannot drift apart.
    """
    target = dataclasses.field(default="lightning_curvature.CurvatureMonitor")
    fields: list[tuple[str, Any, Any]] = [("_target_", str, target)]
    hints = typing.get_type_hints(MonitorOptions)
    for f in dataclasses.fields(MonitorOptions):
        fields.append((f.name, hints[f.name], dataclasses.field(default=f.default)))
    cls = dataclasses.make_dataclass("CurvatureMonitorConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = (
        "Schema of :class:`~lightning_curvature.CurvatureMonitor`: one field per ``__init__`` argument, derived from "
        ":class:`~lightning_curvature.options.MonitorOptions`. ``metrics``, ``modules`` and ``layer_metrics`` are "
        "``tuple[str, ...]`` here (OmegaConf has no ``Sequence``); they compose to lists."
    )
    return cls


CurvatureMonitorConfig = _schema()


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
