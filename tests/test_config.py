"""The structured config mirrors CurvatureMonitor, and every YAML in configs/ composes and instantiates."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

import pytest

hydra = pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import ConfigCompositionException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf, open_dict  # noqa: E402

from lightning_curvature import CurvatureMonitor  # noqa: E402
from lightning_curvature.config import CurvatureMonitorConfig, register_configs  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ---------------------------------------------------------------------------------------------- schema vs signature
def _normalize(tp: typing.Any) -> typing.Any:
    """Compare annotations up to Sequence[str] ~ tuple[str, ...] ~ list[str] and X | None ~ Optional[X]."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        return frozenset(_normalize(a) for a in args)
    if origin in (list, tuple, Sequence, typing.Sequence):
        items = [a for a in args if a is not Ellipsis]
        return ("sequence", *(_normalize(a) for a in items))
    return tp


def test_schema_fields_match_callback_signature():
    sig = inspect.signature(CurvatureMonitor.__init__, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    hints = typing.get_type_hints(CurvatureMonitorConfig)
    fields = [f for f in dataclasses.fields(CurvatureMonitorConfig) if f.name != "_target_"]

    assert [f.name for f in fields] == [p.name for p in params]
    for f, p in zip(fields, params):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        expected = tuple(p.default) if isinstance(p.default, (list, tuple)) else p.default
        got = tuple(default) if isinstance(default, (list, tuple)) else default
        assert got == expected and type(got) is type(expected), f"default of {f.name}: {got!r} != {expected!r}"
        assert _normalize(hints[f.name]) == _normalize(p.annotation), f"type of {f.name}"


def test_schema_target_builds_the_callback():
    cfg = OmegaConf.structured(CurvatureMonitorConfig)
    assert cfg._target_ == "lightning_curvature.CurvatureMonitor"
    cb = instantiate(cfg)
    assert isinstance(cb, CurvatureMonitor)
    assert cb.every_n_train_steps is None and cb.options.budget_overhead == 0.05
    assert tuple(cb.metrics) == CurvatureMonitorConfig.metrics


def test_config_module_imports_neither_hydra_nor_lightning():
    code = (
        "import sys, lightning_curvature.config as c; c.CurvatureMonitorConfig();"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('hydra', 'lightning', 'pytorch_lightning')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_configs_is_idempotent():
    from hydra.core.config_store import ConfigStore

    register_configs()
    register_configs()
    repo = ConfigStore.instance().repo
    assert "curvature.yaml" in repo["schema"]


# ---------------------------------------------------------------------------------------------- composing the YAML
def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


GROUP_OVERRIDES = [
    [f"{group}={name}"] for group in ("model", "data", "trainer", "logger", "callbacks") for name in _options(group)
] + [[f"experiment={name}"] for name in _options("experiment")] + [["logger=[tensorboard,csv]"]]


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def _compose(overrides: list[str], output_dir: Path | None = None):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=output_dir is not None)
    if output_dir is not None:  # what @hydra.main does before calling the task
        cfg.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def test_expected_configs_exist():
    assert {"mlp", "cnn"} <= set(_options("model"))
    assert {"digits", "digits_fullbatch"} <= set(_options("data"))
    assert {"tensorboard", "csv"} <= set(_options("logger"))
    assert {"minibatch", "fullbatch_gd"} <= set(_options("experiment"))
    assert (CONFIGS / "train.yaml").is_file() and (CONFIGS / "callbacks" / "curvature.yaml").is_file()


@pytest.mark.parametrize("overrides", GROUP_OVERRIDES, ids=lambda o: ",".join(o))
def test_config_composes_and_instantiates(overrides, tmp_path):
    import lightning.pytorch as pl

    cfg = _compose(overrides, tmp_path)
    OmegaConf.resolve(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(c, _convert_="all") for c in cfg.callbacks.values()]
    loggers = [instantiate(c, _convert_="all") for c in cfg.logger.values()]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    assert isinstance(datamodule, pl.LightningDataModule) and isinstance(model, pl.LightningModule)
    assert any(isinstance(c, CurvatureMonitor) for c in trainer.callbacks)
    assert trainer.loggers and all(Path(lg.save_dir) == tmp_path for lg in trainer.loggers)
    assert Path(trainer.default_root_dir) == tmp_path
    # the data fits the model: one forward pass on a real batch
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert model(x).shape == (len(y), 10)


def test_default_run_is_the_digits_mlp_with_curvature():
    cfg = _compose([])
    assert cfg.model._target_ == "lightning_curvature.demo.MLPClassifier"
    assert cfg.data._target_ == "lightning_curvature.demo.DigitsDataModule"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.log_every_n_steps <= 5
    cb = cfg.callbacks.curvature
    assert cb._target_ == "lightning_curvature.CurvatureMonitor"
    assert cb.every_n_train_steps == 10 and cb.top_k == 3
    assert list(cfg.logger) == ["tensorboard"]


def test_fullbatch_gd_is_plain_full_batch_sgd():
    cfg = _compose(["experiment=fullbatch_gd"])
    assert cfg.data.batch_size == 0 and cfg.data.num_train <= 512
    assert cfg.model.optimizer == "sgd" and cfg.model.momentum == 0 and cfg.model.weight_decay == 0
    assert "eigenvalues" in cfg.callbacks.curvature.metrics and "eos" in cfg.callbacks.curvature.metrics
    # a sweep over the learning rate composes one config per value
    for lr in (0.05, 0.1, 0.2):
        assert _compose(["experiment=fullbatch_gd", f"model.lr={lr}"]).model.lr == lr


def test_model_cnn_switches_data_to_images():
    assert _compose(["model=cnn"]).data.image is True
    assert _compose([]).data.image is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.curvature.top_kk=3", "Key 'top_kk' not in 'CurvatureMonitorConfig'"),
        ("callbacks.curvature.top_k=three", "could not be converted to Integer"),
        ("callbacks.curvature.warm_start=maybe", "is not a valid bool"),
        ("callbacks.curvature.metrics=trace", "ListConfig"),
    ],
)
def test_schema_rejects_bad_keys_and_types(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override])
    text = f"{info.value} {info.value.__cause__}"
    assert message in text


def test_every_curvature_argument_is_commented():
    lines = (CONFIGS / "callbacks" / "curvature.yaml").read_text().splitlines()
    start = lines.index("curvature:")
    commented = {}  # key -> has a comment on its line or on the line above
    for prev, line in zip(lines[start:], lines[start + 1:]):
        if line.strip() and not line.strip().startswith("#"):
            commented[line.split(":")[0].strip()] = "#" in line or prev.strip().startswith("#")
    assert set(commented) == {f.name for f in dataclasses.fields(CurvatureMonitorConfig)}
    missing = [k for k, ok in commented.items() if k != "_target_" and not ok]
    assert not missing, f"arguments without a comment: {missing}"
