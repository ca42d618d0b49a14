import math

import pytest
import torch
from problems import PROBLEM_IDS, PROBLEMS, spectrum_matrix

from lightning_curvature import HessianOperator, hutchinson_trace, power_iteration, random_probes


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- Hutchinson


def test_rademacher_hutchinson_is_exact_on_diagonal():
    d = torch.tensor([3.0, -1.5, 0.25, 7.0, 0.0], dtype=torch.float64)
    res = hutchinson_trace(torch.diag(d), num_probes=7, generator=gen())
    assert res.value == pytest.approx(float(d.sum()), abs=1e-13)
    assert res.stderr == pytest.approx(0.0, abs=1e-13)
    assert res.num_matvecs == res.num_probes == 7


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_standard_error_matches_theory(distribution):
    """Per-probe variance is 2(‖A‖_F² − Σ A_ii²) for Rademacher and 2‖A‖_F² for Gaussian probes."""
    A = spectrum_matrix([5.0, 3.0, -2.0, 1.0, 0.5, -0.5, 0.1, 0.0], seed=1)
    fro2 = float((A**2).sum())
    var = 2 * (fro2 - float((torch.diagonal(A) ** 2).sum())) if distribution == "rademacher" else 2 * fro2
    m = 400
    res = hutchinson_trace(A, num_probes=m, distribution=distribution, generator=gen(2))
    expected_stderr = math.sqrt(var / m)
    # the sample stderr estimates the true one; with m=400 it is within ~10% w.h.p.
    assert res.stderr == pytest.approx(expected_stderr, rel=0.2)
    # and the estimate is within 4 true standard errors of the exact trace (fixed seed)
    assert abs(res.value - float(torch.trace(A))) <= 4 * expected_stderr


def test_hutchinson_is_unbiased_over_seeds():
    """Mean over 200 independent 10-probe estimates is within 4 of its standard errors of the exact trace."""
    A = spectrum_matrix([4.0, -3.0, 2.0, 1.0, 1.0, 0.5], seed=3)
    values = torch.tensor([hutchinson_trace(A, 10, generator=gen(s)).value for s in range(200)], dtype=torch.float64)
    assert abs(float(values.mean()) - float(torch.trace(A))) <= 4 * float(values.std()) / math.sqrt(200)


def test_hutchinson_rtol_stops_on_standard_error_not_on_mean_change():
    A = spectrum_matrix([10.0, 9.0, 8.0, 1.0, 1.0, 1.0, -1.0, 2.0], seed=4)
    res = hutchinson_trace(A, num_probes=1000, rtol=0.02, generator=gen(5))
    assert res.num_probes < 1000
    assert res.stderr <= 0.02 * abs(res.value)
    # the rule held for the first time at the stopping probe, not earlier
    s = torch.tensor(res.samples, dtype=torch.float64)
    for m in range(5, res.num_probes):
        mean, se = float(s[:m].mean()), float(s[:m].std()) / math.sqrt(m)
        assert se > 0.02 * abs(mean)
    # never stops before min_probes, even when two samples agree exactly
    exact = hutchinson_trace(torch.eye(4, dtype=torch.float64), num_probes=100, rtol=0.5, min_probes=6, generator=gen())
    assert exact.num_probes == 6


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_hutchinson_on_model_hessians(problem):
    H = problem.dense_hessian()
    op = HessianOperator(problem.loss_fn(), problem.params())
    res = hutchinson_trace(op, num_probes=200, generator=gen(7))
    assert abs(res.value - float(torch.trace(H))) <= 4 * res.stderr + 1e-12


def test_hutchinson_bad_arguments():
    A = torch.eye(3)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(A, 0)
    with pytest.raises(ValueError, match="distribution must be one of"):
        hutchinson_trace(A, 3, distribution="uniform")
    with pytest.raises(ValueError, match="rtol"):
        hutchinson_trace(A, 3, rtol=-1.0)


def test_probes_have_identity_covariance_and_use_only_the_generator():
    state = torch.get_rng_state()
    z = random_probes(6, 20000, generator=gen(0), dtype=torch.float64)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(z @ z.T / z.shape[1], torch.eye(6, dtype=torch.float64), atol=0.05, rtol=0)
    torch.testing.assert_close(random_probes(6, 3, generator=gen(0)), random_probes(6, 3, generator=gen(0)))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- power iteration

SPECTRUM = [6.0, -4.0, 3.0, 1.5, 1.0, 0.5, -0.25, 0.1, 0.0, -1.0]


def test_power_iteration_matches_eigvalsh_with_negative_eigenvalues():
    A = spectrum_matrix(SPECTRUM, seed=0)
    res = power_iteration(A, k=3, max_iter=2000, tol=1e-8, generator=gen())
    # largest magnitudes first: 6, -4, 3 (the negative one is found; it is not the largest algebraic)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([6.0, -4.0, 3.0], dtype=torch.float64), atol=1e-7,
                               rtol=0)
    evals, evecs = torch.linalg.eigh(A)
    for j, lam in enumerate([6.0, -4.0, 3.0]):
        ref = evecs[:, int(torch.argmin((evals - lam).abs()))]
        assert abs(float(res.eigenvectors[:, j] @ ref)) == pytest.approx(1.0, abs=1e-6)
    assert bool(res.converged.all())
    assert (res.residuals <= 1e-8).all()
    # the residual criterion is what is reported: check it directly
    for j in range(3):
        v = res.eigenvectors[:, j]
        assert float((A @ v - res.eigenvalues[j] * v).norm()) <= 1e-8 * abs(float(res.eigenvalues[j])) * 1.0001


def test_power_iteration_dominant_negative_eigenvalue():
    A = spectrum_matrix([2.0, -5.0, 1.0, 0.5], seed=2)
    res = power_iteration(A, k=1, max_iter=500, tol=1e-9, generator=gen())
    assert float(res.eigenvalues[0]) == pytest.approx(-5.0, abs=1e-8)


def test_power_iteration_reports_non_convergence():
    A = spectrum_matrix([1.0, 0.999, 0.5], seed=1)  # tiny gap: 5 iterations are far too few
    res = power_iteration(A, k=1, max_iter=5, tol=1e-10, generator=gen())
    assert not bool(res.converged[0]) and res.num_matvecs == 5
    v = res.eigenvectors[:, 0]
    # the returned eigenvalue is the Rayleigh quotient of the returned vector
    assert float(v @ A @ v) == pytest.approx(float(res.eigenvalues[0]), abs=1e-12)


def test_power_iteration_warm_start_saves_products():
    A = spectrum_matrix(SPECTRUM, seed=0)
    cold = power_iteration(A, k=2, max_iter=2000, tol=1e-6, generator=gen())
    # a slightly different matrix, as between two steps of training
    B = A + 1e-3 * spectrum_matrix([1.0] * 5 + [-1.0] * 5, seed=9)
    warm = power_iteration(B, k=2, max_iter=2000, tol=1e-6, init=cold.eigenvectors, generator=gen())
    cold_b = power_iteration(B, k=2, max_iter=2000, tol=1e-6, generator=gen(1))
    torch.testing.assert_close(warm.eigenvalues, cold_b.eigenvalues, atol=1e-5, rtol=0)
    assert warm.num_matvecs * 2 <= cold_b.num_matvecs


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_power_iteration_on_model_hessians(problem):
    H = problem.dense_hessian()
    evals = torch.linalg.eigvalsh(H)
    top = evals[torch.argsort(evals.abs(), descending=True)[:2]]
    op = HessianOperator(problem.loss_fn(), problem.params())
    res = power_iteration(op, k=2, max_iter=3000, tol=1e-7, generator=gen())
    assert bool(res.converged.all())
    # eigenvalue error is bounded by residual²/gap; with tol=1e-7 it is far below 1e-6 relative
    torch.testing.assert_close(res.eigenvalues, top, rtol=1e-6, atol=1e-10)


def test_power_iteration_bad_arguments():
    A = torch.eye(3)
    with pytest.raises(ValueError, match="k must be an integer"):
        power_iteration(A, k=0)
    with pytest.raises(ValueError, match="exceeds"):
        power_iteration(A, k=4)
    with pytest.raises(ValueError, match="tol"):
        power_iteration(A, tol=0)
    with pytest.raises(ValueError, match="init must have 3 rows"):
        power_iteration(A, init=torch.ones(4))
