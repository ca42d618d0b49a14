"""TensorBoard helpers: the Custom Scalars layout, write_layout, log_histogram, log_trace_band and log_landscape,
read back with TensorBoard's own reader."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_curvature.landscape import TENSORBOARD_PLUGIN, Landscape, loss_cut, loss_surface
from lightning_curvature.tensorboard import (
    custom_scalars_layout,
    log_histogram,
    log_landscape,
    log_trace_band,
    write_layout,
)

LAYOUT_TAG = "custom_scalars__config__"


def _charts(layout):
    (category,) = layout.values()
    return {title: chart[1] for title, chart in category.items()}


def _matches(regexes, tag):
    """TensorBoard's Custom Scalars plugin keeps a tag when ``re.match(regex, tag)``."""
    return any(re.match(r, tag) for r in regexes)


def _reader(logger) -> EventAccumulator:
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


CHARTS = [
    "loss", "sharpness and stability threshold", "eos_ratio (edge of stability at 1)", "top-3 eigenvalues",
    "Hessian trace ± standard error", "per-module traces", "curvature along the gradient and the last update",
]


def test_layout_charts_select_the_right_tags():
    metrics = ["trace", "eigenvalues", "eos", "grad_curvature", "lambda_min", "layers"]
    layout = custom_scalars_layout("curvature/", 3, ["train/loss", "val/loss"], metrics=metrics)
    assert list(layout) == ["curvature"]
    charts = _charts(layout)
    assert list(charts) == CHARTS
    kinds = {title: chart[0] for title, chart in layout["curvature"].items()}
    assert kinds.pop("Hessian trace ± standard error") == "Margin"
    assert set(kinds.values()) == {"Multiline"}

    # the loss on its own axis: not with a threshold of 20
    loss = charts["loss"]
    for tag in ("train/loss", "val/loss", "curvature/loss", "test/loss", "loss"):  # test/loss: not in loss_tags
        assert _matches(loss, tag), tag
    for tag in ("train/loss_epoch", "curvature/stability_threshold", "curvature/eig_1", "curvature/loss_x",
                "curvature/trace/loss"):
        assert not _matches(loss, tag), tag

    # the sharpness with its threshold, lambda_max not drawn on top of eig_1
    sharp = charts["sharpness and stability threshold"]
    for tag in ("curvature/eig_1", "curvature/stability_threshold", "curvature/preconditioned_lambda_max"):
        assert _matches(sharp, tag), tag
    for tag in ("train/loss", "curvature/lambda_max", "curvature/eig_10", "curvature/eig_2",
                "curvature/lambda_max/net.0", "curvature/eos_ratio"):
        assert not _matches(sharp, tag), tag

    eigs = charts["top-3 eigenvalues"]
    assert all(_matches(eigs, f"curvature/eig_{i}") for i in (1, 2, 3, 12))
    assert _matches(eigs, "curvature/lambda_min") and not _matches(eigs, "curvature/lambda_min_ratio")
    assert not _matches(eigs, "curvature/eig_converged") and not _matches(eigs, "curvature/lambda_max")

    # margin chart: exact tags of the value and its band
    assert charts["Hessian trace ± standard error"] == ["curvature/trace", "curvature/trace_lower",
                                                         "curvature/trace_upper"]
    modules = charts["per-module traces"]
    assert _matches(modules, "curvature/trace/net.0") and not _matches(modules, "curvature/trace_stderr")
    assert not _matches(modules, "curvature/trace")
    assert charts["eos_ratio (edge of stability at 1)"] == ["curvature/eos_ratio$"]
    directional = charts["curvature along the gradient and the last update"]
    assert all(_matches(directional, f"curvature/{t}") for t in ("grad_curvature", "update_curvature", "eig_1"))


def test_layout_only_the_charts_the_metrics_fill():
    default = _charts(custom_scalars_layout("curvature/", 3, ["train/loss"]))  # CurvatureMonitor's default metrics
    assert list(default) == [c for c in CHARTS if c != "per-module traces"]
    charts = _charts(custom_scalars_layout("curvature/", 1, ["train/loss"], metrics=["eigenvalues", "trace"]))
    assert list(charts) == ["loss", "sharpness and stability threshold", "top-1 eigenvalues",
                            "Hessian trace ± standard error"]
    assert list(_charts(custom_scalars_layout("c/", 1, ["train/loss"], metrics=[]))) == ["loss"]
    assert "per-module traces" in _charts(custom_scalars_layout("c/", 1, [], metrics=["layers"]))


def test_layout_escapes_prefix_and_tags_and_takes_extra_tags():
    layout = custom_scalars_layout("hess.", 1, ["loss"], extra_tags=["ref/two_over_lr"])
    assert list(layout) == ["hess."]
    charts = _charts(layout)
    sharp = charts["sharpness and stability threshold"]
    assert _matches(sharp, "hess.eig_1") and not _matches(sharp, "hessXeig_1")
    assert _matches(sharp, "ref/two_over_lr") and _matches(charts["loss"], "loss")
    assert charts["Hessian trace ± standard error"][0] == "hess.trace"
    assert "top-1 eigenvalues" in _charts(layout)


@pytest.mark.parametrize(("prefix", "top_k"), [(None, 1), ("curvature/", 0), ("curvature/", True)])
def test_layout_rejects_bad_arguments(prefix, top_k):
    with pytest.raises(ValueError):
        custom_scalars_layout(prefix, top_k, ["train/loss"])


def test_write_layout_once_and_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    layout = custom_scalars_layout("curvature/", 2, ["train/loss"])
    assert write_layout(logger, layout) is True
    assert write_layout(logger, custom_scalars_layout("other/", 5, ["x"])) is False  # once per run

    acc = _reader(logger)
    assert LAYOUT_TAG in acc.Tags()["tensors"]
    events = acc.Tensors(LAYOUT_TAG)
    assert len(events) == 1
    proto = layout_pb2.Layout()
    proto.ParseFromString(events[0].tensor_proto.string_val[0])
    (category,) = proto.category
    assert category.title == "curvature"
    got = {}
    for chart in category.chart:
        if chart.HasField("margin"):
            (series,) = chart.margin.series
            got[chart.title] = [series.value, series.lower, series.upper]
        else:
            got[chart.title] = list(chart.multiline.tag)
    assert got == _charts(layout)


def test_helpers_do_nothing_for_other_loggers(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    assert write_layout(logger, custom_scalars_layout("curvature/", 1, ["train/loss"])) is False
    assert log_histogram(logger, "curvature/density", torch.randn(10), step=0) is False
    assert log_trace_band(logger, "curvature/", {"trace": 1.0, "trace_stderr": 0.1}, step=0) is False
    cut = Landscape(torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), 0.0)
    assert log_landscape(logger, "curvature/landscape", cut, step=0) is False
    assert write_layout(None, {}) is False and log_histogram(None, "x", torch.zeros(1), 0) is False
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_log_histogram_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    values = torch.linspace(-1.0, 3.0, 101, requires_grad=True) * 1  # non-leaf, needs detach
    assert log_histogram(logger, "curvature/density", values.view(1, -1), step=7) is True
    assert log_histogram(logger, "curvature/density", torch.zeros(5, dtype=torch.float64), step=9) is True

    acc = _reader(logger)
    assert "curvature/density" in acc.Tags()["histograms"]
    first, second = acc.Histograms("curvature/density")
    assert (first.step, second.step) == (7, 9)
    assert first.histogram_value.num == 101
    assert first.histogram_value.min == pytest.approx(-1.0) and first.histogram_value.max == pytest.approx(3.0)
    assert first.histogram_value.sum == pytest.approx(float(values.detach().sum()), rel=1e-5)


def test_log_trace_band_read_back(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    assert log_trace_band(logger, "curvature/", {"trace": 10.0, "trace_stderr": 0.5, "eig_1": 3.0}, step=4) is True
    assert log_trace_band(logger, "curvature/", {"trace": 10.0}, step=5) is False  # no stderr, no band
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    logger.experiment.flush()
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"curvature/trace_lower", "curvature/trace_upper"}
    (lower,) = acc.Scalars("curvature/trace_lower")
    (upper,) = acc.Scalars("curvature/trace_upper")
    assert (lower.step, lower.value, upper.value) == (4, 9.5, 10.5)


def _quadratic_landscapes():
    a = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))

    def loss_fn(p):
        return 0.5 * p["w"] @ a @ p["w"]

    params = {"w": torch.zeros(3, dtype=torch.float64)}
    eye = torch.eye(3, dtype=torch.float64)
    cut = loss_cut(loss_fn, params, eye[0], [-1.0, -0.5, 0.0, 0.5, 1.0], curvature=4.0)
    surface = loss_surface(loss_fn, params, eye[:, :2], [-1.0, 0.0, 1.0], [-0.5, 0.5], curvatures=[4.0, 1.0])
    return cut, surface


def test_log_landscape_on_a_non_zero_rank_writes_nothing(tmp_path, monkeypatch):
    from lightning.fabric.loggers.logger import _DummyExperiment

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    monkeypatch.setattr(logger, "_experiment", _DummyExperiment())
    cut, _ = _quadratic_landscapes()
    assert log_landscape(logger, "curvature/landscape", cut, step=0) is False
    assert log_trace_band(logger, "curvature/", {"trace": 1.0, "trace_stderr": 0.1}, step=0) is True  # no-op calls
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_log_landscape_writes_an_image_and_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    cut, surface = _quadratic_landscapes()
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    assert log_landscape(logger, "curvature/landscape", cut, step=10) is True
    assert log_landscape(logger, "curvature/landscape", cut, step=20, image=False) is True
    assert log_landscape(logger, "curvature/surface", surface, step=20) is True
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"curvature/landscape", "curvature/surface"}
    (image,) = acc.Images("curvature/landscape")
    assert image.step == 10 and image.width > 300 and image.encoded_image_string[:4] == b"\x89PNG"
    assert not acc.Tags()["scalars"]  # a grid of alphas is not a time series
    assert acc.SummaryMetadata("curvature/landscape/data").plugin_data.plugin_name == TENSORBOARD_PLUGIN
    first, second = acc.Tensors("curvature/landscape/data")
    assert (first.step, second.step) == (10, 20)
    back = Landscape.from_json(first.tensor_proto.string_val[0])
    assert back.losses.tolist() == [2.0, 0.5, 0.0, 0.5, 2.0] and back.curvatures == (4.0,)
    (surf,) = acc.Tensors("curvature/surface/data")
    assert torch.equal(Landscape.from_json(surf.tensor_proto.string_val[0]).losses, surface.losses)
