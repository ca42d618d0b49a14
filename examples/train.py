"""Train a Hydra-configured digits classifier with CurvatureMonitor and log loss and curvature to TensorBoard.

    python examples/train.py                                     # the default run (under 2 minutes on 2 CPU cores)
    python examples/train.py callbacks.curvature.top_k=5 model.lr=0.05
    python examples/train.py experiment=fullbatch_gd             # full-batch GD: sharpness against 2/lr
    python examples/train.py -m experiment=fullbatch_gd model.lr=0.2,0.4,0.8    # a sweep, one run per lr
    python examples/train.py -m hydra/sweeper=lr_search          # Optuna over the lr (pip install hydra-optuna-sweeper)
    python examples/train.py --cfg job                           # print the composed config and exit

Configs live in ``configs/`` (one folder per group). Single runs write to ``outputs/<date>/<time>/``, sweeps to
``multirun/<date>/<time>/<job number>/``. TensorBoard runs are named by :func:`run_name` (``run_name: auto`` in
``configs/train.yaml``: short, filesystem-safe, the overrides that differ between the jobs of a sweep first); the full
overrides are in the run's ``hparams.yaml``, in TensorBoard's *Text* tab and in ``.hydra/overrides.yaml``.

``main`` returns the final value of the ``objective`` key (default ``val/loss``), so Hydra sweepers that optimise
(Optuna) can minimise it. Configuration errors (bad overrides, constructor arguments, and ``ValueError``/``TypeError``
raised by a callback while the run is being set up) are reported as one line; ``HYDRA_FULL_ERROR=1`` shows the full
traceback.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shlex
import shutil
import sys
import traceback
import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_curvature.config import register_configs

register_configs()

#: Longest TensorBoard run folder name :func:`run_name` makes (file systems allow 255 bytes per path component).
MAX_RUN_NAME = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]+")
_LONG_FLOAT = re.compile(r"-?\d*\.\d{6,}(?:[eE][-+]?\d+)?")  # six or more decimals, e.g. from Optuna
# Callback hooks that run before the first training step: errors raised there are configuration errors.
_SETUP_HOOKS = frozenset({"setup", "on_fit_start", "on_train_start", "on_sanity_check_start"})
# Environment set by scripts/train.sh: where the user's shell is, and the folder of the wrapper scripts.
_ENV_CWD = "LIGHTNING_CURVATURE_CWD"
_ENV_SCRIPTS = "LIGHTNING_CURVATURE_SCRIPTS"


# ---------------------------------------------------------------------------------------------------- run names
def override_key(override: str) -> str:
    """The config key an override sets: ``"+trainer.x=1"`` -> ``"trainer.x"``, ``"~callbacks"`` -> ``"callbacks"``."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def _short_floats(override: str) -> str:
    """``key=0.18066694308916498`` (a sampler's value) -> ``key=0.1807``; other overrides unchanged."""
    key, sep, value = override.partition("=")
    if sep and _LONG_FLOAT.fullmatch(value):
        return f"{key}={float(value):.4g}"
    return override


def run_name(overrides: Sequence[str], varying: Collection[str] = (), max_len: int = MAX_RUN_NAME) -> str:
    """A short, filesystem-safe folder name for a job's overrides (the TensorBoard run name).

    The overrides of keys in ``varying`` (those a sweep changes) come first, the others keep their command-line
    order; they are joined with ``,``; floats with six or more decimals (a sampler's values) are shown with four
    significant digits. Characters other than letters, digits and ``._,=+-`` (``/``, quotes,
    brackets, spaces, ``~``, non-ASCII) become ``_``. A longer name than ``max_len`` keeps the overrides that fit
    (cut inside the first one if it alone is too long) and ends with ``__`` and 8 hex digits of a hash of all
    overrides, so different override sets keep different names.

    Example:
        >>> run_name(["trainer.max_steps=6", "model.lr=0.4", "callbacks.curvature.log_prefix=hessian/"], {"model.lr"})
        'model.lr=0.4,trainer.max_steps=6,callbacks.curvature.log_prefix=hessian_'
        >>> run_name([f"callbacks.curvature.option_{i}=value_{i}" for i in range(20)])
        'callbacks.curvature.option_0=value_0__c276765e'
        >>> run_name([])
        ''
    """
    if max_len < 16:
        raise ValueError(f"max_len must be >= 16, got {max_len}.")
    ordered = sorted(overrides, key=lambda o: override_key(o) not in varying)  # stable: command-line order kept
    text = ",".join(ordered)
    name = _UNSAFE.sub("_", ",".join(_short_floats(o) for o in ordered)).lstrip(".-")
    if len(name) > max_len:
        digest = hashlib.sha1(text.encode()).hexdigest()[:8]
        head = name[: max_len - 10 + 1]  # + 1: a comma right after the last override that fits
        head = head[: head.rfind(",")] if "," in head else head[:-1]
        name = head + "__" + digest
    return name


def _sweep_keys(hc: Any) -> set[str]:
    """The keys a multirun varies: sweep overrides on the command line and the sweeper's ``params``."""
    if hc.mode != RunMode.MULTIRUN:
        return set()
    keys = {override_key(str(k)) for k in (OmegaConf.select(hc, "sweeper.params", default=None) or {})}
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in sys.argv[1:]:
        try:
            override = parser.parse_override(arg)
        except Exception:  # flags (-m, --config-name ...) and their values
            continue
        if override.is_sweep_override():
            keys.add(override_key(override.key_or_group))
    return keys


def _job_overrides(hc: Any) -> list[str]:
    """The job's task overrides without the keys Hydra's ``override_dirname`` is told to exclude."""
    exclude = set(OmegaConf.select(hc, "job.config.override_dirname.exclude_keys", default=None) or ())
    return [o for o in hc.overrides.task if override_key(o) not in exclude]


def job_run_name(cfg: DictConfig, hc: Any) -> str:
    """The TensorBoard run name of this job: ``cfg.run_name`` sanitised, or with ``auto`` :func:`run_name`."""
    requested = str(cfg.get("run_name", "auto") or "")
    if requested != "auto":
        return run_name([requested]) if requested else ""
    overrides = [o for o in _job_overrides(hc) if override_key(o) != "run_name"]
    return run_name(overrides, _sweep_keys(hc))


# ---------------------------------------------------------------------------------------------------- errors
def _fail(key: str, err: BaseException) -> NoReturn:
    """Report a configuration error as one line and exit non-zero (full traceback with ``HYDRA_FULL_ERROR=1``)."""
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


def setup_error_source(err: BaseException, callbacks: dict[str, Any]) -> str | None:
    """The config key of the callback whose set-up hook raised ``err``, if it is a configuration error.

    A ``ValueError`` or ``TypeError`` whose traceback passes through a set-up hook (``setup``, ``on_fit_start``,
    ``on_train_start``, ``on_sanity_check_start``) of one of ``callbacks`` (config key -> instance) is a request
    the run cannot satisfy (e.g. an unknown module name); anything else is a bug and keeps its traceback.
    """
    if not isinstance(err, (ValueError, TypeError)):
        return None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        if frame.f_code.co_name in _SETUP_HOOKS:
            owner = frame.f_locals.get("self")
            for key, callback in callbacks.items():
                if owner is callback:
                    return key
    return None


# ---------------------------------------------------------------------------------------------------- objective
def _validation_tracker() -> Any:
    """A callback whose ``step`` is the global step of the last validation outside the sanity check (or ``None``)."""
    from lightning.pytorch.callbacks import Callback

    class LastValidation(Callback):
        step: int | None = None

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                self.step = trainer.global_step

    return LastValidation()


def objective_value(metrics: dict[str, float], key: str) -> float:
    """``metrics[key]``, or a ``KeyError`` whose message names the logged keys."""
    if key not in metrics:
        logged = ", ".join(sorted(metrics)) or "none"
        raise KeyError(f"{key!r} was not logged; logged keys: {logged}")
    return metrics[key]


# ---------------------------------------------------------------------------------------------------- printing
def _display(path: str | os.PathLike[str], base: str | None = None) -> str:
    """``path`` relative to ``base`` (default: the working directory) when it lies below it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, base or os.getcwd())
    return path if rel.startswith("..") else rel


def _executable(path: str | os.PathLike[str], user_cwd: str | None) -> str:
    """``path`` as the user's shell runs it: relative to ``user_cwd`` when below it (``./x`` rather than ``x``)."""
    shown = _display(path, user_cwd)
    return shlex.quote(shown if os.sep in shown else os.path.join(".", shown))


def command(name: str, module: str, user_cwd: str | None = None) -> str:
    """How the user's shell runs this Python environment's console script ``name``.

    ``name`` itself when the shell's ``PATH`` finds this environment's script (e.g. an activated venv); else the
    script's path (``.venv/bin/tensorboard``), or ``python -m module`` with this interpreter's path.
    Under ``scripts/train.sh`` (which activates the venv only for itself): ``scripts/<name>.sh``.
    """
    scripts = os.environ.get(_ENV_SCRIPTS)
    if scripts:
        wrapper = Path(scripts) / {"lightning-curvature": "plot.sh"}.get(name, f"{name}.sh")
        if wrapper.is_file():
            return _executable(wrapper, user_cwd)
    bindir = Path(sys.executable).parent
    script = bindir / name
    found = shutil.which(name)
    if script.is_file():
        if found and os.path.samefile(found, script):
            return name
        return _executable(script, user_cwd)
    return f"{_executable(sys.executable, user_cwd)} -m {module}"


def _print_commands(root: str) -> None:
    user_cwd = os.environ.get(_ENV_CWD) or None
    logdir = shlex.quote(_display(root, user_cwd))
    plot = command("lightning-curvature", "lightning_curvature.cli", user_cwd)
    if os.environ.get(_ENV_SCRIPTS):  # plot.sh runs `lightning-curvature plot`
        plot_cmd = f"{plot} {logdir} -o curves.png"
    else:
        plot_cmd = f"{plot} plot {logdir} -o curves.png"
    print(f"view them with:  {command('tensorboard', 'tensorboard.main', user_cwd)} --logdir {logdir}")
    print(f"or plot them:    {plot_cmd}")


def _log_overrides(loggers: Sequence[Any], overrides: Sequence[str]) -> None:
    """Put the job's full overrides in every logger's hparams, and the command in TensorBoard's Text tab."""
    from lightning.pytorch.loggers import TensorBoardLogger

    cmd = " ".join(["python", "examples/train.py", *(shlex.quote(o) for o in overrides)])
    for logger in loggers:
        logger.log_hyperparams({"overrides": list(overrides)})
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("run/command", f"    {cmd}")  # indented: a code block in Markdown


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v.numel() == 1}


# ---------------------------------------------------------------------------------------------------- main
@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
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
    hc = HydraConfig.get()
    cfg.run_name = job_run_name(cfg, hc)  # ${run_name} in configs/logger/tensorboard.yaml
    datamodule = _build("data", cfg.data)
    model = _build("model", cfg.model)
    callbacks = {key: _build(key, node) for key, node in _nodes(cfg, "callbacks").items()}
    loggers = [_build(key, node) for key, node in _nodes(cfg, "logger").items()]
    last_validation = _validation_tracker()
    try:
        trainer = instantiate(cfg.trainer, callbacks=[*callbacks.values(), last_validation], logger=loggers or False)
    except Exception as err:
        _fail("trainer", err)
    _log_overrides(trainer.loggers, list(hc.overrides.task))

    try:
        trainer.fit(model, datamodule=datamodule)
    except Exception as err:
        key = setup_error_source(err, callbacks)
        if key is None:
            raise
        _fail(key, err)

    metrics = _scalars(trainer.callback_metrics)
    objective = cfg.get("objective")
    if objective and objective.startswith("val") and last_validation.step != trainer.global_step:
        trainer.validate(model, datamodule=datamodule, verbose=False)  # the objective at the final weights
        metrics.update(_scalars(trainer.callback_metrics))
    prefix = next((cb.log_prefix for cb in callbacks.values() if isinstance(cb, CurvatureMonitor)), "curvature/")
    keys = ["train/loss", "val/acc"] + [prefix + k for k in ("eig_1", "trace", "stability_threshold", "eos_ratio")]
    summary = [f"{k}={metrics[k]:.4g}" for k in keys if k in metrics]
    if summary:
        print("final: " + "  ".join(summary))
    for logger in trainer.loggers:
        print(f"{type(logger).__name__} logs: {_display(logger.log_dir, os.environ.get(_ENV_CWD))}")
    if any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        _print_commands(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.runtime.output_dir)
    if not objective:
        return None
    try:
        value = objective_value(metrics, objective)
    except KeyError as err:
        if hc.mode == RunMode.MULTIRUN:  # a sweeper needs the value: stop at the first job
            _fail("objective", ValueError(err.args[0]))
        print(f"warning: objective: {err.args[0]}", file=sys.stderr)
        return None
    print(f"objective: {objective} = {value:.6g}")
    if not math.isfinite(value) and hc.mode == RunMode.MULTIRUN:
        # a diverged trial is the worst one, not a failure that stops the sweeper (Optuna fails on NaN)
        direction = str(OmegaConf.select(hc, "sweeper.direction", default="minimize")).lower()
        value = -math.inf if "max" in direction else math.inf
        print(f"objective: {objective} is not finite; returned {value} to the sweeper")
    return value


if __name__ == "__main__":
    main()
