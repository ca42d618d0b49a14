"""TensorBoard helpers: a Custom Scalars layout for the curvature metrics, and histograms.

Both write only through a :class:`~lightning.pytorch.loggers.TensorBoardLogger` (its ``SummaryWriter``,
``logger.experiment``) and silently do nothing for any other logger, so callers can loop over ``trainer.loggers``.

Example:
    >>> layout = custom_scalars_layout("curvature/", top_k=3, loss_tags=["train/loss"])
    >>> sorted(layout["curvature"])
    ['Hessian trace', 'edge of stability', 'loss and sharpness', 'top-3 eigenvalues']
    >>> layout["curvature"]["loss and sharpness"]
    ['Multiline', ['train/loss$', 'curvature/(lambda_max|eig_1|stability_threshold)$']]
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.loggers import TensorBoardLogger
from torch import Tensor

__all__ = ["custom_scalars_layout", "log_histogram", "write_layout"]

#: ``{category: {chart title: ["Multiline", [tag regex, ...]]}}``, the format of ``SummaryWriter.add_custom_scalars``.
Layout = dict[str, dict[str, list[Any]]]

# SummaryWriters that already hold a layout (one layout per run; the Custom Scalars plugin reads the first).
_WRITTEN: weakref.WeakSet[Any] = weakref.WeakSet()


def custom_scalars_layout(
    prefix: str, top_k: int, loss_tags: Sequence[str], *, extra_tags: Sequence[str] = ()
) -> Layout:
    r"""Build a TensorBoard Custom Scalars layout with the loss and the curvature on shared charts.

    One category (named after ``prefix``) with four multi-line charts; tags are regular expressions that
    TensorBoard matches from the start of each tag name (here anchored at the end too):

    - ``loss and sharpness``: each of ``loss_tags``, ``{prefix}lambda_max``, ``{prefix}eig_1`` and the optimizer's
      ``{prefix}stability_threshold`` (2/lr for SGD), and ``extra_tags``, on one step axis.
    - ``top-{top_k} eigenvalues``: ``{prefix}eig_1`` ... ``{prefix}eig_k`` (and ``{prefix}lambda_min`` if logged).
    - ``Hessian trace``: ``{prefix}trace`` and per-module traces ``{prefix}trace/<module>``.
    - ``edge of stability``: ``{prefix}eos_ratio`` (sharpness / stability threshold).

    Args:
        prefix: the callback's ``log_prefix`` (e.g. ``"curvature/"``).
        top_k: the callback's ``top_k`` (>= 1), used in the chart title.
        loss_tags: exact names of the loss scalars to show with the sharpness (e.g. ``["train/loss"]``).
        extra_tags: more exact tag names for the ``loss and sharpness`` chart.

    Returns:
        ``{category: {chart title: ["Multiline", [regex, ...]]}}``, ready for :func:`write_layout`
        (or ``SummaryWriter.add_custom_scalars``).
    """
    if not isinstance(prefix, str):
        raise ValueError(f"`prefix` must be a string, got {prefix!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an integer >= 1, got {top_k!r}.")
    if isinstance(loss_tags, str):
        loss_tags = [loss_tags]
    p = re.escape(prefix)
    losses = [re.escape(t) + "$" for t in loss_tags]
    extras = [re.escape(t) + "$" for t in extra_tags]
    category = prefix.strip("/") or "curvature"
    return {
        category: {
            "loss and sharpness": ["Multiline", [*losses, f"{p}(lambda_max|eig_1|stability_threshold)$", *extras]],
            f"top-{top_k} eigenvalues": ["Multiline", [rf"{p}eig_\d+$", f"{p}lambda_min$"]],
            "Hessian trace": ["Multiline", [f"{p}trace(/.*)?$"]],
            "edge of stability": ["Multiline", [f"{p}eos_ratio$"]],
        }
    }


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
