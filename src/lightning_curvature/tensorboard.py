"""TensorBoard helpers: Custom Scalars layout, the trace's error band, histograms, loss-landscape images.

All write only through a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (its ``SummaryWriter``,
``logger.experiment``) and silently do nothing for any other logger, so callers can loop over ``trainer.loggers``.

Example:
    >>> layout = custom_scalars_layout("curvature/", top_k=3, loss_tags=["train/loss"])
    >>> list(layout["curvature"])  # doctest: +NORMALIZE_WHITESPACE
    ['loss', 'sharpness and stability threshold', 'eos_ratio (edge of stability at 1)', 'top-3 eigenvalues',
     'Hessian trace ± standard error', 'curvature along the gradient and the last update']
    >>> layout["curvature"]["sharpness and stability threshold"]
    ['Multiline', ['curvature/(eig_1|preconditioned_lambda_max|stability_threshold)$']]
    >>> layout["curvature"]["Hessian trace ± standard error"]
    ['Margin', ['curvature/trace', 'curvature/trace_lower', 'curvature/trace_upper']]
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor

from .landscape import TENSORBOARD_PLUGIN, Landscape, landscape_figure

__all__ = [
    "custom_scalars_layout", "log_density", "log_histogram", "log_landscape", "log_trace_band", "write_layout",
]

#: ``{category: {chart title: ["Multiline", [tag regex, ...]] or ["Margin", [value, lower, upper]]}}``, the format of
#: ``SummaryWriter.add_custom_scalars``.
Layout = dict[str, dict[str, list[Any]]]

#: CurvatureMonitor's default ``metrics``: the charts :func:`custom_scalars_layout` draws when not told the metrics.
DEFAULT_METRICS = ("trace", "eigenvalues", "eos", "grad_curvature")

#: Suffixes of the TensorBoard-only scalars :func:`log_trace_band` writes next to ``{prefix}trace``.
TRACE_BAND = ("trace_lower", "trace_upper")

# SummaryWriters that already hold a layout (one layout per run; the Custom Scalars plugin reads the first).
_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def custom_scalars_layout(
    prefix: str,
    top_k: int,
    loss_tags: Sequence[str],
    *,
    extra_tags: Sequence[str] = (),
    metrics: Collection[str] | None = None,
) -> Layout:
    r"""Build a TensorBoard Custom Scalars layout: one chart per question, each quantity on an axis of its own scale.

    One category (named after ``prefix``); multi-line charts take regular expressions that TensorBoard matches from
    the start of each tag name (here anchored at the end too), the margin chart exact tag names:

    - ``loss``: each of ``loss_tags``, every other tag ending in ``loss`` outside ``prefix`` (``val/loss``), and
      ``{prefix}loss`` (the loss at which the Hessian was measured).
    - ``sharpness and stability threshold``: ``{prefix}eig_1`` (= ``lambda_max``, which is left out so it is not
      drawn twice), Adam's ``{prefix}preconditioned_lambda_max`` and the optimizer's
      ``{prefix}stability_threshold`` (2/lr for SGD), and ``extra_tags``.
    - ``eos_ratio (edge of stability at 1)``: ``{prefix}eos_ratio``.
    - ``top-{top_k} eigenvalues``: ``{prefix}eig_1`` ... ``{prefix}eig_k`` and ``{prefix}lambda_min``.
    - ``Hessian trace ± standard error``: a margin chart of ``{prefix}trace`` between ``{prefix}trace_lower`` and
      ``{prefix}trace_upper`` (written by :func:`log_trace_band`).
    - ``per-module traces``: ``{prefix}trace/<module>``.
    - ``curvature along the gradient and the last update``: ``{prefix}grad_curvature``, ``{prefix}update_curvature``
      and ``{prefix}eig_1`` for reference.

    Args:
        prefix: the callback's ``log_prefix`` (e.g. ``"curvature/"``).
        top_k: the callback's ``top_k`` (>= 1), used in the chart title.
        loss_tags: exact names of the loss scalars (e.g. ``["train/loss", "val/loss"]``).
        extra_tags: more exact tag names for the sharpness chart.
        metrics: the callback's ``metrics``: only the charts they fill (the loss chart always). ``None``: the
            charts of CurvatureMonitor's default metrics (:data:`DEFAULT_METRICS`), so no chart stays empty in a
            default run; pass the callback's ``metrics`` for ``layers`` (per-module traces).

    Returns:
        ``{category: {chart title: [kind, tags]}}``, ready for :func:`write_layout`
        (or ``SummaryWriter.add_custom_scalars``).
    """
    if not isinstance(prefix, str):
        raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an integer >= 1, got {top_k!r}.")
    if isinstance(loss_tags, str):
        loss_tags = [loss_tags]
    wanted = set(DEFAULT_METRICS if metrics is None else metrics)

    def has(*names: str) -> bool:
        return any(n in wanted for n in names)

    p = re.escape(prefix)
    exact = [re.escape(t) + "$" for t in loss_tags]
    # every other tag ending in "loss" too: the callback writes the layout at its first estimate, before any
    # validation loss exists
    others = f"(?!{p}).*loss$"
    charts: dict[str, list[Any]] = {"loss": ["Multiline", [*exact, others, f"{p}loss$"]]}
    if has("eigenvalues", "eos", "preconditioned"):
        sharp = [f"{p}(eig_1|preconditioned_lambda_max|stability_threshold)$"]
        sharp += [re.escape(t) + "$" for t in extra_tags]
        charts["sharpness and stability threshold"] = ["Multiline", sharp]
    if has("eos"):
        charts["eos_ratio (edge of stability at 1)"] = ["Multiline", [f"{p}eos_ratio$"]]
    if has("eigenvalues", "lambda_min"):
        charts[f"top-{top_k} eigenvalues"] = ["Multiline", [rf"{p}eig_\d+$", f"{p}lambda_min$"]]
    if has("trace"):
        charts["Hessian trace ± standard error"] = ["Margin", [f"{prefix}trace", *(prefix + s for s in TRACE_BAND)]]
    if has("layers"):
        charts["per-module traces"] = ["Multiline", [f"{p}trace/.+$"]]
    if has("grad_curvature"):
        charts["curvature along the gradient and the last update"] = [
            "Multiline", [f"{p}(grad_curvature|update_curvature|eig_1)$"],
        ]
    return {prefix.strip("/") or "curvature": charts}


def _writer(logger: Any) -> Any | None:
    """The ``SummaryWriter`` of a TensorBoard logger (a no-op stand-in on non-zero ranks), ``None`` for others."""
    if not isinstance(logger, TensorBoardLogger):
        return None
    writer = logger.experiment
    return writer if callable(getattr(writer, "add_custom_scalars", None)) else None


def write_layout(logger: Any, layout: Layout) -> bool:
    """Write a Custom Scalars ``layout`` into ``logger``'s run, once.

    Args:
        logger: any Lightning logger; only a ``TensorBoardLogger`` is written to.
        layout: from :func:`custom_scalars_layout`.

    Returns:
        ``True`` when the layout was written now; ``False`` for other loggers, or when a layout was
        already written to this logger's ``SummaryWriter`` (so a callback and a script can both call it).
    """
    writer = _writer(logger)
    if writer is None or writer in _WRITTEN:
        return False
    writer.add_custom_scalars(layout)
    _WRITTEN.add(writer)
    return True


def log_histogram(logger: Any, tag: str, values: Tensor, step: int) -> bool:
    """Write a histogram of ``values`` (e.g. Hessian eigenvalues) at ``step`` to a ``TensorBoardLogger``.

    Args:
        logger: any Lightning logger; only a ``TensorBoardLogger`` is written to.
        tag: the histogram's name, e.g. ``"curvature/eigenvalues"``.
        values: any tensor (flattened; moved to the CPU).
        step: the x-axis value, normally the step the loss is logged at.

    Returns:
        ``True`` when written, ``False`` for other loggers (nothing happens).
    """
    writer = _writer(logger)
    if writer is None or not callable(getattr(writer, "add_histogram", None)):
        return False
    writer.add_histogram(tag, values.detach().reshape(-1).cpu(), global_step=step)
    return True


def log_density(logger: Any, tag: str, grid: Tensor, density: Tensor, step: int) -> bool:
    """Write a density sampled on ``grid`` as a TensorBoard histogram (buckets on the grid, counts = density × width).

    Used for the stochastic Lanczos quadrature eigenvalue density; ``False`` (nothing written) for other loggers.
    """
    writer = _writer(logger)
    if writer is None:
        return False
    grid = grid.detach().to(torch.float64).cpu()
    width = torch.diff(grid, prepend=grid[:1] - (grid[1] - grid[0]))
    counts = density.detach().to(torch.float64).cpu() * width
    writer.add_histogram_raw(
        tag, min=float(grid[0]), max=float(grid[-1]), num=float(counts.sum()), sum=float((counts * grid).sum()),
        sum_squares=float((counts * grid**2).sum()), bucket_limits=grid.tolist(), bucket_counts=counts.tolist(),
        global_step=step,
    )
    return True


def log_trace_band(logger: Any, prefix: str, values: Mapping[str, float], step: int) -> bool:
    """Write ``{prefix}trace_lower`` and ``{prefix}trace_upper`` = trace ∓ one standard error, for the margin chart.

    TensorBoard's margin charts draw a band between two logged scalars, so the band is logged as two scalars, to
    TensorBoard only (other loggers have ``trace_stderr``).

    Args:
        logger: any Lightning logger; only a ``TensorBoardLogger`` is written to.
        prefix: the callback's ``log_prefix``.
        values: the estimate's metrics without the prefix (needs ``trace`` and ``trace_stderr``).
        step: the step the trace is logged at.

    Returns:
        ``True`` when written; ``False`` for other loggers or without ``trace``/``trace_stderr`` in ``values``.
    """
    writer = _writer(logger)
    if writer is None or "trace" not in values or "trace_stderr" not in values:
        return False
    trace, stderr = float(values["trace"]), float(values["trace_stderr"])
    writer.add_scalar(prefix + TRACE_BAND[0], trace - stderr, global_step=step)
    writer.add_scalar(prefix + TRACE_BAND[1], trace + stderr, global_step=step)
    return True


def landscape_summary(tag: str, landscape: Landscape) -> Any:
    """A TensorBoard ``Summary`` holding ``landscape`` as a JSON string tensor.

    The plugin is :data:`~lightning_curvature.landscape.TENSORBOARD_PLUGIN`: TensorBoard keeps it but shows nothing
    for it; ``lightning-curvature plot --landscape`` reads it back.
    """
    from tensorboard.compat.proto.summary_pb2 import DataClass, Summary, SummaryMetadata
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto

    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(plugin_name=TENSORBOARD_PLUGIN, content=b"1"),
        data_class=DataClass.DATA_CLASS_TENSOR,
    )
    tensor = TensorProto(dtype="DT_STRING", string_val=[landscape.to_json().encode()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


def log_landscape(
    logger: Any, tag: str, landscape: Landscape, step: int, *, title: str | None = None, image: bool = True
) -> bool:
    """Write a loss landscape (:mod:`lightning_curvature.landscape`) to a ``TensorBoardLogger``.

    Two summaries at ``step``: the drawing as an image under ``tag`` (TensorBoard's *Images* tab; the 1-D cut
    with its quadratic model, or the 2-D surface as filled contours), and the numbers under ``{tag}/data``, a JSON
    string tensor of a plugin of this package's own, which TensorBoard keeps but does not show and
    ``lightning-curvature plot --landscape`` draws (exact values, any step, several runs overlaid). Not as scalars:
    a grid of ``α`` is not a time series.

    Args:
        logger: any Lightning logger; only a ``TensorBoardLogger`` is written to.
        tag: e.g. ``"curvature/landscape"``.
        landscape: from :func:`~lightning_curvature.landscape.loss_cut` or
            :func:`~lightning_curvature.landscape.loss_surface`.
        step: the step the estimate belongs to.
        title: the image's title (default: what the landscape is, and the step).
        image: also draw the image (needs matplotlib); ``False``: the data only.

    Returns:
        ``True`` when written, ``False`` for other loggers.
    """
    writer = _writer(logger)
    file_writer = writer._get_file_writer() if writer is not None else None
    if file_writer is None:  # not TensorBoard, or Lightning's no-op experiment on a non-zero rank
        return False
    file_writer.add_summary(landscape_summary(f"{tag}/data", landscape), global_step=step)
    if image:
        import numpy as np

        kind = "plane of the top two eigenvectors" if landscape.is_surface else "top eigenvector"
        fig = landscape_figure(landscape, title or f"loss along the {kind}, step {step}")
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
    return True
