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
    "WHICH",
    "EigenResult",
    "LanczosDecomposition",
    "SpectralDensity",
    "TraceResult",
    "block_hutchinson_traces",
    "deflated_hutchinson_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "power_iteration",
    "random_probes",
    "spectral_density",
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
    _check_trace_args(num_probes, min_probes, rtol, distribution)
    samples, stderr, m = _projected_hutchinson(op, None, num_probes, rtol, 0.0, min_probes, distribution, generator)
    return TraceResult(value=sum(samples) / m, stderr=stderr, num_matvecs=m, num_probes=m, samples=samples)


def _check_trace_args(num_probes: int, min_probes: int, rtol: float | None, distribution: str, name: str = "num_probes",
                      minimum: int = 1) -> None:
    _check_positive_int(name, num_probes, minimum)
    _check_positive_int("min_probes", min_probes, 2)
    if rtol is not None and not (rtol > 0):
        raise ValueError(f"rtol must be a positive float or None, got {rtol!r}.")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")


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


# ---------------------------------------------------------------------------------------------------- Lanczos

WHICH: tuple[str, ...] = ("LA", "SA", "LM")


@dataclass
class LanczosDecomposition:
    """A Lanczos run: ``H Q ≈ Q T`` with ``Q`` ``(P, m)`` orthonormal and ``T`` ``(m, m)`` tridiagonal.

    Attributes:
        basis: ``Q`` as a :class:`KrylovBasis` (``basis @ S`` and ``basis.tensor()``).
        alpha: diagonal of ``T`` (float64).
        beta: off-diagonal of ``T`` (float64), length ``m - 1``; a zero marks a restart after an invariant subspace.
        last_beta: the norm of the residual direction after the last step (``β_m``), for Ritz residuals.
        num_matvecs: operator products spent.
    """

    basis: KrylovBasis
    alpha: Tensor
    beta: Tensor
    last_beta: float
    num_matvecs: int

    def tridiagonal(self) -> Tensor:
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(theta, descending=True)[:k]
    if which == "SA":
        return torch.argsort(theta)[:k]
    return torch.argsort(theta.abs(), descending=True)[:k]


class KrylovBasis:
    """Orthonormal columns stored in fixed-size chunks, so memory grows with the columns used, never copied.

    A Lanczos run on a model with ``P`` parameters holds ``m`` vectors of length ``P``; preallocating ``max_iter``
    columns would cost ``max_iter · P`` even when the run converges after a few steps.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, chunk: int = 16) -> None:
        self.n, self.dtype, self.device, self.chunk = n, dtype, device, chunk
        self._chunks: list[Tensor] = []
        self.size = 0

    def append(self, v: Tensor) -> None:
        j = self.size % self.chunk
        if j == 0:
            self._chunks.append(torch.empty((self.n, self.chunk), dtype=self.dtype, device=self.device))
        self._chunks[-1][:, j] = v
        self.size += 1

    def _blocks(self) -> list[Tensor]:
        full, rest = divmod(self.size, self.chunk)
        return self._chunks[:full] + ([self._chunks[full][:, :rest]] if rest else [])

    def project_out(self, w: Tensor, passes: int = 2) -> Tensor:
        """``w − Q Qᵀ w``, block by block, twice ("twice is enough", Parlett 1980)."""
        for _ in range(passes):
            for block in self._blocks():
                w = w - block @ (block.T @ w)
        return w

    def __matmul__(self, S: Tensor) -> Tensor:
        """``Q S`` for an ``(m, k)`` matrix ``S``."""
        out = torch.zeros((self.n, S.shape[1]), dtype=self.dtype, device=self.device)
        start = 0
        for block in self._blocks():
            out += block @ S[start:start + block.shape[1]].to(self.dtype)
            start += block.shape[1]
        return out

    def tensor(self) -> Tensor:
        """The ``(P, m)`` matrix ``Q`` (a copy)."""
        blocks = self._blocks()
        return torch.cat(blocks, dim=1) if blocks else torch.empty((self.n, 0), dtype=self.dtype, device=self.device)


def _lanczos_steps(
    op: CurvatureOperator,
    q0: Tensor,
    max_steps: int,
    generator: torch.Generator | None,
    stop: Any = None,
    restart: bool = True,
) -> LanczosDecomposition:
    """Run up to ``max_steps`` Lanczos steps with full reorthogonalisation, from the unit vector ``q0``.

    ``stop(alpha, beta, last_beta)`` is asked after each step whether enough has been done. On breakdown (an
    invariant subspace), the run continues from a random vector orthogonal to the basis, with ``β = 0``, when
    ``restart`` is true, and stops otherwise (for quadrature, a breakdown means the rule is already exact).
    """
    n = op.shape[0]
    Q = KrylovBasis(n, op.dtype, op.device)
    alpha: list[float] = []
    beta: list[float] = []
    q = q0
    last_beta = 0.0
    steps = min(max_steps, n)
    for _ in range(steps):
        Q.append(q)
        w = op.matvec(q)
        a = float(torch.dot(q, w))
        alpha.append(a)
        # full reorthogonalisation also removes the three-term recurrence's part (α q_j + β q_{j−1})
        w = Q.project_out(w)
        b = float(w.norm())
        last_beta = b
        scale = max(max(abs(x) for x in alpha), 1e-30)
        if (stop is not None and stop(alpha, beta, b)) or Q.size == steps:
            break
        if b <= 1e-10 * scale:  # invariant subspace: restart orthogonally, T decouples (β = 0)
            if not restart:
                last_beta = 0.0
                break
            z = random_probes(n, 1, distribution="normal", generator=generator, dtype=op.dtype, device=op.device)[:, 0]
            z = Q.project_out(z)
            zn = float(z.norm())
            if zn == 0.0:
                break
            q = z / zn
            beta.append(0.0)
            last_beta = 0.0
        else:
            q = w / b
            beta.append(b)
    m = Q.size
    return LanczosDecomposition(
        basis=Q,
        alpha=torch.tensor(alpha, dtype=torch.float64),
        beta=torch.tensor(beta[: m - 1], dtype=torch.float64),
        last_beta=last_beta,
        num_matvecs=m,
    )


def _start_vector(
    op: CurvatureOperator, init: Tensor | None, generator: torch.Generator | None, mix: float = 0.05
) -> Tensor:
    n = op.shape[0]
    z = random_probes(n, 1, distribution="normal", generator=generator, dtype=op.dtype, device=op.device)[:, 0]
    z = z / z.norm()
    if init is not None:
        init = init.reshape(n, -1).to(device=op.device, dtype=op.dtype)
        norms = init.norm(dim=0).clamp_min(torch.finfo(op.dtype).tiny)
        w = (init / norms).sum(dim=1)
        if float(w.norm()) > 0:
            # mostly the warm start, plus a little of everything so a new direction is not missed
            z = w / w.norm() + mix * z
            z = z / z.norm()
    return z


def lanczos(
    op: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    which: Literal["LA", "SA", "LM"] = "LA",
    max_iter: int | None = None,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> EigenResult:
    r"""Extreme eigenpairs by the Lanczos method with full reorthogonalisation.

    Builds the Krylov basis ``Q = [q₁ … q_m]`` of ``span{q₁, H q₁, …, H^{m−1} q₁}`` with ``Qᵀ H Q = T`` tridiagonal
    (Lanczos 1950), every new vector orthogonalised against the whole basis (so no spurious "ghost" copies of
    converged eigenvalues appear; Paige 1971, Parlett 1980). Ritz pairs ``(θᵢ, Q sᵢ)`` from ``T sᵢ = θᵢ sᵢ`` have the
    residual ``‖H y − θ y‖ = |β_m| |e_mᵀ sᵢ|`` for free; the run stops when the ``k`` wanted pairs all have
    ``|β_m e_mᵀ sᵢ| ≤ tol · |θᵢ|``, or after ``max_iter`` products. For the same accuracy Lanczos needs far fewer
    products than power iteration (its Krylov polynomial is optimal; power iteration uses ``t^m``) and it finds
    the largest *algebraic* eigenvalues with ``which="LA"``, the sharpness, whatever the sign of the spectrum.

    Memory: the basis holds ``m`` vectors of length ``P``.

    Args:
        op: an operator or a dense symmetric matrix.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic (most negative), ``"LM"`` largest
            magnitude.
        max_iter: maximum products (Krylov dimension); default ``max(4k + 30, 60)``, capped at ``P``.
        tol: relative Ritz residual tolerance.
        init: optional ``(P,)`` or ``(P, j)`` warm-start vectors (e.g. the previous estimate's eigenvectors); the
            start vector is their normalised sum plus 5% of a random direction (so a new direction is not missed).
        generator: source of the random start vector.

    Returns:
        An :class:`EigenResult` sorted by ``which`` (``LA``: descending; ``SA``: ascending; ``LM``: descending
        ``|λ|``), with true residuals ``‖H v − λ v‖ / |λ|``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, -6.0, 3.0, 2.0], dtype=torch.float64))
        >>> res = lanczos(A, k=2, which="LA", tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> [round(lam, 6) for lam in res.eigenvalues.tolist()]
        [3.0, 2.0]
        >>> round(lanczos(A, which="SA", generator=torch.Generator().manual_seed(0)).eigenvalues.item(), 6)
        -6.0
    """
    op = as_operator(op)
    _check_positive_int("k", k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    if not (tol > 0):
        raise ValueError(f"tol must be a positive float, got {tol!r}.")
    n = op.shape[0]
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension {n}.")
    if max_iter is None:
        max_iter = max(4 * k + 30, 60)
    _check_positive_int("max_iter", max_iter)
    max_iter = max(min(max_iter, n), k)
    if init is not None and (init.ndim not in (1, 2) or init.shape[0] != n):
        raise ValueError(f"init must have {n} rows, got shape {tuple(init.shape)}.")

    def converged(alpha: list[float], beta: list[float], last_beta: float) -> bool:
        m = len(alpha)
        if m < k:
            return False
        T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(beta[: m - 1], dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        idx = _select(theta, k, which)
        res = last_beta * S[-1, idx].abs()
        return bool((res <= tol * theta[idx].abs()).all())

    q0 = _start_vector(op, init, generator)
    dec = _lanczos_steps(op, q0, max_iter, generator, stop=converged)
    theta, S = torch.linalg.eigh(dec.tridiagonal())
    idx = _select(theta, k, which)
    theta, S = theta[idx], S[:, idx]
    vectors = dec.basis @ S
    res = dec.last_beta * S[-1].abs()
    scale = theta.abs()
    rel = torch.where(scale > 0, res / scale.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.where(res == 0, 0.0, math.inf))
    return EigenResult(
        eigenvalues=theta,
        eigenvectors=vectors,
        num_matvecs=dec.num_matvecs,
        converged=rel <= tol,
        residuals=rel,
    )


# ---------------------------------------------------------------------------------------------------- better traces


def _projected_hutchinson(
    op: CurvatureOperator,
    basis: Tensor | None,
    num_probes: int,
    rtol: float | None,
    exact: float,
    min_probes: int,
    distribution: str,
    generator: torch.Generator | None,
) -> tuple[list[float], float, int]:
    """Hutchinson on ``(I − Q Qᵀ) H (I − Q Qᵀ)`` (plain Hutchinson when ``basis`` is None).

    Returns the per-probe samples, the standard error of their mean and their number; stops once that standard error
    is at most ``rtol · |exact + mean|`` after ``min_probes`` probes.
    """
    n = op.shape[0]
    samples: list[float] = []
    total = total_sq = 0.0
    stderr = math.nan
    for i in range(num_probes):
        z = random_probes(n, 1, distribution=distribution, generator=generator,  # type: ignore[arg-type]
                          dtype=op.dtype, device=op.device)[:, 0]
        z = _orthonormalize_against(z, basis, passes=1)
        s = float(torch.dot(z, op.matvec(z)).to(torch.float64))
        samples.append(s)
        total += s
        total_sq += s * s
        m = i + 1
        if m >= 2:
            mean = total / m
            stderr = math.sqrt(max(total_sq - m * mean * mean, 0.0) / (m - 1) / m)
            if rtol is not None and m >= min_probes and stderr <= rtol * abs(exact + mean):
                break
    return samples, stderr, len(samples)


def hutchpp_trace(
    op: CurvatureOperator | Tensor,
    num_matvecs: int = 30,
    *,
    sketch_size: int | None = None,
    rtol: float | None = None,
    min_probes: int = 5,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
) -> TraceResult:
    r"""Hutch++: exact trace on a sketched top subspace plus Hutchinson on the rest.

    With a random ``S`` (``P × s``), ``Q = orth(H S)`` captures the dominant eigenspace, and

    .. math::
        \operatorname{tr}(H) = \operatorname{tr}(Q^\top H Q) + \operatorname{tr}\big((I-QQ^\top) H (I-QQ^\top)\big),

    the first term computed exactly (``s`` products), the second by Hutchinson with probes projected away from ``Q``
    (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation"). Its error is
    ``O(1/m)`` instead of Hutchinson's ``O(1/√m)`` for matrices whose spectrum decays, as Hessians of networks do.
    The standard error is that of the Hutchinson part (the sketched part is exact).

    Args:
        op: an operator or a dense symmetric matrix.
        num_matvecs: total product budget ``m``: ``2s`` for the sketch, the rest for Hutchinson (at least 2).
        sketch_size: ``s``; default ``m // 3`` (the paper's split), at most 32 when ``rtol`` is given (then ``m`` is
            only a ceiling, and the sketch holds ``s`` vectors of length ``P``).
        rtol: stop the Hutchinson part once ``stderr <= rtol * |value|`` (after ``min_probes`` probes).
        min_probes: fewest Hutchinson probes before ``rtol`` may stop (>= 2).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: source of randomness.

    Example:
        A rank-3 matrix is captured exactly by a sketch of 3, so the estimate is exact:

        >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
        >>> round(hutchpp_trace(A, 9, sketch_size=3, generator=torch.Generator().manual_seed(0)).value, 6)
        111.0
    """
    op = as_operator(op)
    _check_trace_args(num_matvecs, min_probes, rtol, distribution, name="num_matvecs", minimum=3)
    n = op.shape[0]
    if sketch_size is None:
        # the paper's split; with rtol the budget is only a ceiling, so the sketch (s vectors of length P) stays small
        s = num_matvecs // 3 if rtol is None else min(num_matvecs // 3, 32)
    else:
        s = sketch_size
    _check_positive_int("sketch_size", s)
    s = min(s, n)
    remaining = num_matvecs - 2 * s
    if remaining < 2 and s < n:
        raise ValueError(f"num_matvecs={num_matvecs} leaves fewer than 2 Hutchinson probes after a sketch of {s}.")
    S = random_probes(n, s, distribution=distribution, generator=generator, dtype=op.dtype, device=op.device)
    Q, _ = torch.linalg.qr(op.matmat(S))
    exact = float(torch.trace(Q.T @ op.matmat(Q)).to(torch.float64))
    if s == n:  # the sketch is the whole space: exact
        return TraceResult(value=exact, stderr=0.0, num_matvecs=2 * s, num_probes=0, samples=[])
    samples, stderr, m = _projected_hutchinson(op, Q, remaining, rtol, exact, min_probes, distribution, generator)
    return TraceResult(value=exact + sum(samples) / m, stderr=stderr, num_matvecs=2 * s + m, num_probes=m,
                       samples=samples)


def deflated_hutchinson_trace(
    op: CurvatureOperator | Tensor,
    eigenvectors: Tensor,
    num_probes: int = 20,
    *,
    eigenvalues: Tensor | None = None,
    rtol: float | None = None,
    min_probes: int = 5,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
) -> TraceResult:
    r"""Hutchinson on the complement of known top eigenvectors: reuse what an eigenvalue solver already found.

    For orthonormal ``V`` (``P × k``) and ``Π = I − V Vᵀ``,

    .. math::
        \operatorname{tr}(H) = \operatorname{tr}(V^\top H V) + \operatorname{tr}(\Pi H \Pi),

    exactly, whatever ``V``. The first term is ``Σ θᵢ`` when ``V`` are Ritz vectors with Ritz values ``θ`` (as
    returned by :func:`lanczos` or :func:`power_iteration`), free; otherwise ``k`` products. The second is estimated
    by Hutchinson with probes projected by ``Π``, whose variance no longer contains the deflated outliers (the
    idea of Hutch++ with the sketch taken from the eigensolver; Meyer et al. 2021; Gambhir, Stathopoulos &
    Orginos 2017). Unbiased; the standard error is the Hutchinson part's.

    Args:
        op: an operator or a dense symmetric matrix.
        eigenvectors: ``(P, k)`` vectors (orthonormalised here).
        num_probes: maximum Hutchinson probes.
        eigenvalues: ``(k,)`` Ritz values for ``eigenvectors`` (``diag(Vᵀ H V)``); computed (``k`` products) if omitted.
        rtol: stop once ``stderr <= rtol * |value|`` (after ``min_probes``).
        min_probes: fewest probes before ``rtol`` may stop (>= 2).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: source of the probes.
    """
    op = as_operator(op)
    _check_trace_args(num_probes, min_probes, rtol, distribution, minimum=2)
    V = eigenvectors.reshape(op.shape[0], -1).to(device=op.device, dtype=op.dtype)
    matvecs = 0
    if eigenvalues is None:
        V, _ = torch.linalg.qr(V)
        exact = float(torch.trace(V.T @ op.matmat(V)).to(torch.float64))
        matvecs += V.shape[1]
    else:
        # Ritz vectors are orthonormal up to rounding; keep them as they are so Σθ stays tr(VᵀHV)
        exact = float(eigenvalues.to(torch.float64).sum())
    samples, stderr, m = _projected_hutchinson(op, V, num_probes, rtol, exact, min_probes, distribution, generator)
    return TraceResult(value=exact + sum(samples) / m, stderr=stderr, num_matvecs=matvecs + m, num_probes=m,
                       samples=samples)


# ---------------------------------------------------------------------------------------------------- density


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the eigenvalue density.

    Attributes:
        nodes: ``(num_probes, num_steps)`` Ritz values of each probe's Lanczos run.
        weights: matching quadrature weights (squared first components; each row sums to 1).
        grid: ``(num_points,)`` evaluation points.
        density: ``(num_points,)`` Gaussian-broadened density on ``grid`` (integrates to ~1 over a wide grid).
        sigma: the broadening width.
        num_matvecs: operator products spent.
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_matvecs: int

    def moments(self, order: int = 1) -> float:
        """``E[λ^order]`` under the quadrature (``order=1`` gives ``tr(H) / P``)."""
        return float((self.weights * self.nodes**order).sum(dim=1).mean())


def spectral_density(
    op: CurvatureOperator | Tensor,
    num_probes: int = 5,
    num_steps: int = 30,
    *,
    num_points: int = 512,
    sigma: float | None = None,
    grid: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SpectralDensity:
    r"""Eigenvalue density by stochastic Lanczos quadrature (SLQ) with Gaussian broadening.

    For a unit probe ``v`` and its ``m``-step Lanczos tridiagonal ``T = S Θ Sᵀ``, the Gauss quadrature
    ``Σᵢ (e₁ᵀ sᵢ)² f(θᵢ)`` approximates ``vᵀ f(H) v``; averaging over random probes approximates
    ``tr f(H) / P``. With ``f`` a Gaussian of width ``σ``,

    .. math::
        \phi(t) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_{i=1}^{m} w^{(l)}_i \, \mathcal{N}(t;\, \theta^{(l)}_i, \sigma^2)

    (Lin, Saad & Yang 2016, "Approximating spectral densities of large matrices"; Ghorbani, Krishnan & Xiao 2019;
    Yao et al. 2020). The weights of each probe sum to 1, so ``φ`` integrates to 1, and its mean equals the
    Hutchinson trace estimate over ``P`` of the same probes.

    Args:
        op: an operator or a dense symmetric matrix.
        num_probes: independent Rademacher probes.
        num_steps: Lanczos steps per probe (with full reorthogonalisation).
        num_points: grid size when ``grid`` is not given (spanning the Ritz values ± 3σ).
        sigma: broadening; default 1% of the Ritz value range (at least a tiny positive number).
        grid: explicit evaluation points.
        generator: source of the probes.
    """
    op = as_operator(op)
    _check_positive_int("num_probes", num_probes)
    _check_positive_int("num_steps", num_steps)
    n = op.shape[0]
    steps = min(num_steps, n)
    nodes, weights = [], []
    matvecs = 0
    for _ in range(num_probes):
        z = random_probes(n, 1, generator=generator, dtype=op.dtype, device=op.device)[:, 0]
        dec = _lanczos_steps(op, z / z.norm(), steps, generator, restart=False)
        matvecs += dec.num_matvecs
        theta, S = torch.linalg.eigh(dec.tridiagonal())
        w = S[0] ** 2
        pad = steps - theta.shape[0]  # stopped early at an invariant subspace: pad with zero-weight nodes
        nodes.append(torch.cat([theta, theta.new_zeros(pad)]))
        weights.append(torch.cat([w, w.new_zeros(pad)]))
    N, W = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(N.min()), float(N.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}.")
    if grid is None:
        grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, num_points, dtype=torch.float64)
    grid = grid.to(torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None, None] - N[None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (gauss * W[None]).sum(dim=2).mean(dim=1)
    return SpectralDensity(nodes=N, weights=W, grid=grid, density=density, sigma=float(sigma), num_matvecs=matvecs)


def block_hutchinson_traces(
    op: CurvatureOperator | Tensor,
    blocks: list[Tensor],
    num_probes: int = 20,
    *,
    distribution: Literal["rademacher", "normal"] = "rademacher",
    generator: torch.Generator | None = None,
) -> list[TraceResult]:
    r"""Traces of several diagonal blocks ``H[b, b]`` from the same Hutchinson probes.

    For a full probe ``z`` with ``E[z zᵀ] = I``, ``E[z_bᵀ (H z)_b] = tr(H_bb)``: the cross terms ``z_bᵀ H_{bc} z_c``
    have mean zero because ``z_b`` and ``z_c`` are independent. So one product per probe estimates every block at
    once (Hutchinson 1990, applied per block as in Yao et al. 2020's layer-wise traces); blocks may overlap. The
    variance per block includes its coupling to the rest, ``2 Σ_{i∈b, j≠i} H_ij²`` for Rademacher probes.

    Args:
        op: an operator or a dense symmetric matrix.
        blocks: 1-D long index tensors, one per block.
        num_probes: probes (>= 2).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: source of the probes.

    Returns:
        One :class:`TraceResult` per block (each with ``num_matvecs`` equal to the shared total).
    """
    op = as_operator(op)
    _check_positive_int("num_probes", num_probes, 2)
    n = op.shape[0]
    samples = torch.empty((num_probes, len(blocks)), dtype=torch.float64)
    for i in range(num_probes):
        z = random_probes(n, 1, distribution=distribution, generator=generator, dtype=op.dtype, device=op.device)[:, 0]
        zhz = (z * op.matvec(z)).to(torch.float64)
        for j, idx in enumerate(blocks):
            samples[i, j] = zhz[idx.to(zhz.device)].sum()
    mean = samples.mean(dim=0)
    stderr = samples.std(dim=0) / math.sqrt(num_probes)
    return [
        TraceResult(value=float(mean[j]), stderr=float(stderr[j]), num_matvecs=num_probes, num_probes=num_probes,
                    samples=samples[:, j].tolist())
        for j in range(len(blocks))
    ]
