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


# ---------------------------------------------------------------- Lanczos

from lightning_curvature import (  # noqa: E402
    deflated_hutchinson_trace,
    hutchpp_trace,
    lanczos,
    spectral_density,
)

CLUSTERED = [10.0, 9.999, 9.998, 5.0, 4.9, -12.0, -11.99, 1.0, 0.5, 0.2] + [0.01 * i for i in range(-20, 40)]


@pytest.mark.parametrize(
    "which,expected",
    [
        ("LA", [10.0, 9.999, 9.998, 5.0, 4.9]),
        ("SA", [-12.0, -11.99, -0.2, -0.19, -0.18]),
        ("LM", [-12.0, -11.99, 10.0, 9.999, 9.998]),
    ],
)
def test_lanczos_matches_eigvalsh_on_clustered_and_negative_spectra(which, expected):
    A = spectrum_matrix(CLUSTERED, seed=5)
    # the 3rd..5th SA values sit in an evenly spaced bulk (gaps 0.01): to 1e-10 a restarted run takes a few hundred
    res = lanczos(A, k=5, which=which, max_iter=400, tol=1e-10, generator=gen())
    torch.testing.assert_close(res.eigenvalues, torch.tensor(expected, dtype=torch.float64), atol=1e-8, rtol=0)
    # no ghosts: the returned vectors are orthonormal, so no eigenvalue is reported twice
    V = res.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(5, dtype=torch.float64), atol=1e-8, rtol=0)
    true_res = (A @ V - V * res.eigenvalues).norm(dim=0)
    assert (true_res <= 1e-8 * res.eigenvalues.abs() + 1e-12).all()
    assert bool(res.converged.all())


def test_lanczos_reported_residuals_are_true_residuals():
    A = spectrum_matrix(CLUSTERED, seed=6)
    res = lanczos(A, k=3, max_iter=12, tol=1e-12, generator=gen())  # stopped early: residuals not small
    V = res.eigenvectors
    true_rel = (A @ V - V * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    torch.testing.assert_close(res.residuals, true_rel, rtol=1e-6, atol=1e-12)
    assert not bool(res.converged.all())


def test_lanczos_needs_far_fewer_products_than_power_iteration():
    A = spectrum_matrix([10.0, 9.0, 8.5] + [0.01 * i for i in range(-50, 100)], seed=7)
    lz = lanczos(A, k=1, tol=1e-6, generator=gen())
    pw = power_iteration(A, k=1, tol=1e-6, max_iter=10_000, generator=gen())
    assert lz.converged.all() and pw.converged.all()
    assert float(lz.eigenvalues[0]) == pytest.approx(10.0, abs=1e-9)
    assert 3 * lz.num_matvecs <= pw.num_matvecs


def test_lanczos_warm_start_saves_products_and_finds_a_new_top_direction():
    A = spectrum_matrix(CLUSTERED, seed=8)
    cold = lanczos(A, k=3, tol=1e-6, generator=gen())
    B = A + 1e-4 * spectrum_matrix([1.0] * 35 + [-1.0] * 35, seed=9)
    warm = lanczos(B, k=3, tol=1e-6, init=cold.eigenvectors, generator=gen(1))
    ref = torch.linalg.eigvalsh(B).flip(0)[:3]
    torch.testing.assert_close(warm.eigenvalues, ref, atol=1e-5, rtol=0)
    assert warm.num_matvecs < cold.num_matvecs
    # a warm start from the *wrong* vectors still converges to the right answer (the random mix-in)
    wrong = torch.linalg.eigh(A).eigenvectors[:, :3]  # bottom eigenvectors
    fixed = lanczos(A, k=3, tol=1e-8, init=wrong, generator=gen(2))
    torch.testing.assert_close(fixed.eigenvalues, torch.tensor([10.0, 9.999, 9.998], dtype=torch.float64),
                               atol=1e-7, rtol=0)


def test_lanczos_invariant_start_restarts_instead_of_stopping():
    """A start vector inside an invariant subspace breaks down after one step; the run must go on."""
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 7.0], dtype=torch.float64))
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    res = lanczos(A, k=1, tol=1e-10, max_iter=4, init=e1, generator=gen())
    assert float(res.eigenvalues[0]) == pytest.approx(7.0, abs=1e-9)


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_lanczos_on_model_hessians(problem):
    H = problem.dense_hessian()
    evals = torch.linalg.eigvalsh(H)
    op = HessianOperator(problem.loss_fn(), problem.params())
    top = lanczos(op, k=3, which="LA", tol=1e-8, max_iter=op.shape[0], generator=gen())
    torch.testing.assert_close(top.eigenvalues, evals.flip(0)[:3], rtol=1e-6, atol=1e-9)
    bottom = lanczos(op, k=1, which="SA", tol=1e-8, max_iter=op.shape[0], generator=gen())
    torch.testing.assert_close(bottom.eigenvalues, evals[:1], rtol=1e-6, atol=1e-9)


def test_lanczos_bad_arguments():
    with pytest.raises(ValueError, match=r"which must be one of \('LA', 'SA', 'LM'\)"):
        lanczos(torch.eye(3), which="BE")
    with pytest.raises(ValueError, match="exceeds"):
        lanczos(torch.eye(3), k=4)


def test_lanczos_rejects_a_tolerance_or_budget_that_cannot_mean_anything():
    A = spectrum_matrix([3.0, 2.0, 1.0, 0.5], seed=1)
    for tol in (math.inf, math.nan, 0.0, -1e-3, True, "1e-3"):
        with pytest.raises(ValueError, match="tol must be a finite positive number"):
            lanczos(A, tol=tol)
    with pytest.raises(ValueError, match="max_iter=3 is smaller than k=4"):
        lanczos(A, k=4, max_iter=3)
    with pytest.raises(ValueError, match="block_size"):
        lanczos(A, k=2, block_size=0)
    with pytest.raises(ValueError, match="block_size=5 does not fit"):
        lanczos(A, k=2, block_size=5)
    with pytest.raises(ValueError, match=r"max_basis=5 is below k \+ 2 \* block_size = 6"):
        lanczos(A, k=2, block_size=2, max_basis=5)


# Rotated diagonals whose top (or bottom) eigenvalue is repeated, above a bulk of 60 distinct eigenvalues, so that a
# single start vector's Krylov space does not become invariant: it sees one copy of each repeated eigenvalue only.
BULK = torch.linspace(-1.0, 1.5, 60).tolist()


def check_pairs(A, res, expected, atol):
    """Eigenvalues against the dense reference, orthonormal vectors, and reported residuals that are true ones."""
    torch.testing.assert_close(res.eigenvalues, torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)
    V = res.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), atol=1e-10, rtol=0)
    true = (A @ V - V * res.eigenvalues).norm(dim=0) / res.eigenvalues.abs()
    assert (true <= res.residuals + 1e-12).all() and (true >= res.residuals - 1e-12).all()


@pytest.mark.parametrize("block_size", [1, 3], ids=["deflated-check", "block"])
@pytest.mark.parametrize("mult", [2, 3])
def test_lanczos_finds_every_copy_of_a_repeated_top_eigenvalue(mult, block_size):
    spectrum = [5.0] * mult + [3.0, 2.0] + BULK
    A = spectrum_matrix(spectrum, seed=20)
    res = lanczos(A, k=3, tol=1e-8, block_size=block_size, generator=gen())
    check_pairs(A, res, sorted(spectrum, reverse=True)[:3], atol=1e-7)
    assert bool(res.converged.all())


def test_lanczos_repeated_eigenvalue_in_a_small_invariant_krylov_space():
    """The issue's case: one start vector's Krylov space of rotated diag(5, 5, 5, 3, 2, 1, 0, -1) is invariant after
    6 products; the run must go on with fresh vectors, not stop at (5, 3, 2)."""
    A = spectrum_matrix([5.0, 5.0, 5.0, 3.0, 2.0, 1.0, 0.0, -1.0], seed=21)
    res = lanczos(A, k=3, tol=1e-8, generator=gen())
    check_pairs(A, res, [5.0, 5.0, 5.0], atol=1e-7)
    assert bool(res.converged.all())


@pytest.mark.parametrize("block_size", [1, 3], ids=["deflated-check", "block"])
def test_lanczos_resolves_a_tight_cluster(block_size):
    spectrum = [5.0, 5.0 - 1e-4, 5.0 - 2e-4, 3.0] + BULK
    A = spectrum_matrix(spectrum, seed=22)
    res = lanczos(A, k=3, tol=1e-10, block_size=block_size, max_iter=400, generator=gen())
    # a residual r puts the eigenvalue within r²/gap of the Ritz value: far below the cluster's gaps of 1e-4
    check_pairs(A, res, [5.0, 5.0 - 1e-4, 5.0 - 2e-4], atol=1e-8)
    assert bool(res.converged.all())


@pytest.mark.parametrize("block_size", [1, 2], ids=["deflated-check", "block"])
def test_lanczos_smallest_algebraic_finds_a_repeated_bottom_eigenvalue(block_size):
    spectrum = [-2.0, -2.0, -1.0] + BULK
    A = spectrum_matrix(spectrum, seed=23)
    res = lanczos(A, k=2, which="SA", tol=1e-8, block_size=block_size, generator=gen())
    check_pairs(A, res, [-2.0, -2.0], atol=1e-7)
    assert bool(res.converged.all())


def test_lanczos_never_claims_convergence_for_a_wrong_answer():
    """Designs that fool a single-vector Krylov method: converged may only be true for the right eigenvalues."""
    # 1. a budget that covers the single-vector run but not the check: it has only seen one copy of 5
    spectrum = [5.0, 5.0, 5.0, 3.0, 2.0] + BULK
    A = spectrum_matrix(spectrum, seed=20)
    short = lanczos(A, k=3, tol=1e-8, max_iter=40, generator=gen())
    assert short.eigenvalues.tolist() != pytest.approx([5.0, 5.0, 5.0], abs=1e-3)  # the fooled answer ...
    assert not bool(short.converged.any())  # ... is not claimed
    # 2. block_size < k without a check: no evidence about multiplicities
    no_check = lanczos(A, k=3, tol=1e-8, block_size=2, max_iter=12, generator=gen())
    assert not bool(no_check.converged.any())
    # 3. a shifted spectrum: after one product the relative residual of the bulk's mean is 1%, far below tol, while
    #    the top eigenvalue is twice as large; a one-vector space has no spread, so it cannot pass the test
    bulk = 5.0 + 0.05 * torch.randn(300, generator=gen(3), dtype=torch.float64)
    B = spectrum_matrix([10.0, *bulk.tolist()], seed=24)
    for tol in (0.05, 1e6):  # a huge tol counts as 0.1
        for seed in range(3):
            res = lanczos(B, k=1, tol=tol, generator=gen(seed))
            assert res.num_matvecs > 1
            assert bool(res.converged.all())
            assert abs(float(res.eigenvalues[0]) - 10.0) <= float(res.residuals[0]) * 10.0 + 1e-12
    # 4. too few products for the top-10 of a 64-dimensional matrix, and a tolerance of 1e6
    C = spectrum_matrix(OUTLIERS_FOR_LANCZOS, seed=25)
    ref = torch.linalg.eigvalsh(C).flip(0)
    for kwargs in ({"k": 10, "max_iter": 12, "tol": 1e-6}, {"k": 4, "tol": 1e6}, {"k": 1, "tol": 1e6}):
        for seed in range(3):
            res = lanczos(C, generator=gen(seed), **kwargs)
            k = kwargs["k"]
            err = (res.eigenvalues - ref[:k]).abs()
            bound = res.residuals * res.eigenvalues.abs()  # the residual bound |θ − λ| ≤ ‖H y − θ y‖
            if bool(res.converged.all()):
                assert (err <= bound * 1.0001 + 1e-12).all()
            else:
                assert not bool(res.converged.any())


def test_lanczos_budget_spent_before_the_deflated_check_is_no_evidence():
    """Every budget from k to past convergence: an answer or an honest ``converged=False``, never an exception.

    A budget that the first run spends exactly leaves the deflated check no product to run (this raised an
    ``IndexError`` through the callback, on Lightning's LSTM demo and a GPT-2 head).
    """
    A = spectrum_matrix([5.0, 4.0, 3.0] + BULK, seed=26)
    full = lanczos(A, k=2, tol=1e-6, generator=gen())
    assert bool(full.converged.all())
    for max_iter in range(2, full.num_matvecs + 3):
        res = lanczos(A, k=2, tol=1e-6, max_iter=max_iter, generator=gen())
        assert res.num_matvecs <= max_iter
        if bool(res.converged.all()):
            torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0], dtype=torch.float64), atol=1e-5,
                                       rtol=0)
        else:
            assert not bool(res.converged.any())


OUTLIERS_FOR_LANCZOS = [50.0, 30.0, 20.0, 10.0] + [0.1 * ((i % 7) - 2) for i in range(60)]


def test_lanczos_restarts_keep_pairs_accurate_and_residuals_honest():
    """A spectrum that converges slowly forces many thick restarts of a 20-vector basis, in float64 and float32."""
    spectrum = torch.cat([torch.tensor([1.0, 0.99, 0.98]), torch.linspace(-0.5, 0.97, 997)]).double()
    A = spectrum_matrix(spectrum.tolist(), seed=26)
    for dtype, tol in ((torch.float64, 1e-8), (torch.float32, 1e-3)):
        Ad = A.to(dtype)
        res = lanczos(Ad, k=2, tol=tol, max_iter=2000, generator=gen())
        assert res.num_matvecs > 40  # several restarts of a 20-vector basis
        assert bool(res.converged.all())
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(res.eigenvalues, torch.tensor([1.0, 0.99], dtype=torch.float64),
                                   atol=10 * tol, rtol=0)  # |θ − λ| ≤ r²/gap ≪ r
        V = res.eigenvectors.double()
        # orthonormal to the level the tolerance needs (the basis is kept that orthogonal), or to rounding
        assert float((V.T @ V - torch.eye(2, dtype=torch.float64)).abs().max()) <= 0.1 * tol + 100 * eps
        true = (A @ V - V * res.eigenvalues).norm(dim=0)
        # the recurrence's residual is the true one up to rounding in the products (ε ‖H‖ per step)
        assert (true <= res.residuals * res.eigenvalues.abs() + 100 * eps).all()
        assert (true <= tol * res.eigenvalues.abs()).all()


def _rank_three_plus(tail, seed, dtype=torch.float32, n=40):
    """``H = Q diag(2, 2, 2, tail, 0, …) Qᵀ``: a block of four meets a three-dimensional range (plus a small tail)."""
    spectrum = [2.0, 2.0, 2.0, tail] + [0.0] * (n - 4)
    return spectrum_matrix(spectrum, seed=seed).to(dtype), torch.tensor(spectrum, dtype=torch.float64)


@pytest.mark.parametrize("tail", [1e-4, 1e-5, 3e-6])
def test_block_lanczos_on_a_rank_deficient_block_claims_only_true_residuals(tail):
    """A block's own Gram-Schmidt shrinks a column to the size of the tail (or to rounding), which magnifies what the
    step's pass left along the previous block; and a part dropped as rounding at a breakdown is missing from the
    recurrence. Before both were accounted for, most of these runs claimed a converged pair whose true residual was
    hundreds of times the claimed one (and one returned 8.2 for a matrix whose norm is 2)."""
    for seed in range(5):
        H, spectrum = _rank_three_plus(tail, seed)
        X = torch.linalg.qr(torch.randn(40, 4, generator=torch.Generator().manual_seed(100 + seed))).Q
        res = lanczos(H, k=4, block_size=4, max_iter=24, tol=1e-3, init=X, generator=gen(seed))
        values, V = res.eigenvalues, res.eigenvectors.double()
        assert bool(((values > -1e-3) & (values < 2 + 1e-3)).all()), (seed, values)
        true = (H.double() @ V - V * values).norm(dim=0)
        claimed = res.residuals * values.abs()
        eps_norm = torch.finfo(torch.float32).eps * 2.0
        for i in range(4):
            if bool(res.converged[i]):
                assert float(true[i]) <= float(claimed[i]) + 20 * eps_norm, (seed, i, float(true[i]), float(claimed[i]))


def test_a_known_norm_makes_an_operator_at_rounding_level_an_invariant_subspace():
    """The deflated check runs Lanczos on H deflated of the vectors found; when they span H's whole range, what is
    left is rounding, and only ‖H‖, passed in, tells it from a genuinely small operator."""
    from lightning_curvature.estimators import _krylov_schur, _start_block
    from lightning_curvature.operators import DenseOperator

    tiny = spectrum_matrix([1e-17 * (i + 1) for i in range(30)], seed=3)  # a genuinely small operator
    op = DenseOperator(tiny)
    start = _start_block(op, None, 1, gen())
    alone = _krylov_schur(op, start, 1, "LA", 60, 1e-6, 20, gen())
    assert float(alone.values[0]) == pytest.approx(30e-17, rel=1e-6)  # found, relative to its own norm
    assert bool(alone.resolved.all())
    scaled = _krylov_schur(op, start, 1, "LA", 60, 1e-6, 20, gen(), anorm=1.0)  # rounding, next to ‖H‖ = 1
    assert abs(float(scaled.values[0])) <= 1e-15


def test_lanczos_on_a_low_rank_operator_claims_only_true_residuals():
    """Rank 1 to 3 in 20 to 60 dimensions, every ``which``, one vector and blocks: whatever converges is true (to
    rounding), in float32 and float64."""
    for trial in range(24):
        n, rank = 20 + 2 * trial, 1 + trial % 3
        dtype = torch.float32 if trial % 2 else torch.float64
        which = ("LA", "SA", "LM")[trial % 3]
        k, b = 2 + trial % 3, 1 + (trial // 3) % 2
        spectrum = [1.5 + 0.1 * i for i in range(rank)] + [0.0] * (n - rank)
        H = spectrum_matrix(spectrum, seed=trial).to(dtype)
        res = lanczos(H, k=k, which=which, block_size=b, tol=1e-4, generator=gen(trial))
        V = res.eigenvectors.double()
        true = (H.double() @ V - V * res.eigenvalues).norm(dim=0)
        floor = 50 * torch.finfo(dtype).eps * max(spectrum)
        for i in range(k):
            if bool(res.converged[i]):
                assert float(true[i]) <= float(res.residuals[i] * res.eigenvalues[i].abs()) + floor, (trial, i)


@pytest.mark.parametrize("scale", [1e-33, 1e-25, 1e-10, 1e3, 1e6, 1e10, 1e20, 1e30])
def test_lanczos_and_power_iteration_in_float32_do_not_depend_on_the_scale_of_h(scale):
    """The same float32 problem times ``scale``: the same products and the same answers over ``scale``.

    Two bugs lived here: re-normalising rows after a partial reorthogonalisation compared their unit norms with
    ``ε^¾ ‖H‖``, so once ‖H‖ passed ~1.5e5 every such row was "at rounding level" and replaced by a random vector
    (wrong values claimed converged, or values outside the spectrum); and float32 norms overflow in their squares
    once ‖Hv‖ passes ~1.8e19 (power iteration then claimed 0), and underflow below ~1e-19 (below 1e-23 both solvers
    claimed converged values a quarter of the true ones)."""
    A = torch.diag(torch.linspace(-1.0, 1.0, 20, dtype=torch.float64))
    ref = lanczos(A.float(), k=2, generator=gen())
    res = lanczos((A * scale).float(), k=2, generator=gen())
    assert res.num_matvecs == ref.num_matvecs
    torch.testing.assert_close(res.eigenvalues / scale, ref.eigenvalues, rtol=1e-6, atol=0)
    assert bool(res.converged.all())
    V = res.eigenvectors.double()
    true = (A @ V - V * (res.eigenvalues / scale)).norm(dim=0) / (res.eigenvalues / scale).abs()
    torch.testing.assert_close(res.residuals, true, rtol=1e-3, atol=1e-6)
    B = torch.diag(torch.linspace(-1.0, 0.9, 20, dtype=torch.float64))
    p_ref = power_iteration(B.float(), k=1, max_iter=300, generator=gen())
    p = power_iteration((B * scale).float(), k=1, max_iter=300, generator=gen())
    assert p.num_matvecs == p_ref.num_matvecs and bool(p.converged.all())
    assert float(p.eigenvalues[0]) / scale == pytest.approx(float(p_ref.eigenvalues[0]), rel=1e-6)


@pytest.mark.parametrize("scale", [1e-33, 1e-20, 1e20, 1e30])
def test_trace_estimators_in_float32_do_not_depend_on_the_scale_of_h(scale):
    from lightning_curvature import block_hutchinson_traces

    A = spectrum_matrix([5.0, 4.0, 3.0] + [0.3 * math.sin(i) for i in range(27)], seed=30)

    def traces(H):
        V = lanczos(H, k=3, generator=gen()).eigenvectors
        return [hutchinson_trace(H, 10, generator=gen()).value, hutchpp_trace(H, 12, generator=gen()).value,
                deflated_hutchinson_trace(H, V, 10, generator=gen()).value,
                block_hutchinson_traces(H, [torch.arange(0, 15), torch.arange(15, 30)], 6, generator=gen())[0].value]

    ref = traces(A.float())
    got = [v / scale for v in traces((A * scale).float())]
    assert got == pytest.approx(ref, rel=1e-5)


def test_lanczos_memory_is_bounded_by_the_basis_not_by_max_iter(tmp_path):
    """400 products on P = 400,000 (float64, 3.2 MB a vector) with a spectrum that does not converge: the peak
    resident memory grows by about max_basis = 20 vectors, not by 400 (the basis that kept every vector)."""
    script = tmp_path / "run.py"
    script.write_text(
        "import json, torch\n"
        "from lightning_curvature import lanczos\n"
        "torch.set_num_threads(1)\n"
        "class Diagonal:\n"
        "    def __init__(self, d):\n"
        "        self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device\n"
        "    def matvec(self, v):\n"
        "        return self.d * v\n"
        "def status(key):  # VmRSS, VmHWM (peak) in bytes; ru_maxrss would inherit pytest's peak across exec\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ':'))\n"
        "P = 400_000\n"
        "lanczos(Diagonal(torch.linspace(0, 1, 1000, dtype=torch.float64)), k=2, max_iter=60, tol=1e-12,\n"
        "        generator=torch.Generator().manual_seed(0))  # kernels and allocator warmed up on a small problem\n"
        "op = Diagonal(torch.linspace(0, 1, P, dtype=torch.float64))\n"
        "before = status('VmRSS')\n"
        "with open('/proc/self/clear_refs', 'w') as f:\n"
        "    f.write('5')  # the peak starts again from here\n"
        "res = lanczos(op, k=2, max_iter=400, tol=1e-12, generator=torch.Generator().manual_seed(0))\n"
        "print(json.dumps({'vectors': (status('VmHWM') - before) / (8 * P), 'products': res.num_matvecs}))\n"
    )
    import json
    import os
    import subprocess
    import sys

    # every freed vector goes back to the system at once, so the peak counts live tensors, not the allocator's cache
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, env=env)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["products"] == 400
    # 20 basis vectors, the 2 returned, the start draw, a product and its temporaries
    assert measured["vectors"] <= 20 + 10


# ---------------------------------------------------------------- Hutch++ and deflation

OUTLIERS = [50.0, 30.0, 20.0, 10.0] + [0.1 * ((i % 7) - 2) for i in range(60)]


def test_hutchpp_and_deflated_are_unbiased_within_their_standard_errors():
    A = spectrum_matrix(OUTLIERS, seed=10)
    exact = float(torch.trace(A))
    eig = torch.linalg.eigh(A)
    V, lam = eig.eigenvectors[:, -4:], eig.eigenvalues[-4:]
    for est in (
        lambda s: hutchpp_trace(A, 30, generator=gen(s)),
        lambda s: deflated_hutchinson_trace(A, V + 0.01 * torch.randn(V.shape, generator=gen(100 + s),
                                                                      dtype=torch.float64), 20, generator=gen(s)),
    ):
        values = torch.tensor([est(s).value for s in range(100)], dtype=torch.float64)
        assert abs(float(values.mean()) - exact) <= 4 * float(values.std()) / 10
    # with exact eigenpairs and Ritz values given, only the small rest is estimated
    res = deflated_hutchinson_trace(A, V, 20, eigenvalues=lam, generator=gen())
    assert abs(res.value - exact) <= 4 * res.stderr
    assert res.num_matvecs == 20


def test_hutchpp_and_deflation_beat_plain_hutchinson_on_outliers():
    A = spectrum_matrix(OUTLIERS, seed=11)
    plain = hutchinson_trace(A, 30, generator=gen())
    pp = hutchpp_trace(A, 30, generator=gen())
    top = lanczos(A, k=4, tol=1e-6, generator=gen())
    defl = deflated_hutchinson_trace(A, top.eigenvectors, 30 - top.num_matvecs if top.num_matvecs < 28 else 2,
                                     eigenvalues=top.eigenvalues, generator=gen())
    assert pp.stderr * 5 < plain.stderr and defl.stderr * 5 < plain.stderr
    exact = float(torch.trace(A))
    assert abs(pp.value - exact) <= 4 * pp.stderr and abs(defl.value - exact) <= 4 * defl.stderr


def test_hutchpp_exact_on_low_rank_and_rtol():
    A = spectrum_matrix([3.0, -2.0, 1.0] + [0.0] * 7, seed=12)
    res = hutchpp_trace(A, 12, sketch_size=3, generator=gen())
    assert res.value == pytest.approx(2.0, abs=1e-10)
    B = spectrum_matrix(OUTLIERS, seed=13)
    r = hutchpp_trace(B, 600, sketch_size=10, rtol=0.01, generator=gen())
    assert r.num_matvecs < 600 and r.stderr <= 0.01 * abs(r.value)


@pytest.mark.parametrize("problem", PROBLEMS, ids=PROBLEM_IDS)
def test_better_traces_on_model_hessians(problem):
    H = problem.dense_hessian()
    exact = float(torch.trace(H))
    op = HessianOperator(problem.loss_fn(), problem.params())
    pp = hutchpp_trace(op, 60, generator=gen())
    top = lanczos(op, k=3, tol=1e-6, generator=gen())
    defl = deflated_hutchinson_trace(op, top.eigenvectors, 40, eigenvalues=top.eigenvalues, generator=gen())
    assert abs(pp.value - exact) <= 4 * pp.stderr + 1e-10
    assert abs(defl.value - exact) <= 4 * defl.stderr + 1e-10


# ---------------------------------------------------------------- spectral density


def test_spectral_density_integrates_to_one_and_its_mean_is_trace_over_p():
    A = spectrum_matrix(OUTLIERS, seed=14)
    P = A.shape[0]
    dens = spectral_density(A, num_probes=8, num_steps=25, generator=gen())
    integral = float(torch.trapezoid(dens.density, dens.grid))
    assert integral == pytest.approx(1.0, abs=1e-3)
    # the quadrature's first moment is exactly the Hutchinson estimate of the same (Rademacher) probes over P
    g = gen()
    z = torch.cat([random_probes(P, 1, generator=g, dtype=torch.float64) for _ in range(8)], dim=1)
    hutch = float(torch.einsum("ij,ij->j", z, A @ z).mean())
    assert dens.moments(1) * P == pytest.approx(hutch, rel=1e-8)
    # with as many steps as (distinct) eigenvalues the nodes are the exact eigenvalues
    C = spectrum_matrix([float(i) - 3.5 for i in range(12)], seed=15)
    full = spectral_density(C, num_probes=1, num_steps=12, generator=gen())
    torch.testing.assert_close(full.nodes[0].sort().values, torch.linalg.eigvalsh(C), atol=1e-8, rtol=0)
    assert torch.allclose(full.weights.sum(dim=1), torch.ones(1, dtype=torch.float64))
    # repeated eigenvalues: the run stops at the invariant subspace, the quadrature is still exact
    assert float(torch.trapezoid(dens.density, dens.grid)) == pytest.approx(1.0, abs=1e-3)


def test_spectral_density_in_float32_does_not_depend_on_the_scale_of_h():
    """Eigenvalues of 1e20 are finite in float32, their squares are not: the Lanczos norms are taken without overflow
    (before, the nodes came back NaN and the error was "sigma must be positive, got nan", about an argument nobody
    passed). An operator that returns NaN gets an error that says what happened."""
    A = torch.diag(torch.linspace(-1.0, 1.0, 20, dtype=torch.float64))
    ref = spectral_density(A.float(), num_probes=2, num_steps=10, generator=gen())
    for scale in (1e-30, 1e20, 1e30):
        big = spectral_density((A * scale).float(), num_probes=2, num_steps=10, generator=gen())
        torch.testing.assert_close(big.nodes / scale, ref.nodes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(big.weights, ref.weights, rtol=1e-5, atol=1e-6)
        assert big.sigma / scale == pytest.approx(ref.sigma, rel=1e-5)  # the broadening follows the spectrum
        torch.testing.assert_close(big.density * scale, ref.density, rtol=1e-4, atol=1e-6)

    class NaNs:
        shape, dtype, device = (20, 20), torch.float32, torch.device("cpu")

        def matvec(self, v):
            return torch.full_like(v, math.nan)

    with pytest.raises(FloatingPointError, match="recurrence is not finite"):
        spectral_density(NaNs(), num_probes=1, num_steps=5, generator=gen())


def test_block_traces_share_probes_and_are_unbiased():
    from lightning_curvature import block_hutchinson_traces

    A = spectrum_matrix([5.0, -3.0, 2.0, 1.0, 0.5, 0.25, -1.0, 4.0], seed=16)
    blocks = [torch.arange(0, 3), torch.arange(3, 8), torch.arange(0, 8)]
    res = block_hutchinson_traces(A, blocks, num_probes=500, generator=gen())
    for idx, r in zip(blocks, res):
        Ab = A[idx][:, idx]
        off = float(A[idx].pow(2).sum() - Ab.pow(2).sum())
        var = 2 * float(Ab.pow(2).sum() - torch.diagonal(Ab).pow(2).sum()) + off
        assert abs(r.value - float(torch.trace(Ab))) <= 4 * (var / 500) ** 0.5
        assert r.stderr == pytest.approx((var / 500) ** 0.5, rel=0.2)
    assert res[0].value + res[1].value == pytest.approx(res[2].value)  # same probes
    assert res[0].num_matvecs == 500
    exact = block_hutchinson_traces(torch.diag(torch.arange(6.0)), [torch.arange(2), torch.arange(2, 6)], 3)
    assert [r.value for r in exact] == [1.0, 14.0]


def test_hutchpp_sketch_stays_small_when_rtol_makes_the_budget_a_ceiling():
    A = spectrum_matrix(OUTLIERS, seed=17)
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def matvec(self, v):
            return A @ v

        def matmat(self, V):
            calls.append(V.shape[1])
            return A @ V

    res = hutchpp_trace(Counting(), 100_000, rtol=0.05, generator=gen())
    assert max(calls) <= 32 and res.num_matvecs < 1000
