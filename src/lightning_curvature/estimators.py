"""Matrix-free estimators of spectral quantities of a symmetric operator.

Plain torch, no Lightning. Every estimator takes a :class:`~lightning_curvature.operators.CurvatureOperator`
(anything with ``shape`` and ``matvec``) *or* a dense symmetric tensor, an optional ``torch.Generator`` for its
random draws (the global RNG is never used), and returns a small result dataclass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .operators import CurvatureOperator, as_operator

__all__ = [
    "DISTRIBUTIONS",
    "EigenResult",
    "TraceResult",
    "hutchinson_trace",
    "power_iteration",
    "random_probes",
]

DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "normal")


@dataclass
class TraceResult:
    """Result of a stochastic trace estimate.

    Attributes:
        value: the estimate of ``tr(H)``.
        stderr: standard error of ``value`` (sample standard deviation of the per-probe estimates over
            ``sqrt(num_probes)``); ``nan`` with fewer than two probes, ``0`` for exact estimates.
        num_matvecs: operator products spent.
        num_probes: random probes used.
        samples: the per-probe estimates ``zᵢᵀ H zᵢ``.
    """

    value: float
    stderr: float
    num_matvecs: int
    num_probes: int
    samples: list[float] = field(default_factory=list, repr=False)


@dataclass
class EigenResult:
    """Result of an eigenvalue solver.

    Attributes:
        eigenvalues: ``(k,)`` float64 estimated eigenvalues, in the order the solver documents.
        eigenvectors: ``(P, k)`` unit-norm estimated eigenvectors, columns matching ``eigenvalues``.
        num_matvecs: operator products spent.
        converged: ``(k,)`` booleans, whether each pair met the residual tolerance.
        residuals: ``(k,)`` relative residuals ``‖H v − λ v‖ / |λ|`` of the returned pairs.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    num_matvecs: int
    converged: Tensor
    residuals: Tensor


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def random_probes(
    n: int,
    m: int,
    *,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw an ``(n, m)`` block of probe vectors with ``E[z zᵀ] = I``.

    Rademacher entries are ±1 with equal probability (drawn as random bits, cheaper than ``bernoulli_``);
    normal entries are standard Gaussian. Draws happen on the generator's device, then move to ``device``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if distribution == "rademacher":
        z = torch.randint(0, 2, (n, m), generator=generator, device=gen_device, dtype=torch.int8)
        z = z.to(device=device, dtype=dtype).mul_(2).sub_(1)
    else:
        z = torch.randn((n, m), generator=generator, device=gen_device, dtype=dtype).to(device)
    return z


def hutchinson_trace(
    op: CurvatureOperator | Tensor,
    num_probes: int = 20,
    *,
    rtol: float | None = None,
    min_probes: int = 5,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
) -> TraceResult:
    r"""Hutchinson's stochastic trace estimator.

    .. math::
        \operatorname{tr}(H) \approx \frac{1}{m} \sum_{i=1}^{m} z_i^\top H z_i, \qquad \mathbb{E}[z z^\top] = I,

    (Hutchinson 1990, "A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
    splines"; Avron & Toledo 2011). Each sample is unbiased; for Rademacher probes its variance is
    ``2 (‖H‖_F² − Σᵢ Hᵢᵢ²)``, so the estimate is exact for a diagonal matrix; Gaussian probes have variance
    ``2 ‖H‖_F²``. The reported ``stderr`` is the sample standard deviation over ``sqrt(m)``.

    Args:
        op: an operator or a dense symmetric matrix.
        num_probes: maximum number of probes (and products).
        rtol: if given, stop as soon as ``stderr <= rtol * |value|`` after at least ``min_probes`` probes.
            The rule is on the estimator's own standard error, never on how much the running mean moved.
        min_probes: the fewest probes before ``rtol`` may stop (at least 2, so a standard error exists).
        distribution: ``"rademacher"`` (default, lower variance) or ``"normal"``.
        generator: source of the probes; the global RNG is untouched.

    Returns:
        A :class:`TraceResult`.

    Example:
        >>> hutchinson_trace(torch.diag(torch.tensor([1.0, 2.0, 3.0])), num_probes=4).value
        6.0
    """
    op = as_operator(op)
    _check_positive_int("num_probes", num_probes)
    _check_positive_int("min_probes", min_probes, 2)
    if rtol is not None and not (rtol > 0):
        raise ValueError(f"rtol must be a positive float or None, got {rtol!r}.")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    n = op.shape[0]
    samples: list[float] = []
    total = 0.0
    total_sq = 0.0
    stderr = math.nan
    for i in range(num_probes):
        z = random_probes(n, 1, distribution=distribution, generator=generator, dtype=op.dtype, device=op.device)[:, 0]
        s = float(torch.dot(z, op.matvec(z)).to(torch.float64))
        samples.append(s)
        total += s
        total_sq += s * s
        m = i + 1
        if m >= 2:
            mean = total / m
            var = max(total_sq - m * mean * mean, 0.0) / (m - 1)
            stderr = math.sqrt(var / m)
            if rtol is not None and m >= min_probes and stderr <= rtol * abs(mean):
                break
    m = len(samples)
    return TraceResult(value=total / m, stderr=stderr, num_matvecs=m, num_probes=m, samples=samples)


def _orthonormalize_against(v: Tensor, basis: Tensor | None, passes: int = 2) -> Tensor:
    """Remove from ``v`` its components along the orthonormal columns of ``basis`` (twice, for stability)."""
    if basis is not None and basis.shape[1] > 0:
        for _ in range(passes):
            v = v - basis @ (basis.T @ v)
    return v


def power_iteration(
    op: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    r"""Top-``k`` eigenpairs by power iteration with deflation by orthogonalisation.

    For the ``j``-th pair, iterate ``v ← P H v / ‖P H v‖`` with ``P = I − V Vᵀ`` the projector away from
    the ``j − 1`` vectors already found, and Rayleigh quotient ``λ = vᵀ H v`` (von Mises & Pollaczek-Geiringer
    1929; Yao et al. 2020, "PyHessian"). Each pair iterates until the deflated residual
    ``‖P H v − λ v‖ ≤ tol · |λ|`` (the change in ``λ`` alone can stall on a slow direction) or ``max_iter``.
    A final Rayleigh-Ritz step on the span of the found vectors (no extra products) makes the pairs
    consistent; ``converged`` and ``residuals`` report the **true** relative residual ``‖H v − λ v‖ / |λ|``
    of each returned pair.

    Power iteration finds the eigenvalues of **largest magnitude**, which may be negative: on a
    saddle with ``|λ_min| > λ_max`` the first pair is ``λ_min``. Use
    :func:`~lightning_curvature.estimators.lanczos` with ``which="LA"`` when the largest *algebraic*
    eigenvalue (sharpness) is wanted.

    Args:
        op: an operator or a dense symmetric matrix.
        k: number of eigenpairs.
        max_iter: maximum products per pair.
        tol: relative residual tolerance.
        init: optional ``(P,)`` or ``(P, j)`` starting vectors (warm start, e.g. the previous estimate's
            ``eigenvectors``); columns beyond ``k`` are ignored and missing ones are drawn at random.
        generator: source of random starting vectors.

    Returns:
        An :class:`EigenResult` with pairs sorted by descending ``|λ|``.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, -2.0, 1.0]))
        >>> res = power_iteration(A, k=2, tol=1e-6, generator=torch.Generator().manual_seed(0))
        >>> [round(lam, 4) for lam in res.eigenvalues.tolist()]
        [5.0, -2.0]
    """
    op = as_operator(op)
    _check_positive_int("k", k)
    _check_positive_int("max_iter", max_iter)
    if not (tol > 0):
        raise ValueError(f"tol must be a positive float, got {tol!r}.")
    n = op.shape[0]
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension {n}.")
    if init is not None:
        if init.ndim not in (1, 2) or init.shape[0] != n:
            raise ValueError(f"init must have {n} rows, got shape {tuple(init.shape)}.")
        init = init.reshape(n, -1)
    vectors: list[Tensor] = []
    products: list[Tensor] = []
    matvecs = 0
    for j in range(k):
        basis = torch.stack(vectors, dim=1) if vectors else None
        if init is not None and j < init.shape[1]:
            v = init[:, j].to(device=op.device, dtype=op.dtype).clone()
        else:
            v = random_probes(n, 1, distribution="normal", generator=generator, dtype=op.dtype, device=op.device)[:, 0]
        v = _orthonormalize_against(v, basis)
        if float(v.norm()) == 0.0:  # a degenerate warm start: draw a fresh direction
            v = random_probes(n, 1, distribution="normal", generator=generator, dtype=op.dtype, device=op.device)[:, 0]
            v = _orthonormalize_against(v, basis)
        v = v / v.norm()
        hv = op.matvec(v)
        matvecs += 1
        for _ in range(max_iter - 1):
            # convergence of the deflated problem: residual of (I - VVᵀ) H restricted to the complement of V
            w = _orthonormalize_against(hv, basis)
            lam = float(torch.dot(v, w))
            if float((w - lam * v).norm()) <= tol * abs(lam):
                break
            norm = w.norm()
            if float(norm) == 0.0:  # v lies in the null space of the deflated operator
                break
            v = w / norm
            hv = op.matvec(v)
            matvecs += 1
        vectors.append(v)
        products.append(hv)
    # Rayleigh-Ritz on the found subspace (no extra products): consistent pairs and their *true* residuals.
    V, HV = torch.stack(vectors, dim=1), torch.stack(products, dim=1)
    T = V.T @ HV
    theta, S = torch.linalg.eigh((T + T.T).to(torch.float64) / 2)
    order = torch.argsort(theta.abs(), descending=True)
    theta, S = theta[order], S[:, order].to(V.dtype)
    V, HV = V @ S, HV @ S
    res = (HV - V * theta.to(V.dtype)).norm(dim=0).to(torch.float64)
    scale = theta.abs()
    rel = torch.where(scale > 0, res / scale.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.where(res == 0, 0.0, math.inf))
    return EigenResult(
        eigenvalues=theta,
        eigenvectors=V,
        num_matvecs=matvecs,
        converged=rel <= tol,
        residuals=rel,
    )
