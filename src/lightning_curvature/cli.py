"""The ``lightning-curvature`` console command.

``lightning-curvature plot LOGDIR [LOGDIR ...] [-o curves.png] [--tags REGEX ...]`` reads the TensorBoard event files
of every run under each ``LOGDIR`` (recursively: each directory holding ``events.out.tfevents.*`` files is one run,
labelled by its path relative to ``LOGDIR``) with TensorBoard's own reader, and draws the loss and the curvature
scalars against the step, one subplot per quantity, runs overlaid, into one image. A run's
``curvature/stability_threshold`` (2/lr for SGD) is drawn dashed on its sharpness subplot, ``curvature/trace_stderr``
as a band around the trace.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

PROG = "lightning-curvature"
EVENTS_GLOB = "events.out.tfevents.*"
# Scalars of the callback left out of the default figure (ask for them with --tags): bookkeeping, the stderr (drawn as
# a band around the trace), lambda_max (= eig_1) and the stability threshold (drawn dashed on the sharpness subplot).
_NOT_BY_DEFAULT = ("num_hvps", "seconds", "trace_stderr", "loss", "eig_converged", "lambda_max", "stability_threshold")

Series = dict[str, tuple[list[int], list[float]]]  # tag -> (steps, values)


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit status 2."""


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Every directory under ``logdir`` (itself included) that holds TensorBoard event files, sorted."""
    root = Path(logdir)
    if not root.is_dir():
        raise CLIError(f"{str(logdir)!r} is not a directory")
    runs = {p.parent for p in root.rglob(EVENTS_GLOB) if p.is_file()}
    return sorted(runs)


def read_scalars(run_dir: str | os.PathLike[str]) -> Series:
    """All scalar series of one run directory, read with TensorBoard's ``EventAccumulator`` (no downsampling)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    out: Series = {}
    for tag in acc.Tags().get(SCALARS, []):
        # Several event files (e.g. a resumed run) may repeat steps: keep the last value written for each step.
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        steps = sorted(by_step)
        out[tag] = (steps, [by_step[s] for s in steps])
    return out


def select_tags(tags: Sequence[str], patterns: Sequence[str] | None, prefix: str) -> list[str]:
    """The tags to draw: those fully matching one of ``patterns`` or, by default, the losses and curvature scalars.

    By default: every tag containing ``loss`` that is not under ``prefix`` (``train/loss``, ``val/loss``, ...), then
    every ``{prefix}*`` tag except bookkeeping and tags drawn elsewhere (``num_hvps``, ``seconds``, ``loss``,
    ``eig_converged``, ``trace_stderr``, ``stability_threshold``, and ``lambda_max`` when ``eig_1`` is there), with
    ``eig_1`` ... ``eig_k`` in numeric order.
    """
    def key(tag: str) -> tuple[str, int, str]:
        m = re.fullmatch(r"(.*?)(\d+)", tag)
        return (m.group(1), int(m.group(2)), tag) if m else (tag, -1, tag)

    if patterns:
        try:
            regexes = [re.compile(p) for p in patterns]
        except re.error as err:
            raise CLIError(f"bad --tags regular expression: {err}") from err
        chosen = [t for t in tags if any(r.fullmatch(t) for r in regexes)]
        return sorted(chosen, key=lambda t: ([i for i, r in enumerate(regexes) if r.fullmatch(t)][0], key(t)))
    losses = sorted(t for t in tags if "loss" in t and not t.startswith(prefix))
    skip = set(_NOT_BY_DEFAULT) if f"{prefix}eig_1" in tags else set(_NOT_BY_DEFAULT) - {"lambda_max"}
    curvature = sorted((t for t in tags if t.startswith(prefix) and t[len(prefix):] not in skip), key=key)
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


def plot(
    logdirs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] = "curves.png",
    tags: Sequence[str] | None = None,
    prefix: str = "curvature/",
    dpi: int = 120,
) -> Path:
    """Draw the runs under ``logdirs`` into ``output`` (format from its suffix, e.g. ``.png``, ``.pdf``, ``.svg``).

    Returns:
        The path written.

    Raises:
        CLIError: a ``logdir`` is missing or holds no event files, no scalar matches, or matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise CLIError("plotting needs matplotlib: pip install 'lightning-curvature[examples]'") from err

    runs: list[tuple[str, Series]] = []
    for logdir in logdirs:
        found = find_runs(logdir)
        if not found:
            raise CLIError(f"no TensorBoard event files ({EVENTS_GLOB}) under {str(logdir)!r}")
        for run in found:
            rel = run.relative_to(logdir).as_posix()
            label = rel if len(logdirs) == 1 else (Path(logdir) / rel).as_posix()
            runs.append((label if label != "." else Path(logdir).resolve().name, read_scalars(run)))
    runs = list(zip(short_labels([label for label, _ in runs]), [series for _, series in runs]))
    all_tags = sorted({t for _, series in runs for t in series})
    chosen = select_tags(all_tags, tags, prefix)
    if not chosen:
        wanted = f"--tags {' '.join(tags)}" if tags else f"a loss or a {prefix!r} scalar"
        raise CLIError(f"no scalar matches {wanted}; the runs have: {', '.join(all_tags) or 'no scalars'}")

    ncols = min(3, len(chosen))
    nrows = -(-len(chosen) // ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.4 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, tag in zip(axes, chosen):
        for label, series in runs:
            if tag not in series:
                continue
            steps, values = series[tag]
            (line,) = ax.plot(steps, values, label=label, marker="." if len(steps) <= 60 else None)
            stderr = series.get(tag + "_stderr")
            if stderr is not None and stderr[0] == steps:
                lo = [v - s for v, s in zip(values, stderr[1])]
                hi = [v + s for v, s in zip(values, stderr[1])]
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
            threshold = series.get(f"{prefix}stability_threshold")
            if threshold is not None and tag in (f"{prefix}eig_1", f"{prefix}lambda_max"):
                ax.plot(threshold[0], threshold[1], linestyle="--", color=line.get_color(),
                        label=f"{label}: threshold")
        ax.set_title(tag)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if len(runs) > 1 or ax is axes[0]:
            ax.legend(fontsize="small")
    for ax in axes[len(chosen):]:
        ax.set_visible(False)
    out = Path(output)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Tools for lightning-curvature runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "plot",
        help="draw loss and curvature against step from TensorBoard logs",
        description="Draw the loss and curvature scalars of every TensorBoard run under LOGDIR against the step: "
        "one subplot per quantity, runs overlaid (each directory with event files is a run, labelled by its path "
        "relative to LOGDIR).",
    )
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="a run directory or a folder of runs")
    p.add_argument("-o", "--output", default="curves.png", help="image to write (default: %(default)s)")
    p.add_argument(
        "--tags", nargs="+", metavar="REGEX", default=None,
        help="scalar tags to draw, as regular expressions matching the whole tag (e.g. 'train/loss' "
        "'curvature/eig_.*'); default: every loss and every curvature scalar",
    )
    p.add_argument("--prefix", default="curvature/", help="the callback's log_prefix (default: %(default)s)")
    p.add_argument("--dpi", type=int, default=120, help="resolution (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-curvature`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "plot":
            out = plot(args.logdirs, args.output, tags=args.tags, prefix=args.prefix, dpi=args.dpi)
            print(f"wrote {out}")
    except CLIError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
