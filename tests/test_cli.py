"""`lightning-curvature plot`: reads TensorBoard runs, writes one figure a researcher keeps, fails clearly.

Figures are checked through the matplotlib Figure (titles, y labels, legend entries, reference lines, scales) that
`scalars_figure` returns and `plot` saves.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_curvature.cli import (  # noqa: E402
    constant_tags,
    detect_prefixes,
    landscapes_figure,
    main,
    read_scalars,
    scalars_figure,
    select_tags,
    short_labels,
    smooth,
    ylabel,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root: Path, name: str, lr: float, steps: int = 30, every: int = 5, prefix: str = "curvature/") -> Path:
    logger = TensorBoardLogger(root, name=name, version="")
    for step in range(steps):
        logger.log_metrics({"train/loss": 2.0 / (1 + step * lr)}, step=step)
        if step % every == 0:
            metrics = {
                "eig_1": 1.0 + step * lr,
                "eig_2": 0.5 + step * lr,
                "eig_10": 0.1 + step,
                "eig_converged": 1.0,
                "trace": 10.0 + step,
                "trace_stderr": 0.5,
                "num_hvps": 40.0,
                "seconds": 0.01 * (1 + step),
                "loss": 2.0 / (1 + step * lr),
                "stability_threshold": 2.0 / lr,
                "eos_ratio": (1.0 + step * lr) * lr / 2.0,
            }
            logger.log_metrics({prefix + k: v for k, v in metrics.items()}, step=step)
    logger.finalize("success")
    return Path(logger.log_dir)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    _write_run(root / "0", "tensorboard/experiment=gd,model.lr=0.1", lr=0.1)
    _write_run(root / "1", "tensorboard/experiment=gd,model.lr=0.2", lr=0.2)
    return root


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_writes_png(sweep, tmp_path, capsys):
    out = tmp_path / "figs" / "curves.png"
    assert main(["plot", str(sweep), "-o", str(out)]) == 0
    assert _is_png(out)
    assert str(out) in capsys.readouterr().out


def test_plot_several_logdirs_and_tags(sweep, tmp_path):
    run = next(sweep.rglob("events.out.tfevents.*")).parent
    out = tmp_path / "eig.png"
    assert main(["plot", str(run), str(sweep / "1"), "-o", str(out), "--tags", "curvature/eig_.*", "train/loss"]) == 0
    assert _is_png(out)


def test_read_scalars(sweep):
    run = next((sweep / "0").rglob("events.out.tfevents.*")).parent
    series = read_scalars(run)
    steps, values = series["curvature/eig_1"]
    assert steps == [0, 5, 10, 15, 20, 25]
    assert values[1] == pytest.approx(1.5)
    assert series["train/loss"][0] == list(range(30))


def test_default_tags_are_losses_then_curvature():
    tags = ["epoch", "train/loss", "val/loss", "train/acc", "curvature/eig_10", "curvature/eig_2", "curvature/eig_1",
            "curvature/trace", "curvature/trace_stderr", "curvature/seconds", "curvature/num_hvps", "curvature/loss",
            "curvature/lambda_max", "curvature/stability_threshold", "curvature/eos_ratio",
            "curvature/eig_converged"]
    assert select_tags(tags, None, "curvature/") == [
        "train/loss", "val/loss", "curvature/eig_1", "curvature/eig_2", "curvature/eig_10", "curvature/eos_ratio",
        "curvature/trace",
    ]
    no_eigs = ["train/loss", "curvature/lambda_max", "curvature/stability_threshold"]
    assert select_tags(no_eigs, None, "curvature/") == ["train/loss", "curvature/lambda_max"]
    assert select_tags(tags, ["curvature/trace.*", "train/loss"], "curvature/") == [
        "curvature/trace", "curvature/trace_stderr", "train/loss",
    ]
    assert select_tags(tags, None, "hess/") == ["curvature/loss", "train/loss", "val/loss"]


def test_constant_tags_are_left_out_unless_named_exactly():
    tags = ["train/loss", "curvature/eig_1", "curvature/eig_2", "curvature/eig_converged", "curvature/eos_ratio"]
    runs = [
        {"curvature/eig_converged": ([0, 5], [1.0, 1.0]), "curvature/eig_2": ([0, 5], [2.0, 2.0]),
         "curvature/eig_1": ([0, 5], [1.0, 3.0]), "curvature/eos_ratio": ([0], [0.5])},
        {"curvature/eig_converged": ([0, 5], [1.0, 1.0]), "curvature/eig_2": ([0, 5], [3.0, 3.0])},
    ]
    constant = constant_tags(runs)
    assert constant == {"curvature/eig_converged"}  # eig_2 differs between runs; one point is not a flat line
    # the README's `'curvature/eig_.*'`: no flat eig_converged panel
    assert select_tags(tags, ["curvature/eig_.*"], "curvature/", constant) == ["curvature/eig_1", "curvature/eig_2"]
    assert select_tags(tags, ["curvature/eig_converged"], "curvature/", constant) == ["curvature/eig_converged"]
    assert select_tags(tags, [r"curvature/eig_converged"], "curvature/", constant) == ["curvature/eig_converged"]
    assert "train/loss" not in select_tags(tags, None, "curvature/", {"train/loss"})


def test_prefix_detection_and_several_prefixes():
    tags = ["train/loss", "hessian/num_hvps", "hessian/eig_1", "hessian/lambda_max", "ggn/num_hvps", "ggn/trace"]
    assert detect_prefixes(tags) == ["ggn/", "hessian/"]
    assert detect_prefixes(["train/loss"]) == []
    assert select_tags(tags, None, detect_prefixes(tags)) == ["train/loss", "ggn/trace", "hessian/eig_1"]


def test_ylabels_say_what_the_quantity_is():
    p = ["curvature/"]
    assert ylabel("curvature/eig_1", p) == r"$\lambda_{1}$ (sharpness)"
    assert ylabel("curvature/eig_12", p) == r"$\lambda_{12}$"
    assert ylabel("curvature/eos_ratio", p) == "sharpness / stability threshold"
    assert ylabel("curvature/trace", p) == r"$\mathrm{tr}(H)$"
    assert ylabel("curvature/trace/net.0", p) == r"$\mathrm{tr}(H)$ of the block"
    assert ylabel("curvature/something_new", p) == "something_new"
    assert ylabel("train/loss_epoch", p) == "loss" and ylabel("val/acc", p) == "accuracy"


def test_smooth_is_tensorboards_debiased_average():
    assert smooth([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])  # debiased: no pull towards 0
    assert smooth([1.0, 2.0], 0.0) == [1.0, 2.0]
    out = smooth([1.0, float("nan"), 1.0], 0.5)
    assert out[0] == out[2] == pytest.approx(1.0) and out[1] != out[1]


def _legend_texts(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def _axes(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}


def test_figure_reads_at_a_glance(sweep):
    fig = scalars_figure([sweep])
    axes = _axes(fig)
    # constant eig_converged left out, eig_10 (changes) kept; bookkeeping left out
    assert list(axes) == ["train/loss", "curvature/eig_1", "curvature/eig_2", "curvature/eig_10",
                          "curvature/eos_ratio", "curvature/trace"]
    assert all(ax.get_ylabel() for ax in axes.values())
    texts = _legend_texts(fig)
    # runs labelled by what differs; the threshold, eos = 1 and the band once each, whatever the number of runs
    assert texts[:2] == ["0/model.lr=0.1", "1/model.lr=0.2"]
    assert sum("threshold" in t for t in texts) == 1 and sum("eos_ratio = 1" in t for t in texts) == 1
    assert sum("standard error" in t for t in texts) == 1
    # the legend is the figure's, below the panels: no axes has one
    assert all(ax.get_legend() is None for ax in fig.axes)
    # eos_ratio = 1 is drawn and in view
    eos = axes["curvature/eos_ratio"]
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in eos.get_lines())
    assert eos.get_ylim()[1] >= 1.0
    # one dashed threshold line per run on the sharpness panel, at 2/lr
    dashed = [line for line in axes["curvature/eig_1"].get_lines() if line.get_linestyle() == "--"]
    assert sorted(set(line.get_ydata()[0] for line in dashed)) == pytest.approx([10.0, 20.0])
    assert all(ax.get_yscale() == "linear" for ax in axes.values())


def test_figure_log_scale_smoothing_and_single_run_label(sweep):
    run = next((sweep / "1").rglob("events.out.tfevents.*")).parent
    fig = scalars_figure([sweep / "1"], logy=["train/loss"], smoothing=0.6)
    axes = _axes(fig)
    assert axes["train/loss"].get_yscale() == "log" and axes["curvature/eig_1"].get_yscale() == "linear"
    assert _legend_texts(fig)[0] == "1/experiment=gd,model.lr=0.2"  # a single run: its folders, not "tensorboard"
    loss_lines = axes["train/loss"].get_lines()
    assert len(loss_lines) == 2 and loss_lines[0].get_alpha() == 0.25  # raw (faint) and smoothed (30 points)
    assert len([ln for ln in axes["curvature/eig_1"].get_lines() if ln.get_linestyle() != "--"]) == 1  # 6 points
    assert _legend_texts(scalars_figure([run]))[0] == "experiment=gd,model.lr=0.2"
    fig = scalars_figure([sweep], logy=[])
    assert all(ax.get_yscale() == "log" for ax in _axes(fig).values())


def test_custom_prefix_is_detected(tmp_path, capsys):
    _write_run(tmp_path, "tensorboard", lr=0.1, prefix="hessian/")
    axes = _axes(scalars_figure([tmp_path]))
    assert {"hessian/eig_1", "hessian/eos_ratio", "hessian/trace"} <= set(axes)
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path), "--smooth", "1.5"])
    assert "--smooth: must be in [0, 1)" in capsys.readouterr().err


def test_short_labels():
    labels = ["0/tensorboard/experiment=gd,model.lr=0.1", "1/tensorboard/experiment=gd,model.lr=0.2"]
    assert short_labels(labels) == ["0/model.lr=0.1", "1/model.lr=0.2"]
    assert short_labels(["tensorboard"]) == ["tensorboard"]
    assert short_labels(["a/x", "a/x"]) == ["a/x", "a/x"]


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("lightning-curvature plot: error: ")
    return lines[0]


def test_plot_fails_clearly_without_event_files(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no events here")
    out = tmp_path / "curves.png"
    assert main(["plot", str(tmp_path / "empty"), "-o", str(out)]) == 2
    assert "no TensorBoard event files" in _one_line_error(capsys)
    assert not out.exists()


def test_plot_fails_clearly_on_missing_dir_and_unmatched_tags(sweep, tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in _one_line_error(capsys)
    assert main(["plot", str(sweep), "-o", str(tmp_path / "x.png"), "--tags", "nothing/.*"]) == 2
    assert "no scalar matches" in _one_line_error(capsys)
    assert main(["plot", str(sweep), "-o", str(tmp_path / "x.png"), "--tags", "("]) == 2
    assert "bad --tags regular expression" in _one_line_error(capsys)


def test_console_script(tmp_path):
    script = shutil.which("lightning-curvature", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the package is not installed (pip install -e .)")
    proc = subprocess.run([script, "plot", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no TensorBoard event files" in proc.stderr


@pytest.fixture(scope="module")
def landscapes(tmp_path_factory) -> Path:
    """Two runs with 1-D cuts at steps 0 and 10 and one 2-D surface, written by log_landscape (data only)."""
    import torch

    from lightning_curvature.landscape import loss_cut, loss_surface
    from lightning_curvature.tensorboard import log_landscape

    root = tmp_path_factory.mktemp("landscapes")
    eye = torch.eye(2, dtype=torch.float64)
    for lr, sharpness in ((0.1, 4.0), (0.2, 9.0)):
        a = torch.diag(torch.tensor([sharpness, 1.0], dtype=torch.float64))
        params = {"w": torch.zeros(2, dtype=torch.float64)}
        logger = TensorBoardLogger(root, name="tensorboard", version=f"model.lr={lr}")
        for step in (0, 10):
            scale = 1 + step / 10
            cut = loss_cut(lambda p, a=a, s=scale: 0.5 * s * p["w"] @ a @ p["w"], params, eye[0], [-1, -0.5, 0, 0.5, 1],
                           curvature=sharpness * scale)
            log_landscape(logger, "curvature/landscape", cut, step, image=False)
        surface = loss_surface(lambda p, a=a: 0.5 * p["w"] @ a @ p["w"], params, eye, [-1.0, 0.0, 1.0],
                               curvatures=[sharpness, 1.0])
        log_landscape(logger, "curvature/landscape_2d", surface, 10, image=False)
        logger.finalize("success")
    return root


def test_plot_landscape_overlays_cuts_and_draws_surfaces(landscapes, tmp_path, capsys):
    fig = landscapes_figure([landscapes])
    titles = [ax.get_title() for ax in fig.axes if ax.get_xlabel()]
    assert titles == ["curvature/landscape (step 10)", "curvature/landscape_2d: model.lr=0.1 (step 10)",
                      "curvature/landscape_2d: model.lr=0.2 (step 10)"]
    cut_ax = fig.axes[0]
    solid = [ln for ln in cut_ax.get_lines() if ln.get_linestyle() == "-"]
    assert [list(ln.get_ydata()) for ln in solid] == [[4.0, 1.0, 0.0, 1.0, 4.0], [9.0, 2.25, 0.0, 2.25, 9.0]]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts[:2] == ["model.lr=0.1", "model.lr=0.2"] and "quadratic model" in texts[2]
    first = landscapes_figure([landscapes / "tensorboard" / "model.lr=0.1"], step=3)
    first_cut = [ln for ln in first.axes[0].get_lines() if ln.get_linestyle() == "-"]
    assert list(first_cut[0].get_ydata()) == [2.0, 0.5, 0.0, 0.5, 2.0]  # step 0, the nearest to 3
    out = tmp_path / "landscape.png"
    assert main(["plot", str(landscapes), "--landscape", "-o", str(out)]) == 0
    assert _is_png(out) and str(out) in capsys.readouterr().out


def test_plot_landscape_fails_clearly_without_landscapes(sweep, tmp_path, capsys):
    assert main(["plot", str(sweep), "--landscape", "-o", str(tmp_path / "l.png")]) == 2
    assert "no loss landscape logged" in _one_line_error(capsys)
