"""TensorBoard helpers: the Custom Scalars layout, write_layout and log_histogram, read back with TensorBoard."""

from __future__ import annotations

import re

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_curvature.tensorboard import custom_scalars_layout, log_histogram, write_layout

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


def test_layout_charts_select_the_right_tags():
    layout = custom_scalars_layout("curvature/", 3, ["train/loss"])
    assert list(layout) == ["curvature"]
    charts = _charts(layout)
    assert all(kind == "Multiline" for kind, _ in next(iter(layout.values())).values())
    assert set(charts) == {"loss and sharpness", "top-3 eigenvalues", "Hessian trace", "edge of stability"}

    sharp = charts["loss and sharpness"]
    for tag in ("train/loss", "curvature/eig_1", "curvature/lambda_max", "curvature/stability_threshold"):
        assert _matches(sharp, tag), tag
    for tag in ("train/loss_epoch", "val/loss", "curvature/eig_10", "curvature/eig_2", "curvature/loss",
                "curvature/lambda_max/net.0", "curvature/eos_ratio"):
        assert not _matches(sharp, tag), tag

    eigs = charts["top-3 eigenvalues"]
    assert all(_matches(eigs, f"curvature/eig_{i}") for i in (1, 2, 3, 12))
    assert _matches(eigs, "curvature/lambda_min") and not _matches(eigs, "curvature/lambda_min_ratio")
    assert not _matches(eigs, "curvature/eig_converged") and not _matches(eigs, "curvature/trace")

    trace = charts["Hessian trace"]
    assert _matches(trace, "curvature/trace") and _matches(trace, "curvature/trace/net.0")
    assert not _matches(trace, "curvature/trace_stderr") and not _matches(trace, "train/loss")
    assert _matches(charts["edge of stability"], "curvature/eos_ratio")


def test_layout_escapes_prefix_and_tags_and_takes_extra_tags():
    layout = custom_scalars_layout("hess.", 1, ["loss"], extra_tags=["ref/two_over_lr"])
    assert list(layout) == ["hess."]
    sharp = _charts(layout)["loss and sharpness"]
    assert _matches(sharp, "hess.eig_1") and not _matches(sharp, "hessXeig_1")
    assert _matches(sharp, "ref/two_over_lr") and _matches(sharp, "loss")
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
    got = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    assert got == _charts(layout)


def test_helpers_do_nothing_for_other_loggers(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)
    assert write_layout(logger, custom_scalars_layout("curvature/", 1, ["train/loss"])) is False
    assert log_histogram(logger, "curvature/density", torch.randn(10), step=0) is False
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
