"""Train a Hydra-configured digits classifier with CurvatureMonitor and log loss and curvature to TensorBoard.

    python examples/train.py                                     # the default run (under 2 minutes on 2 CPU cores)
    python examples/train.py callbacks.curvature.top_k=5 model.lr=0.05
    python examples/train.py experiment=fullbatch_gd             # full-batch GD: sharpness against 2/lr
    python examples/train.py -m experiment=fullbatch_gd model.lr=0.2,0.4,0.8    # a sweep, one run per lr
    python examples/train.py --cfg job                           # print the composed config and exit

Configs live in ``configs/`` (one folder per group). Single runs write to ``outputs/<date>/<time>/``, sweeps to
``multirun/<date>/<time>/<job number>/``. ``HYDRA_FULL_ERROR=1`` shows full tracebacks for config errors.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_curvature.config import register_configs

register_configs()


def _fail(key: str, err: BaseException) -> NoReturn:
    """Report a construction error as one line and exit non-zero (full traceback with ``HYDRA_FULL_ERROR=1``)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ is not None else err
    reason = " ".join(str(cause).split()) or type(cause).__name__
    print(f"error: {key}: {reason}", file=sys.stderr)
    sys.exit(1)


def _build(key: str, node: Any) -> Any:
    try:
        return instantiate(node, _convert_="all")
    except Exception as err:  # any constructor error is a config error
        _fail(key, err)


def _nodes(cfg: DictConfig, group: str) -> dict[str, Any]:
    """The ``_target_`` nodes of a dict-valued group (``callbacks``, ``logger``), missing or null meaning none."""
    node = cfg.get(group)
    if not node:
        return {}
    return {f"{group}.{name}": c for name, c in node.items() if c is not None and "_target_" in c}


def _display(path: str) -> str:
    """``path`` relative to the working directory when it lies below it, else as given (without a trailing /)."""
    path = os.path.normpath(path)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    import lightning
    from lightning.pytorch.loggers import TensorBoardLogger

    # Hydra's logging (console and <run dir>/train.log) already prints Lightning's messages; drop the duplicate.
    for handler in list(logging.getLogger("lightning").handlers):
        logging.getLogger("lightning").removeHandler(handler)

    from lightning_curvature import CurvatureMonitor

    if cfg.get("torch_threads"):
        import torch

        torch.set_num_threads(int(cfg.torch_threads))
    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = _build("data", cfg.data)
    model = _build("model", cfg.model)
    callbacks = [_build(key, node) for key, node in _nodes(cfg, "callbacks").items()]
    loggers = [_build(key, node) for key, node in _nodes(cfg, "logger").items()]
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except Exception as err:
        _fail("trainer", err)

    trainer.fit(model, datamodule=datamodule)

    hc = HydraConfig.get()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    prefix = next((cb.log_prefix for cb in callbacks if isinstance(cb, CurvatureMonitor)), "curvature/")
    keys = ["train/loss", "val/acc"] + [prefix + k for k in ("eig_1", "trace", "stability_threshold", "eos_ratio")]
    summary = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    if summary:
        print("final: " + "  ".join(summary))
    for logger in trainer.loggers:
        print(f"{type(logger).__name__} logs: {_display(logger.log_dir)}")
    root = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir
    if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        print(f"view them with:  tensorboard --logdir {_display(root)}")
        print(f"or plot them:    lightning-curvature plot {_display(root)} -o curves.png")


if __name__ == "__main__":
    main()
