"""End to end: examples/train.py (Hydra), its TensorBoard logs (files, server, plot), run names, the objective a
sweeper optimises, the printed commands and scripts/ wrappers, one-line errors, LightningCLI."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hydra")
pytest.importorskip("sklearn")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
CLI = ROOT / "examples" / "cli.py"
CURVATURE_TAGS = ("curvature/eig_1", "curvature/eig_2", "curvature/eig_3", "curvature/trace")
EXAMPLE_STEPS = 30
# A realistic command line: more than 255 characters of overrides, a value with "/" (all values are the defaults, so
# the run is the README's main job, shortened). Joined as one folder name (Hydra's override_dirname) it was too long.
EXAMPLE_OVERRIDES = [
    f"trainer.max_steps={EXAMPLE_STEPS}", "trainer.enable_progress_bar=false", "logger=[tensorboard,csv]",
    "callbacks.curvature.log_prefix=curvature/", "callbacks.curvature.num_probes=20",
    "callbacks.curvature.trace_rtol=0.05", "callbacks.curvature.max_iter=100", "callbacks.curvature.tol=0.001",
    "callbacks.curvature.seed=0", "model.momentum=0.0", "model.weight_decay=0.0", "data.val_fraction=0.2",
    "data.seed=0",
]


def _load_train_module():
    spec = importlib.util.spec_from_file_location("lc_example_train", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_module():
    return _load_train_module()


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
    assert len(",".join(EXAMPLE_OVERRIDES)) > 255
    proc = _run([str(TRAIN), *EXAMPLE_OVERRIDES, f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
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


def test_example_run_name_is_short_and_safe_and_keeps_the_overrides(example_run):
    run_dir, _ = example_run
    (events,) = _event_dirs(run_dir)
    name = events.name
    assert events.parent.name == "tensorboard" and len(name) <= 80
    assert name.startswith("trainer.max_steps=30,trainer.enable_progress_bar=false__")  # whole overrides only
    assert name.endswith("__" + hashlib.sha1(",".join(EXAMPLE_OVERRIDES).encode()).hexdigest()[:8])
    # the full overrides: in the logger's hparams and TensorBoard's Text tab
    hparams = yaml.safe_load((events / "hparams.yaml").read_text())
    assert hparams["overrides"] == EXAMPLE_OVERRIDES and hparams["lr"] == 0.1  # the model's own hparams too
    (text,) = _read(events).Tensors("run/command/text_summary")
    command = text.tensor_proto.string_val[0].decode()
    assert "python examples/train.py" in command and "callbacks.curvature.log_prefix=curvature/" in command


def test_example_returns_the_objective_at_the_final_weights(example_run):
    run_dir, proc = example_run
    (events,) = _event_dirs(run_dir)
    val = _scalars(events)["val/loss"]
    assert max(val) == EXAMPLE_STEPS  # validated again at the last step (the last epoch ended at step 23)
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("objective: ")]
    assert line == f"objective: val/loss = {val[EXAMPLE_STEPS]:.6g}"


def test_printed_plot_command_runs_in_this_shell(example_run, tmp_path):
    run_dir, proc = example_run
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("or plot them:")]
    args = shlex.split(line.split(":", 1)[1])
    args[args.index("-o") + 1] = str(tmp_path / "printed.png")
    (tb,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("view them with:")]
    tb_exe = shlex.split(tb.split(":", 1)[1])[0]
    for exe in (args[0], tb_exe):
        assert shutil.which(exe) or Path(run_dir.parent, exe).is_file(), exe  # on PATH, or a path
    done = subprocess.run(args, cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "printed.png").read_bytes()[:4] == b"\x89PNG"


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
    """Also as scripts/train.sh runs it from the repository root: the printed commands are the wrappers."""
    sweep_dir = tmp_path / "sweep"
    env = {"LIGHTNING_CURVATURE_SCRIPTS": str(ROOT / "scripts"), "LIGHTNING_CURVATURE_CWD": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(TRAIN), "-m", "experiment=fullbatch_gd", "trainer.max_steps=6", "model.lr=0.2,0.4",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, env=_env() | env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _event_dirs(sweep_dir)
    assert [r.relative_to(sweep_dir).parts[0] for r in runs] == ["0", "1"]
    for run, lr in zip(runs, (0.2, 0.4)):
        # each run is labelled by its overrides, the swept one first
        assert run.name == f"model.lr={lr},experiment=fullbatch_gd,trainer.max_steps=6"
        scalars = _scalars(run)
        assert sorted(scalars["curvature/eig_1"]) == [0, 5]
        # the sharpness is read against gradient descent's stability threshold 2/lr
        assert list(scalars["curvature/stability_threshold"].values()) == pytest.approx([2 / lr, 2 / lr])
        eos = scalars["curvature/eos_ratio"]
        assert eos[5] == pytest.approx(scalars["curvature/eig_1"][5] * lr / 2, rel=1e-5)
    # paths relative to the user's folder where below it, else absolute
    assert f"view them with:  scripts/tensorboard.sh --logdir {sweep_dir}\n" in proc.stdout
    assert f"or plot them:    scripts/plot.sh {sweep_dir} -o curves.png\n" in proc.stdout


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


SETUP_ERROR = [
    "callbacks.curvature.metrics=[trace,layers]", "callbacks.curvature.modules=[nope]", "trainer.max_steps=2",
    "trainer.enable_progress_bar=false",
]


def test_setup_error_of_the_callback_is_one_line(tmp_path):
    proc = _run([str(TRAIN), *SETUP_ERROR, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    assert err[0].startswith("error: callbacks.curvature: CurvatureMonitor: no module with trainable parameters "
                             "matches 'nope'. Available: ")


@pytest.mark.slow
def test_setup_error_with_hydra_full_error_keeps_the_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TRAIN), *SETUP_ERROR, f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
        env=_env() | {"HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "select_blocks" in proc.stderr and "ValueError: CurvatureMonitor" in (
        proc.stderr)


def test_setup_error_source_only_for_config_errors_of_the_callbacks(train_module):
    class Hooked:
        def setup(self, fail):
            raise fail

        def on_train_batch_end(self, fail):
            raise fail

    hooked, other = Hooked(), Hooked()

    def caught(hook, err):
        try:
            hook(err)
        except Exception as raised:
            return train_module.setup_error_source(raised, {"callbacks.a": hooked})

    assert caught(hooked.setup, ValueError("bad module")) == "callbacks.a"
    assert caught(hooked.setup, TypeError("bad type")) == "callbacks.a"
    assert caught(hooked.setup, RuntimeError("a bug")) is None  # keeps its traceback
    assert caught(hooked.on_train_batch_end, ValueError("in training")) is None
    assert caught(other.setup, ValueError("someone else's")) is None


def test_run_name_is_short_safe_and_unique(train_module):
    run_name = train_module.run_name
    assert run_name([]) == ""
    assert run_name(["model.lr=0.1"]) == "model.lr=0.1"
    assert run_name(["callbacks.curvature.log_prefix=hessian/", "~callbacks", "+trainer.x='a b'"]) == (
        "callbacks.curvature.log_prefix=hessian_,_callbacks,+trainer.x=_a_b_")
    assert run_name(["a=1", "model.lr=0.2", "b=2"], varying={"model.lr"}) == "model.lr=0.2,a=1,b=2"
    assert run_name([".hidden=1"]) == "hidden=1"
    assert run_name(["model.lr=0.18066694308916498", "a=0.25", "b=1e-05", "c=1.0000001"]) == (
        "model.lr=0.1807,a=0.25,b=1e-05,c=1")
    many = [f"callbacks.curvature.option_{i}=value/{i}" for i in range(40)]
    names = {run_name(many[:k]) for k in range(30, 40)}
    assert len(names) == 10 and all(len(n) <= 80 and "/" not in n for n in names)
    assert run_name(["x=" + "é" * 300]).isascii() and len(run_name(["x=" + "y" * 300])) == 80
    with pytest.raises(ValueError):
        run_name(["a=1"], max_len=3)
    # run_name=<name> on the command line instead of auto: used as given, sanitised
    from omegaconf import OmegaConf

    assert train_module.job_run_name(OmegaConf.create({"run_name": "base line/1"}), None) == "base_line_1"
    assert train_module.job_run_name(OmegaConf.create({"run_name": ""}), None) == ""


def test_printed_command_is_the_one_the_users_shell_finds(train_module, monkeypatch, tmp_path):
    bindir = Path(sys.executable).parent
    monkeypatch.delenv("LIGHTNING_CURVATURE_SCRIPTS", raising=False)
    if (bindir / "tensorboard").is_file():
        monkeypatch.setenv("PATH", str(bindir))
        assert train_module.command("tensorboard", "tensorboard.main") == "tensorboard"
        monkeypatch.setenv("PATH", str(tmp_path))  # e.g. the venv of scripts/train.sh, not activated here
        printed = train_module.command("tensorboard", "tensorboard.main")
        assert Path(printed).resolve() == (bindir / "tensorboard").resolve()
    interpreter, _, module = train_module.command("no-such-tool", "x.y").partition(" -m ")
    assert Path(shlex.split(interpreter)[0]).resolve() == Path(sys.executable).resolve() and module == "x.y"
    monkeypatch.setenv("LIGHTNING_CURVATURE_SCRIPTS", str(ROOT / "scripts"))
    assert train_module.command("tensorboard", "tensorboard.main", str(ROOT)) == "scripts/tensorboard.sh"
    assert train_module.command("lightning-curvature", "m", str(ROOT / "scripts")) == "./plot.sh"


def _fake_venv_checkout(tmp_path: Path) -> Path:
    """A copy of scripts/ and pyproject.toml whose .venv is already bootstrapped and has echoing tools."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    bindir = repo / ".venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    (bindir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    for tool in ("tensorboard", "lightning-curvature"):
        (bindir / tool).write_text(f'#!/bin/sh\necho "{tool} in $PWD: $*"\n')
    for exe in bindir.iterdir():
        exe.chmod(0o755)
    digest = hashlib.sha1((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    (repo / ".venv" / f".lc-installed-{digest}-examples").touch()
    return repo


@pytest.mark.parametrize(("script", "expected"), [
    ("tensorboard.sh", "tensorboard in {cwd}: --logdir outputs --port 6007"),
    ("plot.sh", "lightning-curvature in {cwd}: plot outputs --port 6007"),
])
def test_wrappers_run_the_venvs_tools_from_any_folder(tmp_path, script, expected):
    repo = _fake_venv_checkout(tmp_path)
    user = tmp_path / "elsewhere"
    user.mkdir()
    args = ["--logdir", "outputs", "--port", "6007"] if script == "tensorboard.sh" else ["outputs", "--port", "6007"]
    env = _env()
    env["PATH"] = "/usr/bin:/bin"  # no venv on the user's PATH
    done = subprocess.run(["bash", str(repo / "scripts" / script), *args], cwd=user, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected.format(cwd=user)  # arguments passed on, paths relative to the user


def test_train_sh_tells_the_example_where_the_user_is():
    text = (ROOT / "scripts" / "train.sh").read_text()
    assert 'export LIGHTNING_CURVATURE_CWD="$PWD"' in text and "LIGHTNING_CURVATURE_SCRIPTS" in text
    assert text.index("LIGHTNING_CURVATURE_CWD") < text.index("cd ")


def test_objective_value_names_the_logged_keys(train_module):
    assert train_module.objective_value({"val/loss": 0.5}, "val/loss") == 0.5
    with pytest.raises(KeyError, match="'curvature/lambda_max' was not logged; logged keys: train/loss, val/loss"):
        train_module.objective_value({"val/loss": 0.5, "train/loss": 0.7}, "curvature/lambda_max")


@pytest.mark.slow
def test_optuna_sweep_over_lr_minimises_the_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
    sweep_dir = tmp_path / "optuna"
    proc = _run(
        [str(TRAIN), "-m", "hydra/sweeper=lr_search", "hydra.sweeper.n_trials=2", "trainer.max_steps=11",
         "objective=curvature/lambda_max", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    objectives = [float(ln.rsplit("=", 1)[1]) for ln in proc.stdout.splitlines()
                  if ln.startswith("objective: curvature/lambda_max = ")]
    assert len(objectives) == 2 and results["best_value"] == pytest.approx(min(objectives), rel=1e-5)
    assert 0.01 <= results["best_params"]["model.lr"] <= 1.0
    runs = _event_dirs(sweep_dir)
    assert [r.relative_to(sweep_dir).parts[0] for r in runs] == ["0", "1"]
    assert all(re.fullmatch(r"model\.lr=[0-9.e-]{1,8},.*", r.name) for r in runs), runs  # searched key first, short


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
