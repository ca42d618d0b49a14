"""End to end: examples/train.py (Hydra), its TensorBoard logs (files, server, plot), bad overrides, LightningCLI."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("hydra")
pytest.importorskip("sklearn")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
CLI = ROOT / "examples" / "cli.py"
CURVATURE_TAGS = ("curvature/eig_1", "curvature/eig_2", "curvature/eig_3", "curvature/trace")
EXAMPLE_STEPS = 30


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest and robust to busy cores
    return env


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _event_dirs(root: Path) -> list[Path]:
    return sorted({p.parent for p in root.rglob("events.out.tfevents.*")})


def _read(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    acc = _read(run_dir)
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="session")
def example_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The README's main job, shortened: one run of examples/train.py shared by the tests that read its logs."""
    run_dir = tmp_path_factory.mktemp("example") / "run"
    proc = _run(
        [str(TRAIN), f"trainer.max_steps={EXAMPLE_STEPS}", "trainer.enable_progress_bar=false",
         "logger=[tensorboard,csv]", f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_example_logs_loss_and_curvature_at_the_same_steps(example_run):
    run_dir, proc = example_run
    (events,) = _event_dirs(run_dir)
    assert events.parent == run_dir / "tensorboard"
    scalars = _scalars(events)
    loss = scalars["train/loss"]
    assert sorted(loss) == list(range(EXAMPLE_STEPS))
    for tag in CURVATURE_TAGS:
        assert sorted(scalars[tag]) == [0, 10, 20], tag
        assert set(scalars[tag]) <= set(loss)
    assert scalars["curvature/eig_1"][0] >= scalars["curvature/eig_2"][0] >= scalars["curvature/eig_3"][0] > 0
    assert "custom_scalars__config__" in _read(events).Tags()["tensors"]  # the Custom Scalars layout
    # what the script prints
    assert "tensorboard --logdir" in proc.stdout and "lightning-curvature plot" in proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_example_csv_logger_gets_the_same_keys(example_run):
    run_dir, _ = example_run
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    steps = {int(r["step"]) for r in rows if r.get("curvature/eig_1")}
    assert steps == {0, 10, 20}


def test_plot_command_on_example_logs(example_run, tmp_path):
    from lightning_curvature.cli import main

    run_dir, _ = example_run
    out = tmp_path / "curves.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read().decode())


@pytest.mark.slow
def test_tensorboard_server_serves_curvature_tags(example_run):
    run_dir, _ = example_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
         "--port", str(port), "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
    )
    try:
        deadline = time.monotonic() + 60
        tags: dict = {}
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"tensorboard exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            try:
                tags = _get_json(f"{base}/data/plugin/scalars/tags")
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                tags = {}
            if any(set(CURVATURE_TAGS) <= set(t) for t in tags.values()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"tensorboard did not serve the curvature tags within 60 s; last answer: {tags}")

        (run,) = [r for r, t in tags.items() if "curvature/eig_1" in t]
        assert run.startswith("tensorboard")

        def series(tag: str) -> dict[int, float]:
            query = urllib.parse.urlencode({"tag": tag, "run": run})
            return {int(step): value for _, step, value in _get_json(f"{base}/data/plugin/scalars/scalars?{query}")}

        loss = series("train/loss")
        eig = series("curvature/eig_1")
        assert sorted(eig) == [0, 10, 20] and set(eig) <= set(loss)
        layout = _get_json(f"{base}/data/plugin/custom_scalars/layout")
        charts = {c["title"]: c for cat in layout["category"] for c in cat["chart"]}
        assert {"loss", "sharpness and stability threshold", "Hessian trace ± standard error"} <= set(charts)
        assert charts["Hessian trace ± standard error"]["margin"]["series"][0]["lower"] == "curvature/trace_lower"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stderr:
            proc.stderr.close()


def test_fullbatch_gd_sweep_over_lr(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _run(
        [str(TRAIN), "-m", "experiment=fullbatch_gd", "model.lr=0.2,0.4", "trainer.max_steps=6",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _event_dirs(sweep_dir)
    assert [r.relative_to(sweep_dir).parts[0] for r in runs] == ["0", "1"]
    for run, lr in zip(runs, (0.2, 0.4)):
        assert f"model.lr={lr}" in run.name  # each run is labelled by its overrides
        scalars = _scalars(run)
        assert sorted(scalars["curvature/eig_1"]) == [0, 5]
        # the sharpness is read against gradient descent's stability threshold 2/lr
        assert list(scalars["curvature/stability_threshold"].values()) == pytest.approx([2 / lr, 2 / lr])
        eos = scalars["curvature/eos_ratio"]
        assert eos[5] == pytest.approx(scalars["curvature/eig_1"][5] * lr / 2, rel=1e-5)
    assert "tensorboard --logdir sweep\n" in proc.stdout  # the sweep folder, relative to the working directory


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("callbacks.curvature.top_kk=3", "Key 'top_kk' not in 'CurvatureMonitorConfig'"),
        ("callbacks.curvature.top_k=three", "Value 'three' of type 'str' could not be converted to Integer"),
        ("callbacks.curvature.every_n_train_steps=-1",
         "error: callbacks.curvature: `every_n_train_steps` must be an integer >= 1, got -1."),
    ],
)
def test_bad_override_exits_with_a_short_reason(override, reason, tmp_path):
    proc = _run([str(TRAIN), override, "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and "Traceback" not in proc.stdout
    assert reason in err.splitlines(), err
    assert len(err.splitlines()) <= 8, err  # Hydra adds full_key, object_type and a HYDRA_FULL_ERROR hint


def test_lightning_cli_with_curvature_monitor(tmp_path):
    proc = _run(
        [str(CLI), "fit", "--trainer.max_steps=5", "--trainer.enable_progress_bar=false",
         "--trainer.callbacks+=lightning_curvature.CurvatureMonitor", "--trainer.callbacks.every_n_train_steps=2",
         "--trainer.callbacks.top_k=2", f"--trainer.default_root_dir={tmp_path}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (events,) = _event_dirs(tmp_path)
    scalars = _scalars(events)
    for tag in ("curvature/eig_1", "curvature/eig_2", "curvature/trace"):
        assert sorted(scalars[tag]) == [0, 2, 4], tag
        assert set(scalars[tag]) <= set(scalars["train/loss"])
    config = (events / "config.yaml").read_text()
    assert "class_path: lightning_curvature" in config and "every_n_train_steps: 2" in config
