"""`lightning-curvature plot`: reads TensorBoard runs, writes one figure, fails clearly without event files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_curvature.cli import main, read_scalars, select_tags, short_labels  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(root: Path, name: str, lr: float, steps: int = 30, every: int = 5) -> Path:
    logger = TensorBoardLogger(root, name=name, version="")
    for step in range(steps):
        logger.log_metrics({"train/loss": 2.0 / (1 + step * lr)}, step=step)
        if step % every == 0:
            logger.log_metrics(
                {
                    "curvature/eig_1": 1.0 + step * lr,
                    "curvature/eig_2": 0.5 + step * lr,
                    "curvature/eig_10": 0.1,
                    "curvature/trace": 10.0 + step,
                    "curvature/trace_stderr": 0.5,
                    "curvature/num_hvps": 40.0,
                    "curvature/seconds": 0.01,
                    "curvature/loss": 2.0 / (1 + step * lr),
                    "curvature/stability_threshold": 2.0 / lr,
                    "curvature/eos_ratio": (1.0 + step * lr) * lr / 2.0,
                },
                step=step,
            )
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
