"""Train a Hydra-configured digits classifier with CurvatureMonitor and log loss and curvature to TensorBoard.

    python examples/train.py                                     # the default run (under 2 minutes on 2 CPU cores)
    python examples/train.py callbacks.curvature.top_k=5 model.lr=0.05
    python examples/train.py experiment=fullbatch_gd             # full-batch GD: sharpness against 2/lr
    python examples/train.py -m experiment=fullbatch_gd model.lr=0.05,0.1,0.2   # a sweep, one run per lr
    python examples/train.py --cfg job                           # print the composed config and exit

Configs live in ``configs/`` (one folder per group). Single runs write to ``outputs/<date>/<time>/``, sweeps to
``multirun/<date>/<time>/<job number>/``. ``HYDRA_FULL_ERROR=1`` shows full tracebacks for config errors.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_curvature.config import register_configs

register_configs()


def _fail(key: str, err: BaseException) -> None:
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


def _eos_threshold_callback() -> Any:
    from lightning.pytorch.callbacks import Callback

    class EoSThreshold(Callback):
        """Log ``eos/two_over_lr`` = 2 / lr, gradient descent's stability threshold, at the first and last step."""

        def _log(self, trainer: Any) -> None:
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics({"eos/two_over_lr": 2.0 / lr}, step=step)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._log(trainer)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self._log(trainer)

    return EoSThreshold()


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    import lightning

    from lightning_curvature import CurvatureMonitor
    from lightning_curvature.tensorboard import custom_scalars_layout, write_layout

    lightning.seed_everything(cfg.seed, workers=True)
    datamodule = _build("data", cfg.data)
    model = _build("model", cfg.model)
    callbacks = [_build(key, node) for key, node in _nodes(cfg, "callbacks").items()]
    if cfg.get("eos_threshold"):
        callbacks.append(_eos_threshold_callback())
    loggers = [_build(key, node) for key, node in _nodes(cfg, "logger").items()]
    try:
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except Exception as err:
        _fail("trainer", err)

    extra = ["eos/two_over_lr"] if cfg.get("eos_threshold") else []
    for cb in callbacks:
        if isinstance(cb, CurvatureMonitor):
            layout = custom_scalars_layout(cb.log_prefix, cb.top_k, ["train/loss"], extra_tags=extra)
            for logger in trainer.loggers:
                write_layout(logger, layout)
            break

    trainer.fit(model, datamodule=datamodule)

    hc = HydraConfig.get()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = [f"{k}={metrics[k]:.4g}" for k in ("train/loss", "val/acc", "curvature/eig_1", "curvature/trace")
               if k in metrics]
    if cfg.get("eos_threshold") and getattr(model, "lr", 0) > 0:
        summary.append(f"2/lr={2.0 / model.lr:.4g}")
    if summary:
        print("final: " + "  ".join(summary))
    for logger in trainer.loggers:
        print(f"{type(logger).__name__} logs: {_display(logger.log_dir)}")
    root = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir
    if any(type(lg).__name__ == "TensorBoardLogger" for lg in trainer.loggers):
        print(f"view them with:  tensorboard --logdir {_display(root)}")
        print(f"or plot them:    lightning-curvature plot {_display(root)} -o curves.png")


if __name__ == "__main__":
    main()
