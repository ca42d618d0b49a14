"""A real 2-process DDP run on CPU (gloo), launched as Lightning launches it, against a single-process run."""

import csv
import os
import subprocess
import sys

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy

from lightning_curvature.callback import check_strategy

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_run.py")


_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(kind, data)``: the logged rows of one run, each run made once per test session."""

    def get(kind, data):
        if (kind, data) not in _RUNS:
            _RUNS[kind, data] = _run(tmp_path_factory.mktemp(f"{kind}-{data}"), kind, data)
        return _RUNS[kind, data]

    return get


def _run(out, kind, data):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(out), kind, data], capture_output=True, text=True, timeout=300,
                          env=env, cwd=out)
    # torch/gloo occasionally abort at process exit after a complete run (rc -6, "terminate called without an active
    # exception"), with or without the callback: judge the run by its own completion line and by what it logged
    assert "FIT COMPLETE" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    with open(os.path.join(out, kind, "version_0", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("curvature/trace")]
    return {int(r["step"]): r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("data", ["current", "fixed"])
def test_ddp_matches_single_process_on_the_concatenated_batch(runs, data):
    single = runs("single", data)
    ddp = runs("ddp", data)
    assert sorted(single) == sorted(ddp) == [0, 2, 4]
    keys = ["curvature/loss", "curvature/eig_1", "curvature/eig_2", "curvature/lambda_max", "curvature/lambda_min",
            "curvature/trace", "curvature/grad_curvature", "curvature/eos_ratio"]
    for step in single:
        # step 0: the same weights, float64 products, only the order of the all-reduce sums differs. Later steps:
        # DDP's float32 gradient all-reduce leaves the weights ~1e-7 apart from the single process's.
        rel = 1e-9 if step == 0 else 1e-4
        for k in keys:
            a, b = float(single[step][k]), float(ddp[step][k])
            assert a == pytest.approx(b, rel=rel, abs=1e-12), (step, k, a, b)
    assert single[0]["curvature/num_hvps"] == ddp[0]["curvature/num_hvps"]
    # only rank zero wrote: one CSV, each estimate once
    assert len(ddp) == 3


@pytest.mark.slow
def test_ddp_spawn_pickles_the_callback_and_matches_ddp(runs):
    ddp = runs("ddp", "current")
    spawn = runs("ddp_spawn", "current")
    assert sorted(spawn) == [0, 2, 4]
    for step in spawn:
        for k in ("curvature/eig_1", "curvature/trace", "curvature/lambda_min"):
            assert float(spawn[step][k]) == pytest.approx(float(ddp[step][k]), rel=1e-9), (step, k)


def test_sharded_strategies_are_refused_with_what_is_supported():
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    with pytest.raises(ValueError, match=r"does not support FSDPStrategy.*Supported: single device.*DDP"):
        check_strategy(FSDPStrategy())
    with pytest.raises(ValueError, match="does not support DeepSpeedStrategy"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy))
