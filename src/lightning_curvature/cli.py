"""The ``lightning-curvature`` console command.

``lightning-curvature plot LOGDIR [LOGDIR ...] [-o curves.png] [--tags REGEX ...] [--logy [REGEX ...]] [--smooth W]``
reads the TensorBoard event files of every run under each ``LOGDIR`` (recursively: each directory holding
``events.out.tfevents.*`` files is one run) with TensorBoard's own reader, and draws the loss and the curvature scalars
against the step, one panel per quantity, runs overlaid, into one image:

- each panel is titled by its tag and has a y label saying what the quantity is;
- a run's ``stability_threshold`` (2/lr for SGD) is drawn dashed, in the run's colour, on the sharpness panel
  (``eig_1``, or Adam's ``preconditioned_lambda_max`` when logged), and ``eos_ratio = 1`` as a dotted line;
  ``trace_stderr`` as a band around the trace;
- runs are labelled by what tells them apart (their folders, without the parts all runs share; a single run by its
  folder name), in one legend below the panels;
- the log prefix of the callback is read from the tags (every estimate logs ``<prefix>num_hvps``), so a run with a
  custom ``log_prefix`` needs no option;
- panels whose values never change (``eig_converged`` always 1, a constant threshold) are left out unless a
  ``--tags`` pattern names the tag exactly.

``lightning-curvature plot LOGDIR --landscape`` draws the loss landscapes logged by
:func:`lightning_curvature.tensorboard.log_landscape` instead: 1-D cuts of several runs overlaid, 2-D surfaces one
panel per run, at the last logged step (or ``--step``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

__all__ = ["landscapes_figure", "main", "plot", "plot_landscapes", "scalars_figure"]

PROG = "lightning-curvature"
EVENTS_GLOB = "events.out.tfevents.*"
DEFAULT_PREFIX = "curvature/"
# Scalars of the callback left out of the default figure (ask for them with --tags): bookkeeping, the stderr and the
# band (drawn around the trace), the loss at the Hessian (a copy of the training loss), lambda_max (= eig_1) and the
# stability threshold (drawn dashed on the sharpness panel).
_NOT_BY_DEFAULT = (
    "num_hvps", "seconds", "trace_stderr", "trace_lower", "trace_upper", "loss", "eig_converged", "lambda_max",
    "stability_threshold",
)
# Folder names that say nothing about a run (the TensorBoard logger's name in configs/logger/tensorboard.yaml).
_GENERIC_FOLDERS = frozenset({"tensorboard"})
_YLABELS = {
    "loss": "loss at the measured batch",
    "eig_converged": "1: every eigenpair converged",
    "lambda_max": r"$\lambda_{\max}$ (sharpness)",
    "trace": r"$\mathrm{tr}(H)$",
    "trace_stderr": r"standard error of $\mathrm{tr}(H)$",
    "trace_lower": r"$\mathrm{tr}(H)$ − stderr",
    "trace_upper": r"$\mathrm{tr}(H)$ + stderr",
    "stability_threshold": "stability threshold (2/lr for SGD)",
    "eos_ratio": "sharpness / stability threshold",
    "preconditioned_lambda_max": r"$\lambda_{\max}(P^{-1/2} H P^{-1/2})$",
    "grad_curvature": r"$g^\top H g\, /\, \|g\|^2$",
    "update_curvature": r"$u^\top H u\, /\, \|u\|^2$",
    "lambda_min": r"$\lambda_{\min}$",
    "lambda_min_ratio": r"$\lambda_{\min} / \lambda_{\max}$",
    "density_mean": "mean eigenvalue (SLQ)",
    "num_hvps": "Hessian-vector products",
    "seconds": "seconds per estimate",
}
_BLOCK_YLABELS = {
    "trace": r"$\mathrm{tr}(H)$ of the block",
    "lambda_max": r"$\lambda_{\max}$ of the block",
    "eig_mass": r"share of $\|v_1\|^2$ in the block",
}

#: ``--smooth`` leaves series with fewer points as they are (e.g. a validation loss logged once per epoch): an average
#: over points far apart in steps would draw a curve that was never measured.
SMOOTH_MIN_POINTS = 20

Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit status 2."""


# ---------------------------------------------------------------------------------------------------- reading
def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.is_dir():
        raise CLIError(f"{str(logdir)!r} is not a directory")
    runs = {p.parent for p in root.rglob(EVENTS_GLOB) if p.is_file()}
    return sorted(runs)


def _accumulator(run_dir: str | os.PathLike[str], kind: str) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={kind: 0})
    acc.Reload()
    return acc


def read_scalars(run_dir: str | os.PathLike[str]) -> Series:
    """All scalar series of one run directory, read with TensorBoard's ``EventAccumulator`` (no downsampling)."""
    acc = _accumulator(run_dir, "scalars")
    out: Series = {}
    for tag in acc.Tags().get("scalars", []):
        # Several event files (e.g. a resumed run) may repeat steps: keep the last value written for each step.
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def read_landscapes(run_dir: str | os.PathLike[str]) -> dict[str, list[tuple[int, Any]]]:
    """The loss landscapes of one run: ``{tag: [(step, Landscape), ...]}`` sorted by step (tags without ``/data``)."""
    from .landscape import TENSORBOARD_PLUGIN, Landscape

    acc = _accumulator(run_dir, "tensors")
    out: dict[str, list[tuple[int, Any]]] = {}
    for tag in acc.Tags().get("tensors", []):
        if acc.SummaryMetadata(tag).plugin_data.plugin_name != TENSORBOARD_PLUGIN:
            continue
        by_step = {e.step: Landscape.from_json(e.tensor_proto.string_val[0]) for e in acc.Tensors(tag)}
        out[tag.removesuffix("/data")] = sorted(by_step.items())
    return out


def _runs(logdirs: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """``(label, run directory)`` of every run under ``logdirs``, labelled by what tells them apart."""
    found: list[tuple[str, Path]] = []
    for logdir in logdirs:
        runs = find_runs(logdir)
        if not runs:
            raise CLIError(f"no TensorBoard event files ({EVENTS_GLOB}) under {str(logdir)!r}")
        for run in runs:
            rel = run.relative_to(logdir)
            head = [Path(logdir).resolve().name] if len(logdirs) == 1 else list(Path(logdir).parts)
            parts = [p for p in (*head, *rel.parts) if p not in _GENERIC_FOLDERS] or [*head, *rel.parts]
            found.append(("/".join(parts), run))
    return list(zip(short_labels([label for label, _ in found]), [run for _, run in found]))


# ---------------------------------------------------------------------------------------------------- choosing
def detect_prefixes(tags: Collection[str]) -> list[str]:
    """The ``log_prefix`` of every CurvatureMonitor in ``tags`` (each estimate logs ``<prefix>num_hvps``), sorted.

    Example:
        >>> detect_prefixes(["train/loss", "hessian/num_hvps", "hessian/eig_1"])
        ['hessian/']
    """
    return sorted({t[: -len("num_hvps")] for t in tags if t.endswith("num_hvps")})


def constant_tags(series: Sequence[Series]) -> set[str]:
    """Tags logged at least twice whose values are all the same number, in every run (a flat line of a panel)."""
    values: dict[str, set[float]] = {}
    counts: dict[str, int] = {}
    for run in series:
        for tag, (_, vals) in run.items():
            values.setdefault(tag, set()).update(vals)
            counts[tag] = counts.get(tag, 0) + len(vals)
    return {tag for tag, vals in values.items() if len(vals) == 1 and counts[tag] >= 2}


def select_tags(
    tags: Sequence[str],
    patterns: Sequence[str] | None,
    prefix: str | Sequence[str],
    constant: Collection[str] = (),
) -> list[str]:
    """The tags to draw: those fully matching one of ``patterns`` or, by default, the losses and curvature scalars.

    By default: every tag containing ``loss`` that is not under a prefix (``train/loss``, ``val/loss``, ...), then
    every ``{prefix}*`` tag except bookkeeping and tags drawn elsewhere (``num_hvps``, ``seconds``, ``loss``,
    ``eig_converged``, ``trace_stderr``, ``trace_lower``, ``trace_upper``, ``stability_threshold``, and
    ``lambda_max`` when ``eig_1`` is there), with ``eig_1`` ... ``eig_k`` in numeric order. Tags in ``constant`` are
    left out, unless a pattern is the tag itself (``--tags curvature/eig_converged``).
    """
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)

    def key(tag: str) -> tuple[str, int, str]:
        m = re.fullmatch(r"(.*?)(\d+)", tag)
        return (m.group(1), int(m.group(2)), tag) if m else (tag, -1, tag)

    if patterns:
        try:
            regexes = [re.compile(p) for p in patterns]
        except re.error as err:
            raise CLIError(f"bad --tags regular expression: {err}") from err
        named = {p for p in patterns if p in tags} | {t for t in tags if re.escape(t) in patterns}
        chosen = [t for t in tags if any(r.fullmatch(t) for r in regexes) and (t not in constant or t in named)]
        return sorted(chosen, key=lambda t: ([i for i, r in enumerate(regexes) if r.fullmatch(t)][0], key(t)))
    losses = sorted(
        t for t in tags if "loss" in t and not any(t.startswith(p) for p in prefixes) and t not in constant
    )
    curvature: list[str] = []
    for p in prefixes:
        skip = set(_NOT_BY_DEFAULT) if f"{p}eig_1" in tags else set(_NOT_BY_DEFAULT) - {"lambda_max"}
        mine = (t for t in tags if t.startswith(p) and t[len(p):] not in skip and t not in constant)
        curvature += sorted(mine, key=key)
    return losses + curvature


def short_labels(labels: Sequence[str]) -> list[str]:
    """Drop what all labels share: path parts and comma-separated items (Hydra's ``key=value`` run names).

    ``["0/tensorboard/experiment=gd,model.lr=0.2", "1/tensorboard/experiment=gd,model.lr=0.4"]`` becomes
    ``["0/model.lr=0.2", "1/model.lr=0.4"]``. A single label, or labels that would become empty or equal, are kept.
    """
    if len(labels) < 2:
        return list(labels)
    split = [[part.split(",") for part in label.split("/")] for label in labels]
    common = set.intersection(*({item for part in parts for item in part} for parts in split))
    out = []
    for parts in split:
        kept = [",".join(i for i in part if i not in common) for part in parts]
        out.append("/".join(p for p in kept if p))
    if any(not label for label in out) or len(set(out)) < len(set(labels)):
        return list(labels)
    return out


def ylabel(tag: str, prefixes: Sequence[str]) -> str:
    r"""What the quantity of ``tag`` is, for the y axis.

    Example:
        >>> ylabel("curvature/eig_2", ["curvature/"])
        '$\\lambda_{2}$'
        >>> ylabel("val/loss", ["curvature/"])
        'loss'
    """
    for p in prefixes:
        if tag.startswith(p):
            name = tag[len(p):]
            if m := re.fullmatch(r"eig_(\d+)", name):
                return rf"$\lambda_{{{m.group(1)}}}$" + (" (sharpness)" if m.group(1) == "1" else "")
            block = name.split("/", 1)
            if len(block) == 2 and block[0] in _BLOCK_YLABELS:
                return _BLOCK_YLABELS[block[0]]
            return _YLABELS.get(name, name)
    last = tag.rsplit("/", 1)[-1]
    if "loss" in last:
        return "loss"
    if "acc" in last:
        return "accuracy"
    return last


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (``weight`` in [0, 1); 0 leaves values as is).

    Non-finite values are passed through and do not enter the average.

    Example:
        >>> smooth([0.0, 1.0, 1.0], 0.5)
        [0.0, 0.6666666666666666, 0.8571428571428571]
    """
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


# ---------------------------------------------------------------------------------------------------- drawing
def _figure(n: int, width: float = 4.8, height: float = 3.4) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CLIError("plotting needs matplotlib: pip install 'lightning-curvature[examples]'") from err
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colors(n: int) -> list[Any]:
    """One colour per run: tab10 for up to 10 runs, else evenly spaced on viridis."""
    from matplotlib import colormaps

    if n <= 10:
        return [f"C{i}" for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / (n - 1)) for i in range(n)]


def _legend(fig: Any, handles: list[Any]) -> None:
    """One legend for the whole figure, below the panels (never over the data)."""
    if not handles:
        return
    width = max(len(h.get_label()) for h in handles) + 6
    ncols = max(1, min(len(handles), int(fig.get_figwidth() * 13 // width)))
    fig.legend(handles=handles, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def _save(fig: Any, output: str | os.PathLike[str], dpi: int) -> Path:
    out = Path(output)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _sharpness_tag(series: Series, prefix: str) -> str | None:
    """The panel a run's stability threshold belongs on: what its ``eos_ratio`` divides by the threshold."""
    for name in ("preconditioned_lambda_max", "eig_1", "lambda_max"):
        if prefix + name in series:
            return prefix + name
    return None


def _set_log_scale(ax: Any, values: list[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    elif finite:
        nonzero = [abs(v) for v in finite if v != 0]
        ax.set_yscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)


def plot(
    logdirs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] = "curves.png",
    tags: Sequence[str] | None = None,
    prefix: str | None = None,
    dpi: int = 120,
    *,
    logy: Sequence[str] | None = None,
    smoothing: float = 0.0,
) -> Path:
    """Draw the runs under ``logdirs`` into ``output`` (format from its suffix, e.g. ``.png``, ``.pdf``, ``.svg``).

    Args:
        logdirs: run directories or folders of runs.
        output: the image to write.
        tags: regular expressions (full match) of the tags to draw; default: losses and curvature scalars.
        prefix: the callback's ``log_prefix``; default: read from the tags.
        dpi: resolution.
        logy: log-scale y axes: ``[]`` for every panel, else the panels whose tag fully matches one of these
            regular expressions (symmetric log where values are not all positive); ``None``: linear.
        smoothing: TensorBoard-style exponential smoothing weight in [0, 1) (the raw values drawn faint), for series
            of at least :data:`SMOOTH_MIN_POINTS` points.

    Returns:
        The path written.

    Raises:
        CLIError: a ``logdir`` is missing or holds no event files, no scalar matches, a bad regular expression,
            or matplotlib is missing.
    """
    fig = scalars_figure(logdirs, tags, prefix, logy=logy, smoothing=smoothing)
    return _save(fig, output, dpi)


def scalars_figure(
    logdirs: Sequence[str | os.PathLike[str]],
    tags: Sequence[str] | None = None,
    prefix: str | None = None,
    *,
    logy: Sequence[str] | None = None,
    smoothing: float = 0.0,
) -> Any:
    """The matplotlib ``Figure`` :func:`plot` saves (arguments as there)."""
    if not 0.0 <= smoothing < 1.0:
        raise CLIError(f"--smooth must be in [0, 1), got {smoothing}")
    runs = [(label, read_scalars(run)) for label, run in _runs(logdirs)]
    all_tags = sorted({t for _, series in runs for t in series})
    prefixes = [prefix] if prefix is not None else (detect_prefixes(all_tags) or [DEFAULT_PREFIX])
    chosen = select_tags(all_tags, tags, prefixes, constant_tags([s for _, s in runs]))
    if not chosen:
        wanted = f"--tags {' '.join(tags)}" if tags else f"a loss or a {' or '.join(map(repr, prefixes))} scalar"
        raise CLIError(f"no scalar matches {wanted} (constant ones are left out unless named exactly); the runs "
                       f"have: {', '.join(all_tags) or 'no scalars'}")
    try:
        log_res = [re.compile(p) for p in logy or ()]
    except re.error as err:
        raise CLIError(f"bad --logy regular expression: {err}") from err

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig, axes = _figure(len(chosen))
    colors = _colors(len(runs))
    extras: dict[str, Any] = {}
    for ax, tag in zip(axes, chosen):
        drawn: list[float] = []
        for (_, series), color in zip(runs, colors):
            if tag not in series:
                continue
            steps, values = series[tag]
            marker = "." if len(steps) <= 60 else None
            if smoothing > 0 and len(steps) >= SMOOTH_MIN_POINTS:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, smooth(values, smoothing), color=color, marker=marker, markersize=3)
            else:
                ax.plot(steps, values, color=color, marker=marker)
            drawn += values
            stderr = series.get(tag + "_stderr")
            if stderr is not None and stderr[0] == steps:
                lo = [v - s for v, s in zip(values, stderr[1])]
                hi = [v + s for v, s in zip(values, stderr[1])]
                ax.fill_between(steps, lo, hi, color=color, alpha=0.2, linewidth=0)
                extras["band"] = Patch(color="0.5", alpha=0.35, label="± one standard error")
            for p in prefixes:
                threshold = series.get(f"{p}stability_threshold")
                if threshold is not None and tag == _sharpness_tag(series, p):
                    ax.plot(threshold[0], threshold[1], linestyle="--", linewidth=1.2, color=color)
                    drawn += threshold[1]
                    extras["threshold"] = Line2D([], [], linestyle="--", color="0.3",
                                                 label="stability threshold (2/lr for SGD), run colour")
        if any(tag == p + "eos_ratio" for p in prefixes):
            ax.axhline(1.0, linestyle=":", color="0.3", linewidth=1.2)
            drawn.append(1.0)
            extras["eos"] = Line2D([], [], linestyle=":", color="0.3", label="eos_ratio = 1: edge of stability")
        ax.set_title(tag, fontsize="medium")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel(tag, prefixes))
        ax.grid(True, alpha=0.3)
        if logy is not None and (not log_res or any(r.fullmatch(tag) for r in log_res)):
            _set_log_scale(ax, drawn)
    handles = [Line2D([], [], color=c, label=label) for (label, _), c in zip(runs, colors)]
    _legend(fig, handles + [extras[k] for k in ("threshold", "eos", "band") if k in extras])
    return fig


def plot_landscapes(
    logdirs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] = "landscape.png",
    step: int | None = None,
    dpi: int = 120,
) -> Path:
    """Draw the loss landscapes logged under ``logdirs`` into ``output``.

    1-D cuts of all runs overlaid (one panel per tag), 2-D surfaces one panel per run and tag; each at the last
    logged step, or the logged step nearest ``step``.

    Raises:
        CLIError: no landscape was logged, or as :func:`plot`.
    """
    return _save(landscapes_figure(logdirs, step), output, dpi)


def landscapes_figure(logdirs: Sequence[str | os.PathLike[str]], step: int | None = None) -> Any:
    """The matplotlib ``Figure`` :func:`plot_landscapes` saves."""
    from matplotlib.lines import Line2D

    from .landscape import draw_landscape

    runs = [(label, read_landscapes(run)) for label, run in _runs(logdirs)]
    tags = sorted({t for _, found in runs for t in found})
    if not tags:
        raise CLIError("no loss landscape logged (lightning_curvature.tensorboard.log_landscape) under "
                       + ", ".join(repr(str(d)) for d in logdirs))

    def pick(entries: list[tuple[int, Any]]) -> tuple[int, Any]:
        return entries[-1] if step is None else min(entries, key=lambda e: (abs(e[0] - step), e[0]))

    panels: list[tuple[str, list[tuple[str, int, Any]]]] = []
    for tag in tags:
        chosen = [(label, *pick(found[tag])) for label, found in runs if tag in found]
        cuts = [c for c in chosen if not c[2].is_surface]
        if cuts:
            panels.append((tag, cuts))
        panels += [(f"{tag}: {c[0]}" if len(runs) > 1 else tag, [c]) for c in chosen if c[2].is_surface]
    colors = dict(zip([label for label, _ in runs], _colors(len(runs))))
    fig, axes = _figure(len(panels), width=5.0, height=4.0)
    quadratic = False
    for ax, (title, entries) in zip(axes, panels):
        for label, s, landscape in entries:
            artist = draw_landscape(ax, landscape, color=colors[label])
            quadratic |= bool(landscape.curvatures)
            if landscape.is_surface:
                fig.colorbar(artist, ax=ax, label="loss")
                title += f" (step {s})"
        if not entries[0][2].is_surface:
            ax.grid(True, alpha=0.3)
            steps = {s for _, s, _ in entries}
            title += f" (step {steps.pop()})" if len(steps) == 1 else ""
        ax.set_title(title, fontsize="medium")
    handles: list[Any] = []
    if any(not c.is_surface for _, entries in panels for _, _, c in entries):
        handles += [Line2D([], [], color=colors[label], marker=".", label=label) for label, _ in runs]
    if quadratic:
        handles.append(Line2D([], [], linestyle="--", color="0.3",
                              label=r"quadratic model $L + \frac{1}{2}\lambda\alpha^2$ (dashed)"))
    _legend(fig, handles)
    return fig


# ---------------------------------------------------------------------------------------------------- command line
def _smoothing(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Tools for lightning-curvature runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "plot",
        help="draw loss and curvature against step from TensorBoard logs",
        description="Draw the loss and curvature scalars of every TensorBoard run under LOGDIR against the step: "
        "one panel per quantity, runs overlaid and labelled by what tells them apart (each directory with event "
        "files is a run). The stability threshold is drawn dashed on the sharpness panel, eos_ratio = 1 dotted, "
        "the trace's standard error as a band. With --landscape: the logged loss landscapes instead.",
    )
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="a run directory or a folder of runs")
    p.add_argument("-o", "--output", default=None,
                   help="image to write, format from the suffix (default: curves.png, with --landscape "
                   "landscape.png)")
    p.add_argument(
        "--tags", nargs="+", metavar="REGEX", default=None,
        help="scalar tags to draw, as regular expressions matching the whole tag (e.g. 'train/loss' "
        r"'curvature/eig_\d+'); default: every loss and curvature scalar that changes. A constant tag is drawn "
        "only when named exactly",
    )
    p.add_argument("--logy", nargs="*", metavar="REGEX", default=None,
                   help="log-scale y axes: alone for every panel, or the panels whose tag matches a REGEX "
                   "(symmetric log where values are not all positive)")
    p.add_argument("--smooth", type=_smoothing, default=0.0, metavar="W",
                   help="TensorBoard-style exponential smoothing weight in [0, 1), e.g. 0.6, for series of at least "
                   f"{SMOOTH_MIN_POINTS} points; the raw values are drawn faint (default: 0, none)")
    p.add_argument("--prefix", default=None,
                   help="the callback's log_prefix (default: read from the tags, each estimate logs "
                   "<prefix>num_hvps)")
    p.add_argument("--landscape", action="store_true",
                   help="draw the logged loss landscapes (1-D cuts, 2-D surfaces) instead of the scalars")
    p.add_argument("--step", type=int, default=None,
                   help="with --landscape: the logged step nearest to this one (default: the last)")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-curvature`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "plot":
            if args.landscape:
                out = plot_landscapes(args.logdirs, args.output or "landscape.png", step=args.step, dpi=args.dpi)
            else:
                out = plot(args.logdirs, args.output or "curves.png", tags=args.tags, prefix=args.prefix,
                           dpi=args.dpi, logy=args.logy, smoothing=args.smooth)
            print(f"wrote {out}")
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
