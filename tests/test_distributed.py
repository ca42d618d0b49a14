"""A real 2-process DDP run on CPU (gloo), launched as Lightning launches it, against a single-process run."""

import csv
import os
import subprocess
import sys

import pytest
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)

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


@pytest.mark.slow
@pytest.mark.parametrize("flavour", ["fsdp2", "fsdp1"])
def test_fully_sharded_strategies_measure_the_global_batch_and_change_nothing(tmp_path, flavour):
    """2 processes, FSDP2 (fully_shard through ModelParallelStrategy) or FSDP1 (FSDPStrategy): the logged values at
    step 0 are those of the Hessian of the mean loss on the 32 examples of the global batch (dense float64), every
    estimator vector is split between the processes, and training is unchanged. FSDP2: a 1-process run logs the same
    values. (FSDP1 keeps parameters whole on one process, NO_SHARD, so its 1-process run has whole vectors.)"""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(SCRIPT))
    from fsdp_run import make_data, make_model

    fsdp = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    kinds = ("with", "without", "one") if flavour == "fsdp2" else ("with", "without")
    for kind in kinds:
        proc = subprocess.run([sys.executable, fsdp, str(tmp_path), kind, flavour], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert "FIT COMPLETE" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
        if kind != "without":
            assert "every estimator vector is sharded like the parameters" in proc.stdout + proc.stderr
    runs = {}
    for kind in set(kinds) - {"without"}:
        with open(tmp_path / kind / "version_0" / "metrics.csv") as f:
            runs[kind] = {int(r["step"]): r for r in csv.DictReader(f) if r.get("curvature/trace")}
    rows = runs["with"]
    assert sorted(rows) == [0, 2, 4]  # logged once each (rank zero)
    # memory O(P / world): each process stored its shard of the top eigenvectors, and the shards make up P
    lengths = [int((tmp_path / f"vectors-with-{r}.txt").read_text()) for r in range(2)]
    assert sum(lengths) == 83 and max(lengths) < 83
    if flavour == "fsdp2":
        assert int((tmp_path / "vectors-one-0.txt").read_text()) == 83
    # the same numbers on one process: the same probes (drawn for the global vector), the same global batch
    for step, row in (rows.items() if flavour == "fsdp2" else ()):
        for key, value in row.items():
            if key == "curvature/num_hvps":  # a stopping test may pass one product apart on other rounding
                assert abs(float(value) - float(runs["one"][step][key])) <= 0.05 * float(value), step
            elif key.startswith("curvature/") and value and key not in ("curvature/seconds", "curvature/overhead"):
                assert float(value) == pytest.approx(float(runs["one"][step][key]), rel=1e-6, abs=1e-9), (step, key)
    model = make_model()
    x, y = make_data().tensors
    x, y = x[:32], y[:32]
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]

    def loss(flat):
        parts = torch.split(flat, [s.numel() for s in shapes])
        return F.cross_entropy(torch.func.functional_call(model, {n: t.view(s) for n, t, s in
                                                                  zip(names, parts, shapes)}, (x,)), y)

    H = torch.autograd.functional.hessian(loss, torch.cat([p.detach().reshape(-1) for p in params.values()]))
    evals = torch.linalg.eigvalsh(H).flip(0)
    first = rows[0]
    # Lightning's FSDP1 precision plugin has no 64-bit mode: it casts the batches to float32
    exact = 1e-12 if flavour == "fsdp2" else 1e-6
    assert float(first["curvature/loss"]) == pytest.approx(float(loss(torch.cat([p.detach().reshape(-1) for p in
                                                                                    params.values()]))), rel=exact)
    assert float(first["curvature/eig_1"]) == pytest.approx(float(evals[0]), rel=1e-3)
    assert float(first["curvature/eig_2"]) == pytest.approx(float(evals[1]), rel=1e-3)
    # per-module: the top eigenvalue of each module's diagonal block (net.0: the first 56 coordinates)
    for module, block in (("net.0", slice(0, 56)), ("net.2", slice(56, 83))):
        assert float(first[f"curvature/lambda_max/{module}"]) == pytest.approx(
            float(torch.linalg.eigvalsh(H[block, block])[-1]), rel=1e-6 if flavour == "fsdp2" else 1e-3)
    assert "curvature/preconditioned_lambda_max" in rows[2] and "curvature/trace/net.2" in first
    stderr = float(first["curvature/trace_stderr"])
    assert abs(float(first["curvature/trace"]) - float(torch.trace(H))) <= 4 * stderr
    with_cb, without = torch.load(tmp_path / "weights-with.pt"), torch.load(tmp_path / "weights-without.pt")
    assert with_cb.keys() == without.keys() and all(torch.equal(with_cb[k], without[k]) for k in with_cb)


@pytest.mark.slow
def test_fsdp2_hugging_face_gpt2_at_the_defaults(tmp_path):
    """A model we did not write: Hugging Face's GPT-2 (tied embeddings, GELU, a local tiny config) under FSDP2 with
    the callback at its defaults. Two processes log at step 0 what one process logs on the same 16 sequences (float32
    finite differences: their gradient sums round differently), and training ends bit-identical to the run without
    the callback."""
    pytest.importorskip("transformers")
    import torch

    script = os.path.join(os.path.dirname(__file__), "scripts", "fsdp_gpt2_run.py")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for kind in ("with", "without", "one"):
        proc = subprocess.run([sys.executable, script, str(tmp_path), kind], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        assert "FIT COMPLETE" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
        if kind == "with":
            assert "every estimator vector is sharded like the parameters" in proc.stdout + proc.stderr
    runs = {}
    for kind in ("with", "one"):
        with open(tmp_path / kind / "version_0" / "metrics.csv") as f:
            runs[kind] = {int(r["step"]): r for r in csv.DictReader(f) if r.get("curvature/trace")}
    assert sorted(runs["with"]) == [0, 2]
    two, one = runs["with"][0], runs["one"][0]
    assert float(two["curvature/eig_converged"]) == 1.0
    for key in ("loss", "eig_1", "eig_2", "trace", "grad_curvature"):
        assert float(two[f"curvature/{key}"]) == pytest.approx(float(one[f"curvature/{key}"]), rel=1e-3), key
    assert float(two["curvature/eig_1"]) > 0
    with_cb, without = torch.load(tmp_path / "weights-with.pt"), torch.load(tmp_path / "weights-without.pt")
    assert with_cb.keys() == without.keys() and all(torch.equal(with_cb[k], without[k]) for k in with_cb)


def test_sharded_strategies_are_refused_with_what_is_supported():
    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    check_strategy(FSDPStrategy())
    with pytest.raises(ValueError, match=r"use_orig_params=True.*Supported: single device.*DDP.*FSDP2.*FSDP1"):
        check_strategy(FSDPStrategy(use_orig_params=False))
    with pytest.raises(ValueError, match="FSDP1's sharded parameters twice.*backend='finite-difference'"):
        check_strategy(FSDPStrategy(), "forward-over-reverse")
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    with pytest.raises(ValueError, match="tensor parallelism"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="backend='finite-difference'"):
        check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "double-backward")
    with pytest.raises(ValueError, match="does not support DeepSpeedStrategy"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy))
