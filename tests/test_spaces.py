"""Estimators on vectors sharded over processes (``lightning_curvature.spaces``): the same numbers on any world size."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
sys.path.insert(0, SCRIPTS)

from sharded_estimators_run import SHAPES, global_index, matrix, pieces  # noqa: E402

from lightning_curvature.spaces import Piece, ShardedSpace  # noqa: E402


def _whole(world: int, draws: list[torch.Tensor]) -> torch.Tensor:
    """The global vectors from each rank's rows."""
    P = sum(math.prod(s) for s in SHAPES)
    out = torch.empty((P, draws[0].shape[1]), dtype=draws[0].dtype)
    for rank, rows in enumerate(draws):
        out[global_index(rank, world)] = rows
    return out


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_draws_are_one_global_vector_whatever_the_world_size(distribution):
    ranks = {}
    for world in (1, 2, 3, 5):
        draws = [ShardedSpace(pieces(r, world)).draw(4, distribution, torch.Generator().manual_seed(7),
                                                     torch.float64, "cpu") for r in range(world)]
        ranks[world] = _whole(world, draws)
    for world in (2, 3, 5):
        assert torch.equal(ranks[world], ranks[1]), world
    z = ranks[1]
    if distribution == "rademacher":
        assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(z[:, 0], z[:, 1])  # columns are distinct draws
    # another seed gives other vectors; the same generator advances
    g = torch.Generator().manual_seed(7)
    space = ShardedSpace(pieces(0, 1))
    first, second = space.draw(1, distribution, g, torch.float64, "cpu"), space.draw(1, distribution, g,
                                                                                      torch.float64, "cpu")
    assert not torch.equal(first, second)


def test_piece_takes_the_box_of_a_shard_in_row_major_order():
    piece = Piece((4, 3), (1, 1), (2, 2))  # rows 1-2, columns 1-2
    whole = torch.arange(12.0).reshape(12, 1)
    assert piece.take(whole)[:, 0].tolist() == [4.0, 5.0, 7.0, 8.0]
    assert Piece((3,), (3,), (0,)).take(torch.arange(3.0).reshape(3, 1)).shape == (0, 1)


def _run(tmp_path_factory, world: int, port: str, shapes: str | None = None) -> dict:
    path = tmp_path_factory.mktemp(f"world{world}") / "out.json"
    args = [sys.executable, os.path.join(SCRIPTS, "sharded_estimators_run.py"), str(path), str(world), port]
    proc = subprocess.run(args + ([shapes] if shapes else []), capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "RUN COMPLETE" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {world: _run(tmp_path_factory, world, port) for world, port in ((1, "29611"), (2, "29612"), (3, "29613"))}


@pytest.fixture(scope="module")
def empty_rank(tmp_path_factory):
    """Two parameters of two rows on 3 processes: the third holds no entry of any vector."""
    return {world: _run(tmp_path_factory, world, port, "[[2, 4], [2, 3]]") for world, port in ((1, "29614"),
                                                                                               (3, "29615"))}


def test_a_process_without_entries_takes_part_in_every_estimator(empty_rank):
    one, three = empty_rank[1], empty_rank[3]
    assert three["local_sizes"] == [7, 7, 0] and three["ranks_agree"]
    for key in ("lanczos", "lanczos_block", "lanczos_warm"):
        assert three[key]["values"] == pytest.approx([10.0, 6.0, 6.0], rel=1e-10), key
    assert three["power_warm"]["values"] == pytest.approx([10.0, 6.0], rel=1e-10)
    for key in ("hutchinson", "hutchpp", "deflated", "deflated_qr"):
        assert three[key]["value"] == pytest.approx(one[key]["value"], rel=1e-9), key


def test_hutchpp_on_the_whole_space_stays_exact_when_the_sketch_is_ill_conditioned(runs, empty_rank):
    # float32, spectrum {100, 0.01 × (P − 1)}: an orthonormalised H S would lose the small directions
    for r, P in ((runs[1], 34), (runs[2], 34), (empty_rank[3], 14)):
        assert r["hutchpp_whole_space"] == pytest.approx(100.0 + 0.01 * (P - 1), rel=1e-5)


def test_sharded_runs_split_the_vectors_and_every_rank_takes_the_same_branches(runs):
    assert runs[1]["local_sizes"] == [34]
    assert runs[2]["local_sizes"] == [19, 15]
    assert runs[3]["local_sizes"] == [15, 15, 4]  # the third rank holds no row of the (2, 4) parameter
    assert all(runs[w]["ranks_agree"] for w in runs)


def test_sharded_eigenvalues_are_the_dense_ones_on_every_world_size(runs):
    H = matrix()
    for world, r in runs.items():
        for key in ("lanczos", "lanczos_block", "lanczos_warm"):
            assert r[key]["values"] == pytest.approx([10.0, 6.0, 6.0], rel=1e-10, abs=1e-10), (world, key)
        assert all(r["lanczos"]["converged"]) and all(r["lanczos_block"]["converged"])
        assert r["lanczos_sa"]["values"] == pytest.approx([-2.0], rel=1e-10) and r["lanczos_sa"]["converged"][0]
        assert r["power"]["values"] == pytest.approx([10.0], rel=1e-10) and r["power"]["converged"][0]
        # the sharded eigenvectors, gathered whole, are eigenvectors of the whole matrix
        V = torch.tensor(r["lanczos"]["vectors"], dtype=torch.float64).T
        lam = torch.tensor(r["lanczos"]["values"], dtype=torch.float64)
        assert float((H @ V - V * lam).norm(dim=0).max()) < 1e-8, world
        assert torch.allclose(V.T @ V, torch.eye(3, dtype=torch.float64), atol=1e-10)
        # a warm start from the previous vectors (sharded like them) does not cost more than a cold one
        assert r["lanczos_warm"]["num_matvecs"] <= r["lanczos_warm"]["cold_matvecs"]


def test_sharded_traces_and_density_agree_across_world_sizes_to_rounding(runs):
    trace = float(torch.trace(matrix()))
    for key in ("hutchinson", "normal", "hutchpp", "deflated", "deflated_qr"):
        for world in (2, 3):
            # the same global probes: the same samples, up to the order of the sums
            assert runs[world][key]["samples"] == pytest.approx(runs[1][key]["samples"], rel=1e-9, abs=1e-9), key
            assert runs[world][key]["value"] == pytest.approx(runs[1][key]["value"], rel=1e-12)
        value, stderr = runs[1][key]["value"], runs[1][key]["stderr"]
        assert abs(value - trace) <= 4 * stderr, (key, value, trace, stderr)
    for world in (2, 3):
        for key in ("nodes", "weights"):
            mine, one = (torch.tensor(runs[w]["density"][key], dtype=torch.float64) for w in (world, 1))
            assert torch.allclose(mine, one, rtol=1e-9, atol=1e-12), (world, key)
