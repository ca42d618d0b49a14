"""Matrix-free estimators of spectral quantities of a symmetric operator.

Plain torch, no Lightning. Every estimator takes a :class:`~lightning_curvature.operators.CurvatureOperator`
(anything with ``shape`` and ``matvec``) *or* a dense symmetric tensor, an optional ``torch.Generator`` for its
random draws (the global RNG is never used), and returns a small result dataclass.

An operator may hold its vectors sharded over processes (a ``space`` attribute, see
:mod:`~lightning_curvature.spaces`): every estimator then sums its inner products, norms and Gram matrices over the
processes and draws its probes through the space, so each process holds ``P / world`` entries of every vector and
all of them compute the same numbers. Operators without one hold whole vectors.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .operators import CurvatureOperator, as_operator
from .spaces import ShardedSpace, space_of

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
        converged: ``(k,)`` booleans, whether each pair met the residual tolerance; for :func:`lanczos`, also that
            the run has evidence that no unreported eigenvalue lies beyond the ``k``-th (see there).
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


@functools.cache
def _sqrt_tiny(dtype: torch.dtype) -> float:
    """``√(smallest normal)`` of ``dtype``: below it a norm's squares lose digits."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _norm(x: Tensor, dim: int | None = None, space: ShardedSpace | None = None) -> Tensor:
    """``‖x‖₂`` (along ``dim``) without overflow or underflow in its squares; over every process's shard with ``space``.

    A float32 norm overflows once ``‖x‖`` passes about ``1.8e19`` (its squares pass the largest float32) and loses
    its digits below about ``1e-19`` (its squares pass the smallest normal float32), while the norm itself is
    representable from ``1e-38`` to ``3.4e38``: a curvature that large (a run blowing up) or that small would
    otherwise give ``inf`` or ``0``, then NaN or a silently wrong estimate. Outside ``[√tiny, ∞)`` the norm is taken
    again on ``x / max|x|`` (the usual path costs one check of a scalar or a few).
    """
    if space is not None:  # this process's norms, safely, then over the processes
        return space.norms(_norm(x, dim))
    n = torch.linalg.vector_norm(x, dim=dim)
    if x.numel() == 0 or bool((torch.isfinite(n) & (n >= _sqrt_tiny(x.dtype))).all()):
        return n
    scale = (x.abs().amax(dim=dim, keepdim=True) if dim is not None else x.abs().max()).clamp_min(
        torch.finfo(x.dtype).tiny)
    scaled = torch.linalg.vector_norm(x / scale, dim=dim)
    return scaled * (scale.squeeze(dim) if dim is not None else scale)


def _sum(space: ShardedSpace | None, t: Tensor) -> Tensor:
    """``t`` (partial sums over this process's entries) summed over the processes of ``space``; ``t`` without one."""
    return t if space is None else space.sum(t)


def _dot(space: ShardedSpace | None, a: Tensor, b: Tensor) -> Tensor:
    """``aᵀ b`` over the whole vectors."""
    return _sum(space, torch.dot(a, b))


def _columns(x: Tensor) -> Tensor:
    """``x`` as an ``(n, m)`` block of columns, a vector as one column.

    (``reshape(n, -1)`` fails for ``n = 0``: a process holding no entry of a sharded vector.)
    """
    return x if x.ndim == 2 else x.reshape(-1, 1)


def _dim(op: CurvatureOperator) -> int:
    """The dimension ``P`` of the space ``op`` acts on (its vectors' length, or the sum over processes' shards)."""
    space = space_of(op)
    return op.shape[0] if space is None else space.dim


def _draw(op: CurvatureOperator, m: int, distribution: str, generator: torch.Generator | None) -> Tensor:
    """``(n, m)`` probes for ``op`` (this process's rows of global vectors when its vectors are sharded)."""
    space = space_of(op)
    if space is None:
        return random_probes(op.shape[0], m, distribution=distribution, generator=generator,  # type: ignore[arg-type]
                             dtype=op.dtype, device=op.device)
    return space.draw(m, distribution, generator, op.dtype, op.device)


def _orthonormal_columns(M: Tensor, space: ShardedSpace | None) -> Tensor:
    """An orthonormal basis of the columns of ``M`` (``(n, s)``; over every process's rows with ``space``).

    Whole vectors: Householder QR. Sharded rows: two passes of a Gram-matrix orthonormalisation, ``G = MᵀM = U Λ Uᵀ``
    (one all-gather of an ``s × s`` matrix) and ``M ← M U Λ^{-1/2}`` ("CholeskyQR2" with an eigendecomposition in
    place of the Cholesky factor, so that a rank-deficient ``M`` loses its dependent columns instead of failing;
    Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014: the second pass restores orthogonality to working precision
    for ``κ(M) ≲ ε^{-1/2}``). The basis spans the same space as QR's, in another rotation.
    """
    if space is None:
        return torch.linalg.qr(M).Q
    Q = M
    for _ in range(2):
        G = space.sum(Q.T.to(torch.float64) @ Q.to(torch.float64))
        evals, U = torch.linalg.eigh((G + G.T) / 2)
        top = float(evals.max()) if evals.numel() else 0.0
        keep = evals > max(top, 0.0) * torch.finfo(M.dtype).eps * max(M.shape[1], 1)
        Q = Q @ (U[:, keep] / evals[keep].sqrt()).to(M.dtype)
    return Q


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


def _orthonormalize_against(v: Tensor, basis: Tensor | None, passes: int = 2,
                            space: ShardedSpace | None = None) -> Tensor:
    """Remove from ``v`` its components along the orthonormal columns of ``basis`` (twice, for stability)."""
    if basis is not None and basis.shape[1] > 0:
        for _ in range(passes):
            v = v - basis @ _sum(space, basis.T @ v)
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
    n, space = op.shape[0], space_of(op)
    if k > _dim(op):
        raise ValueError(f"k={k} exceeds the operator's dimension {_dim(op)}.")
    if init is not None:
        if init.ndim not in (1, 2) or init.shape[0] != n:
            raise ValueError(f"init must have {n} rows, got shape {tuple(init.shape)}.")
        init = _columns(init)
    vectors: list[Tensor] = []
    products: list[Tensor] = []
    matvecs = 0
    for j in range(k):
        basis = torch.stack(vectors, dim=1) if vectors else None
        if init is not None and j < init.shape[1]:
            v = init[:, j].to(device=op.device, dtype=op.dtype).clone()
        else:
            v = _draw(op, 1, "normal", generator)[:, 0]
        v = _orthonormalize_against(v, basis, space=space)
        if float(_norm(v, space=space)) == 0.0:  # a degenerate warm start: draw a fresh direction
            v = _draw(op, 1, "normal", generator)[:, 0]
            v = _orthonormalize_against(v, basis, space=space)
        v = v / _norm(v, space=space)
        hv = op.matvec(v)
        matvecs += 1
        for _ in range(max_iter - 1):
            # convergence of the deflated problem: residual of (I - VVᵀ) H restricted to the complement of V
            w = _orthonormalize_against(hv, basis, space=space)
            lam = float(_dot(space, v, w))
            if float(_norm(w - lam * v, space=space)) <= tol * abs(lam):
                break
            norm = _norm(w, space=space)
            if float(norm) == 0.0:  # v lies in the null space of the deflated operator
                break
            v = w / norm
            hv = op.matvec(v)
            matvecs += 1
        vectors.append(v)
        products.append(hv)
    # Rayleigh-Ritz on the found subspace (no extra products): consistent pairs and their *true* residuals.
    V, HV = torch.stack(vectors, dim=1), torch.stack(products, dim=1)
    T = _sum(space, V.T @ HV)
    theta, S = torch.linalg.eigh((T + T.T).to(torch.float64) / 2)
    order = torch.argsort(theta.abs(), descending=True)
    theta, S = theta[order], S[:, order].to(V.dtype)
    V, HV = V @ S, HV @ S
    res = _norm(HV - V * theta.to(V.dtype), dim=0, space=space).to(torch.float64)
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

#: The largest relative residual that can back a convergence claim of :func:`lanczos`, whatever ``tol`` says.
CLAIM_TOL_CAP = 0.1
_DGKS = 1 / math.sqrt(2)  # a second Gram-Schmidt pass when a norm drops below this fraction (Daniel et al. 1976)
_RESTART_CHUNK = 1 << 16  # columns per chunk of the GEMMs over the basis (restarts, Gram matrices, Ritz vectors)
_NOISE = 4.0  # rounding per step in the ω-recurrence, in ε ‖H‖ / β (an HVP rounds more than one matrix product)


@dataclass
class LanczosDecomposition:
    """A plain Lanczos run: ``H Q ≈ Q T`` with ``Q`` ``(P, m)`` orthonormal and ``T`` ``(m, m)`` tridiagonal.

    Produced by the unrestarted steps of :func:`spectral_density`; :func:`lanczos` uses a restarted block method.

    Attributes:
        basis: ``Q`` as a :class:`KrylovBasis` (``basis @ S`` and ``basis.tensor()``).
        alpha: diagonal of ``T`` (float64).
        beta: off-diagonal of ``T`` (float64), length ``m - 1``.
        last_beta: the norm of the residual direction after the last step (``β_m``); ``0`` when the run stopped at an
            invariant subspace.
        num_matvecs: operator products spent.
    """

    basis: KrylovBasis
    alpha: Tensor
    beta: Tensor
    last_beta: float
    num_matvecs: int

    def tridiagonal(self) -> Tensor:
        return torch.diag(self.alpha) + torch.diag(self.beta, 1) + torch.diag(self.beta, -1)


class KrylovBasis:
    """Orthonormal columns stored in fixed-size chunks, so memory grows with the columns used, never copied.

    Used by the unrestarted Lanczos runs of :func:`spectral_density`, whose ``m`` is the (small) number of quadrature
    nodes.
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, chunk: int = 16,
                 space: ShardedSpace | None = None) -> None:
        self.n, self.dtype, self.device, self.chunk, self.space = n, dtype, device, chunk, space
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
                w = w - block @ _sum(self.space, block.T @ w)
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


def _lanczos_steps(op: CurvatureOperator, q0: Tensor, max_steps: int) -> LanczosDecomposition:
    """Up to ``max_steps`` plain Lanczos steps with full reorthogonalisation from the unit vector ``q0``.

    Stops early at an invariant subspace (for quadrature the rule is then already exact).
    """
    space = space_of(op)
    Q = KrylovBasis(op.shape[0], op.dtype, op.device, space=space)
    alpha: list[float] = []
    beta: list[float] = []
    q = q0
    last_beta = 0.0
    for _ in range(min(max_steps, _dim(op))):
        Q.append(q)
        w = op.matvec(q)
        alpha.append(float(_dot(space, q, w)))
        # full reorthogonalisation also removes the three-term recurrence's part (α q_j + β q_{j−1})
        w = Q.project_out(w)
        last_beta = float(_norm(w, space=space))
        if Q.size == max_steps:
            break
        if last_beta <= 1e-10 * max(max(abs(x) for x in alpha), 1e-30):
            last_beta = 0.0
            break
        q = w / last_beta
        beta.append(last_beta)
    m = Q.size
    return LanczosDecomposition(basis=Q, alpha=torch.tensor(alpha, dtype=torch.float64),
                                beta=torch.tensor(beta[: m - 1], dtype=torch.float64), last_beta=last_beta,
                                num_matvecs=m)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The ``[a, b)`` runs of true entries of a boolean vector."""
    runs: list[tuple[int, int]] = []
    for i in np.flatnonzero(mask).tolist():
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _wanted_order(theta: np.ndarray, which: str) -> np.ndarray:
    """Indices of the Ritz values ``theta``, most wanted first."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")
    if which == "SA":
        return np.argsort(theta, kind="stable")
    return np.argsort(-np.abs(theta), kind="stable")


def _scale(theta: np.ndarray, order: np.ndarray, scale_floor: float = 0.0) -> np.ndarray:
    """What the residuals of the wanted pairs ``order`` are measured by: ``min(max(|θ|, floor), θ_max − θ_min)``."""
    return np.minimum(np.maximum(np.abs(theta[order]), scale_floor), theta.max() - theta.min())


def _resolved(theta: np.ndarray, res: np.ndarray, order: np.ndarray, tol: float,
              scale_floor: float = 0.0) -> np.ndarray:
    """Per wanted pair: ``r ≤ tol · scale`` (relative, and shift-invariant; see :func:`_scale`)."""
    return res[order] <= tol * _scale(theta, order, scale_floor)


class _BlockKrylovSchur:
    """The state of a block thick-restart Lanczos run of :func:`lanczos`.

    Holds the decomposition ``H Vᵀ = Vᵀ T + Xᵀ G``: ``V = rows[:m]`` the active orthonormal basis, ``T`` its
    ``(m, m)`` symmetric projection, ``X = rows[m:m + bc]`` the residual block and ``G`` its ``(bc, m)`` coupling;
    ``T``, ``G`` and the estimated inner products ``omega`` are small float64 NumPy arrays (a torch op on a
    20-square matrix costs microseconds of dispatch, and a step does a few dozen). At most ``capacity``
    rows of length ``P`` are alive. A new row *is* the product's own output, orthogonalised and normalised in place:
    no copy into a preallocated block, whose fresh pages cost page faults (writing 6 MB into new memory took 1.4 ms
    on this project's CPU VM, into reused memory 0.08 ms; the product has already paid for its output). A
    restart rewrites the kept rows in place and drops the rest.
    """

    def __init__(self, op: CurvatureOperator, start: Tensor, capacity: int, generator: torch.Generator | None,
                 dtype: torch.dtype) -> None:
        self.op, self.n, self.generator = op, op.shape[0], generator
        self.space, self.dim = space_of(op), _dim(op)  # sharded rows: sums over processes; the global dimension
        self.capacity, self.dtype, self.device = capacity, dtype, op.device
        b = start.shape[0]
        self.rows: list[Tensor] = []
        self._staging: Tensor | None = None  # (capacity, chunk) buffer for the chunked GEMMs, made on first use
        self._written: Tensor | None = None  # (capacity, chunk) buffer for their results
        self._measured: np.ndarray | None = None  # the Gram matrix of rows[:len] measured at the latest restart
        self.T = np.zeros((capacity, capacity))
        self.G = np.zeros((b, capacity))
        self.omega = np.eye(capacity)
        # per basis vector: the norm of what its product lost at a breakdown (the part of H vⱼ at rounding level that
        # was dropped instead of becoming a basis vector), so that residuals stay upper bounds (see ``ritz``)
        self.lost = np.zeros(capacity)
        self._dropped = np.zeros(b)  # what the latest _normalize_block dropped, per row
        self.eps = torch.finfo(dtype).eps
        self.target = math.inf  # the residual accuracy the caller needs (absolute), see ``delta``
        self.breakdown = self.eps ** 0.75  # a new direction this small (relative to ‖H‖) is rounding, not Krylov
        self.anorm = 0.0  # running estimate of ‖H‖
        self.m = 0
        self.coupled = 0  # the first column of G that may be nonzero: H X couples to rows[coupled:m]
        self.reorth_next: list[tuple[int, int]] = []  # rows to orthogonalise against again at the next step
        self.num_matvecs = 0
        W = [start[c].to(device=op.device, dtype=dtype, copy=True).contiguous() for c in range(b)]
        _, self.bc, _ = self._normalize_block(W, self._norms(W), np.ones(b), unit=True)

    @property
    def delta(self) -> float:
        """How far from orthogonal the basis may drift before the partial reorthogonalisation steps in.

        ``√ε`` (semi-orthogonality) keeps ``T`` accurate (Simon 1984), but Ritz vectors ``Vᵀ s`` of such a basis are
        accurate to ``√ε ‖H‖`` only. Below ``target / (‖H‖ √capacity)`` their residuals are as good as the caller needs
        without measuring the basis (:meth:`_orthonormalizer`); the threshold is the larger of that and ``ε^¾``.
        """
        wanted = self.target / (max(self.anorm, torch.finfo(torch.float64).tiny) * math.sqrt(self.capacity))
        return min(math.sqrt(self.eps), max(self.eps ** 0.75, wanted))

    # -------------------------------------------------------------------------------- Gram-Schmidt
    def _project_out(self, W: list[Tensor], lo: int, hi: int) -> np.ndarray:
        """One classical Gram-Schmidt pass ``w ← w − Σᵢ (vᵢ·w) vᵢ`` over ``vᵢ = rows[lo:hi]`` for each ``w`` in ``W``.

        Returns the coefficients ``(hi − lo, len(W))`` in float64. Dots and in-place updates row by row: the rows are
        separate tensors, and ``w`` stays in cache between them.
        """
        if hi <= lo or not W:
            return np.zeros((max(hi - lo, 0), len(W)))
        h = _sum(self.space, torch.stack([torch.dot(self.rows[i], w) for i in range(lo, hi) for w in W]))
        h = h.to(device="cpu", dtype=torch.float64).numpy().reshape(hi - lo, len(W))
        for i, coef in zip(range(lo, hi), h.tolist()):
            for c, w in enumerate(W):
                w.sub_(self.rows[i], alpha=coef[c])
        return h

    def _norms(self, W: list[Tensor]) -> np.ndarray:
        if not W:
            return np.zeros(0)
        if self.space is not None:
            return self.space.norms(torch.stack([_norm(w) for w in W])).to(device="cpu", dtype=torch.float64).numpy()
        out = torch.stack([torch.linalg.vector_norm(w) for w in W]).to(device="cpu", dtype=torch.float64).numpy()
        if not (np.isfinite(out) & (out >= _sqrt_tiny(self.dtype))).all():  # squares out of range (_norm): rare
            out = np.array([float(_norm(w)) for w in W])
        return out

    def _orthogonalize(self, W: list[Tensor], lo: int, hi: int,
                       second: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Classical Gram-Schmidt of the rows ``W`` against ``rows[lo:hi]``, one pass or two.

        Returns the coefficients, the row norms after and (by Pythagoras, no pass over ``W``) before. The second pass:
        ``"always"`` (a random vector against a basis that is only semi-orthogonal, ``VVᵀ = I + E``: one pass leaves
        ``−E V w``, small only when ``V w`` was), ``"dgks"`` where a norm fell below ``1/√2`` of its value ("twice is
        enough" against an orthonormal basis; Daniel, Gragg, Kaufman & Stewart 1976), or ``"never"`` (the caller
        decides from its estimates).
        """
        if hi <= lo:
            after = self._norms(W)
            return np.zeros((0, len(W))), after, after
        h = self._project_out(W, lo, hi)
        after = self._norms(W)
        before = np.sqrt((h ** 2).sum(axis=0) + after ** 2)
        if second == "always" or second == "dgks" and bool((after < _DGKS * before).any()):
            h += self._project_out(W, lo, hi)
            after = self._norms(W)
        return h, after, before

    def _random_row(self, hi: int) -> tuple[Tensor, float]:
        """A random vector orthogonal to ``rows[:hi]`` and its norm."""
        if self.space is not None:
            z = self.space.draw(1, "normal", self.generator, self.dtype, self.device)[:, 0].contiguous()
        else:
            gen_device = self.generator.device if self.generator is not None else torch.device("cpu")
            z = torch.randn(self.n, generator=self.generator, device=gen_device, dtype=self.dtype).to(self.device)
        return z, float(self._orthogonalize([z], 0, hi, "always")[1][0])

    def _normalize_block(self, W: list[Tensor], norms: np.ndarray, scale: np.ndarray,
                         unit: bool = False) -> tuple[np.ndarray, int, bool]:
        """Orthonormalise the rows ``W`` (already orthogonal to ``rows``) among themselves and append them.

        ``norms`` are the rows' norms, ``scale`` what they are small against: about ``‖H x‖`` for a new block
        (and never less than ``‖H‖``), or, with ``unit``, the rows' own norms before a reorthogonalisation of rows
        already normalised (then ``‖H‖`` does not enter: those rows are not products). Returns ``R`` with
        ``W = Rᵀ Q`` (rows), the number of rows kept and whether one was replaced: a row whose new part is at rounding
        level (an invariant subspace, or a repeated eigenvalue seen twice) is replaced by a random vector orthogonal to
        everything before it, with a zero diagonal in ``R``; when nothing orthogonal is left it is dropped instead.
        The norms of the parts so discarded are left in ``self._dropped`` (per row of ``W``), where they exceed
        rounding (``_NOISE ε`` times the scale): a part between that and the threshold may be a real direction.
        """
        bc, hi = len(W), len(self.rows)
        R = np.zeros((bc, bc))
        self._dropped = np.zeros(bc)
        kept, replaced = 0, False
        for c, w in enumerate(W):
            nrm = float(norms[c])
            if c > 0:
                h, after, _ = self._orthogonalize([w], hi, hi + kept, "dgks")
                R[:kept, c] = h[:, 0]
                nrm = float(after[0])
            against = float(scale[c]) if unit else max(float(scale[c]), self.anorm)
            floor = _NOISE * self.eps * against  # rounding, whatever the threshold
            if kept < c:  # the space is exhausted: earlier rows were dropped, so is this one
                self._dropped[c] = nrm if nrm > floor else 0.0
                continue
            if nrm > self.breakdown * against:
                R[c, c] = nrm
                self.rows.append(w.div_(nrm))
                kept += 1
                continue
            self._dropped[c] = nrm if nrm > floor else 0.0  # between rounding and the threshold: maybe real
            if hi + c >= self.dim:
                continue  # nothing orthogonal is left
            z, nrm = self._random_row(hi + c)
            if nrm <= math.sqrt(self.eps):
                continue
            self.rows.append(z.div_(nrm))
            kept += 1
            replaced = True
        return R[:kept], kept, replaced

    # -------------------------------------------------------------------------------- one block step
    def _product(self, X: list[Tensor]) -> list[Tensor]:
        """``H x`` for each row: the operator's own output (contiguous, this dtype), not a copy."""
        if len(X) > 1 and hasattr(self.op, "matmat"):
            out = self.op.matmat(torch.stack(X, dim=1)).T.to(device=self.device, dtype=self.dtype).contiguous()
            return list(out.unbind(0))
        W = []
        for x in X:
            w = self.op.matvec(x)
            if (w.dtype != self.dtype or w.device != self.device or not w.is_contiguous()
                    or w.data_ptr() == x.data_ptr()):
                w = w.to(device=self.device, dtype=self.dtype, memory_format=torch.contiguous_format, copy=True)
            W.append(w)
        return W

    def expand(self) -> None:
        """Multiply the residual block by ``H`` and append it to the basis (``bc`` products)."""
        m, bc = self.m, self.bc
        hi = m + bc
        W = self._product(self.rows[m:hi])
        self.num_matvecs += bc
        lo = min(self.coupled, m)  # G's nonzero columns are among coupled:m
        om = self.omega
        tiny = torch.finfo(torch.float64).tiny
        # H Vᵀ = Vᵀ T + Xᵀ G, so the coefficients of H X on the vectors it couples to (the previous block, or after a
        # restart every kept Ritz vector) are Gᵀ, already known: subtract them without measuring them (the three-term
        # recurrence of Lanczos, Paige 1976). What rounding leaves along those vectors is estimated with all the others
        # below (the ω-recurrence), not assumed away.
        Gc = self.G[:bc, lo:m]
        if m > lo:
            for w, coefs in zip(W, Gc.tolist()):
                for i, g in enumerate(coefs, start=lo):
                    if g != 0.0:
                        w.sub_(self.rows[i], alpha=g)
        # then one measured pass against X itself: its coefficients are the new diagonal block of T
        A, after, before = self._orthogonalize(W, m, hi, "never")
        before = np.sqrt((Gc ** 2).sum(axis=1) + before ** 2)  # ‖H x‖ by Pythagoras
        self.anorm = max(self.anorm, float(before.max()))
        # what that pass leaves along X: rounding, plus X's own non-orthogonality times A; a second pass only where
        # that exceeds δ (not on the 1/√2 rule: in Lanczos ‖w‖ drops that much at most steps)
        E = np.abs(om[m:hi, m:hi] - np.eye(bc))
        # left along each row of X, absolute: the pass's rounding (a dot over P entries rounds more than one product:
        # _NOISE), plus X's own non-orthogonality times A
        leak = _NOISE * self.eps * float(before.max()) + (E @ np.abs(A)).max(axis=1)
        local = leak / max(float(after.min()), tiny)
        if float(local.max()) > self.delta:
            A += self._project_out(W, m, hi)
            local[:] = self.eps
            leak[:] = _NOISE * self.eps * float(before.max())
        h = np.concatenate([Gc.T, A])  # every coefficient subtracted, on rows[lo:hi]
        # the vectors the previous step reorthogonalised against: again now (Simon 1984: the next vector inherits their
        # components through the recurrence)
        again, self.reorth_next = self.reorth_next, []
        for a, b in again:
            self._project_out(W, a, b)
        if again or float(local.max()) == self.eps:
            after = self._norms(W)
        T = self.T
        T[m:hi, m:hi] = (A + A.T) / 2
        T[m:hi, :m] = self.G[:bc, :m]
        T[:m, m:hi] = self.G[:bc, :m].T
        R, kept, replaced = self._normalize_block(W, after, before)
        lost = self._dropped.copy()  # what H X lost, per row of X (absolute)
        if bc > 1 and kept == bc and not replaced:
            # the block's own Gram-Schmidt can shrink columns far below their norms after the pass (a rank-deficient
            # block: a column is then mostly rounding): the new rows are R⁻ᵀ W, so what the pass left along X grows
            # to |R⁻¹|ᵀ leak in them, compounded through every row the block orthogonalised against
            if float((np.abs(np.linalg.inv(R)).T @ leak).max()) > self.delta:
                Q = self.rows[hi:]
                del self.rows[hi:]
                self._project_out(Q, m, hi)
                R2, kept, replaced = self._normalize_block(Q, self._norms(Q), np.ones(kept), unit=True)
                lost += np.abs(R).T @ self._dropped  # a row of Q dropped takes its share of every column of W
                R = R2 @ R
                local[:] = self.eps
        new = slice(hi, hi + kept)
        om[new, :] = 0.0
        om[:, new] = 0.0
        om[new, new] = np.eye(kept)
        est = np.full((m, kept), self.eps)
        if m > 0 and not replaced and kept == bc:
            # partial reorthogonalisation (Simon 1984): estimate how far the new block drifted from every vector
            # before X, from the recurrence itself. For k < m, H vₖ = Σⱼ T[j, k] vⱼ (j < hi: T[X, :m] is G), so
            # vₖᵀ W = Σⱼ T[j, k] ω[j, X] − Σ_{j in lo:hi} ω[k, j] h[j, :], and W = Rᵀ Q (rows); plus rounding. For
            # the coupled vectors the leading terms cancel (T[X, k] = h[k]): what is left is their drift.
            M = T[:hi, :m].T @ om[:hi, m:hi] - om[:m, lo:hi] @ h
            est = M / R[0, 0] if bc == 1 else np.linalg.solve(R.T, M.T).T  # R is upper triangular and small
            spread = 1.0 / max(float(R[0, 0]), tiny) if bc == 1 else float(np.abs(np.linalg.inv(R)).sum(axis=0).max())
            noise = _NOISE * self.eps * self.anorm * spread  # rounding in W, carried into the rows by R⁻ᵀ
            est = est + np.where(est >= 0, noise, -noise)
            for a, b in again:
                est[a:b] = self.eps
            if float(np.abs(est).max()) > self.delta:
                # orthogonality is about to be lost: orthogonalise against the vectors whose estimate exceeds ε^¼ δ
                # (Simon's "partial"), now and at the next step; the components are small, so one pass takes them to ε
                runs = _runs(np.abs(est).max(axis=1) > self.delta * self.eps ** 0.25)
                Q = self.rows[hi:]
                del self.rows[hi:]
                for a, b in runs:
                    self._project_out(Q, a, b)
                    est[a:b] = self.eps
                R2, kept, _ = self._normalize_block(Q, self._norms(Q), np.ones(kept), unit=True)
                lost += np.abs(R).T @ self._dropped
                R, est, new = R2 @ R, est[:, :kept], slice(hi, hi + kept)
                self.reorth_next = runs
        elif m > 0:
            # a row was replaced or dropped (rare): orthogonalise the others against the whole basis too
            Q = self.rows[hi:]
            del self.rows[hi:]
            _, after, _ = self._orthogonalize(Q, 0, hi, "dgks")
            R2, kept, _ = self._normalize_block(Q, after, np.ones(kept), unit=True)
            lost += np.abs(R).T @ self._dropped
            R, est, new = R2 @ R, est[:, :kept], slice(hi, hi + kept)
            local[:] = self.eps
        om[:m, new], om[new, :m] = est, est.T
        om[m:hi, new] = local[:, None]
        om[new, m:hi] = local[None, :]
        self.G.fill(0.0)
        self.G[:kept, m:hi] = R
        self.lost[m:hi] += lost
        self.m, self.bc, self.coupled = hi, kept, m

    # -------------------------------------------------------------------------------- Ritz pairs and restarts
    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their vectors in ``T`` and their residual norms (no products).

        ``‖G s‖``, plus ``Σⱼ |sⱼ| lostⱼ`` where a breakdown dropped part of a product as rounding (an upper bound: the
        relation ``H Vᵀ = Vᵀ T + Xᵀ G`` misses those parts), so that a pair is never called converged on a residual
        that leaves them out.
        """
        theta, S = np.linalg.eigh(self.T[:self.m, :self.m])
        res = np.linalg.norm(self.G[:self.bc, :self.m] @ S, axis=0) + np.abs(S).T @ self.lost[:self.m]
        self.anorm = max(self.anorm, float(np.abs(theta).max()))
        return theta, S, res

    def _orthonormalizer(self, gram: np.ndarray) -> np.ndarray:
        """``L⁻ᵀ`` for the measured Gram matrix ``V Vᵀ = L Lᵀ`` of the active basis.

        The basis is only semi-orthogonal (``|vᵢᵀ vⱼ| ≤ √ε``), so ``Vᵀ s`` is accurate to ``√ε`` only; ``T`` is,
        to ``O(ε ‖H‖)``, the projection of ``H`` on the orthonormalised basis ``N = Vᵀ L⁻ᵀ`` (Simon 1984), whose Ritz
        vectors ``N s`` have residuals ``‖G s‖`` to working precision.
        """
        try:
            L = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:  # not positive definite: orthogonality is lost beyond repair, keep V as it is
            return np.eye(gram.shape[0])
        return np.linalg.solve(L.T, np.eye(gram.shape[0]))

    def _gram(self, rows: int) -> np.ndarray | None:
        """The measured Gram matrix of ``rows[:rows]``, or None when the estimates put it within ``delta`` of ``I``.

        Then correcting by it would change no residual beyond what the caller needs, and one pass is saved.
        """
        E = self.omega[:rows, :rows] - np.eye(rows)
        if rows == 0 or float(np.abs(E).max()) <= self.delta:
            return None
        if self._measured is not None and rows <= self._measured.shape[0]:
            return self._measured[:rows, :rows]  # rows are never rewritten between restarts: still exact
        return self._gram_rows(rows)

    def _chunks(self, vectors: list[Tensor]) -> Iterator[tuple[int, int, Tensor]]:
        """``(c0, c1, block)`` over cache-sized column chunks, ``block`` a staged copy of ``vectors[i][c0:c1]``.

        Small GEMMs on a staged chunk run near memory speed, where one over the whole basis would not.
        """
        width = max(min(_RESTART_CHUNK, self.n), 1)
        if self._staging is None:
            self._staging = torch.empty(self.capacity * width, dtype=self.dtype, device=self.device)
        for c0 in range(0, self.n, width):
            c1 = min(c0 + width, self.n)
            block = self._staging[: len(vectors) * (c1 - c0)].view(len(vectors), c1 - c0)
            torch.stack([v[c0:c1] for v in vectors], out=block)
            yield c0, c1, block

    def _gram_rows(self, rows: int) -> np.ndarray:
        """``V Vᵀ`` of ``rows[:rows]`` in float64, accumulated over the chunks."""
        gram = torch.zeros((rows, rows), dtype=torch.float64, device=self.device)
        for _, _, block in self._chunks(self.rows[:rows]):
            gram += block @ block.T
        return _sum(self.space, gram).cpu().numpy()

    def _combine(self, C: np.ndarray, out: list[Tensor], extra: list[Tensor] | None = None) -> np.ndarray | None:
        """``out[j] ← Σᵢ C[i, j] rows[i]`` over ``rows[:C.shape[0]]``, chunk by chunk.

        ``out`` may be ``rows[:l]``: each chunk is staged before it is written. With ``extra`` (rows not among the
        inputs), also returns the Gram matrix of ``out + extra`` as written, in float64, measured on the same pass
        (the chunks are in cache), where a separate pass would read every row again.
        """
        r, q = C.shape
        e = len(extra or [])
        Ct = torch.from_numpy(np.ascontiguousarray(C.T)).to(device=self.device, dtype=self.dtype)
        gram = None if extra is None else torch.zeros((q + e,) * 2, dtype=torch.float64, device=self.device)
        width = max(min(_RESTART_CHUNK, self.n), 1)
        if self._written is None or self._written.numel() < (q + e) * width:
            self._written = torch.empty(self.capacity * width, dtype=self.dtype, device=self.device)
        for c0, c1, block in self._chunks(self.rows[:r] + (extra or [])):
            part = self._written[: (q + e) * (c1 - c0)].view(q + e, c1 - c0)  # the new rows, then the extra ones
            torch.mm(Ct, block[:r], out=part[:q])
            if gram is not None:
                part[q:].copy_(block[r:])
                gram += part @ part.T
            for j, row in enumerate(out):
                row[c0:c1].copy_(part[j])
        return None if gram is None else _sum(self.space, gram).cpu().numpy()

    def ritz_vectors(self, S: np.ndarray) -> Tensor:
        """Unit Ritz vectors ``N S`` as the ``(P, columns of S)`` transpose of a row-major block."""
        gram = self._gram(self.m)
        C = S if gram is None else self._orthonormalizer(gram) @ S
        Y = torch.empty((C.shape[1], self.n), dtype=self.dtype, device=self.device)
        if C.shape[1] <= 2:  # a few axpys: no staging buffer for the common top-1
            coef = C.tolist()
            for j in range(C.shape[1]):
                torch.mul(self.rows[0], coef[0][j], out=Y[j])
                for i in range(1, self.m):
                    Y[j].add_(self.rows[i], alpha=coef[i][j])
        else:
            self._combine(C, list(Y.unbind(0)))
        if self.space is None:
            norms = torch.linalg.vector_norm(Y, dim=1, keepdim=True)
        else:
            norms = _norm(Y, 1, self.space)[:, None]
        Y /= norms.clamp_min(torch.finfo(Y.dtype).tiny)
        return Y.T

    def restart(self, theta: np.ndarray, S: np.ndarray, keep: np.ndarray) -> None:
        """Thick restart (Wu & Simon 2000): keep the Ritz vectors ``keep`` and the residual block, nothing else.

        ``V ← Sₖᵀ L⁻¹ V`` in place (orthonormal Ritz vectors, see :meth:`_orthonormalizer`; ``L = I`` when the basis
        is orthogonal enough, and then the few new rows are measured instead), so that
        ``H Vᵀ = Vᵀ diag(θₖ) + Xᵀ (G Sₖ)``: an arrowhead ``T`` that the next step orthogonalises against in full.
        """
        m, bc, kept = self.m, self.bc, len(keep)
        gram = self._gram(m + bc)
        Sk = S[:, keep] if gram is None else self._orthonormalizer(gram[:m, :m]) @ S[:, keep]
        # the basis was orthogonal enough to keep Sₖᵀ V as it is: measure the few rows it now has, on the same pass
        new = self._combine(Sk, self.rows[:kept], extra=self.rows[m:m + bc] if gram is None else None)
        self.rows = self.rows[:kept] + self.rows[m:m + bc]  # the rest is released
        self._measured = new
        if new is not None:
            YY, XY, XX = new[:kept, :kept], new[kept:, :kept], new[kept:, kept:]
        else:  # orthonormal to working precision by construction
            YY, XY, XX = np.eye(kept), gram[m:, :m] @ Sk, gram[m:, m:]
        G = self.G[:bc, :m] @ S[:, keep]
        lost = np.abs(Sk).T @ self.lost[:m]
        self.lost.fill(0.0)
        self.lost[:kept] = lost
        self.T.fill(0.0)
        self.T[:kept, :kept] = np.diag(theta[keep])
        self.G.fill(0.0)
        self.G[:bc, :kept] = G
        om = self.omega
        om.fill(0.0)
        om[:kept, :kept] = YY
        om[kept:kept + bc, :kept] = XY
        om[:kept, kept:kept + bc] = XY.T
        om[kept:kept + bc, kept:kept + bc] = XX
        np.fill_diagonal(om, 1.0)
        self.m, self.coupled = kept, 0
        self.reorth_next = []


def _start_block(op: CurvatureOperator, init: Tensor | None, b: int, generator: torch.Generator | None,
                 mix: float = 0.05) -> Tensor:
    """``(b, P)`` start rows: random, or warm-start vectors plus ``mix`` of a random direction each.

    The warm-start columns are summed round robin into ``b`` groups (all of them into one vector for ``b = 1``), so a
    new direction is not missed and no start vector is wasted.
    """
    n, space = op.shape[0], space_of(op)
    if space is None:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        Z = torch.randn((b, n), generator=generator, device=gen_device, dtype=op.dtype).to(op.device)
        Z /= torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    else:
        Z = space.draw(b, "normal", generator, op.dtype, op.device).T.contiguous()
        Z /= _norm(Z, 1, space)[:, None]
    if init is not None:
        cols = _columns(init).to(device=op.device, dtype=op.dtype)
        cols = cols / _norm(cols, 0, space).clamp_min(torch.finfo(op.dtype).tiny)
        for c in range(min(b, cols.shape[1])):
            w = cols[:, c::b].sum(dim=1)
            norm = float(_norm(w, space=space))
            if norm > 0:
                w = w / norm + mix * Z[c]
                Z[c] = w / _norm(w, space=space)
    return Z


def _check_tol(tol: Any) -> float:
    value = float(tol) if isinstance(tol, numbers.Real) and not isinstance(tol, bool) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"tol must be a finite positive number (a relative residual such as 1e-3), got {tol!r}.")
    return value


@dataclass
class _KrylovRun:
    values: Tensor  # (k,) wanted Ritz values, most wanted first
    vectors: Tensor  # (P, k)
    residuals: Tensor  # (k,) ‖H y − θ y‖
    resolved: Tensor  # (k,) the stopping test
    num_matvecs: int
    spectrum: tuple[float, float] = (0.0, 0.0)  # the smallest and largest Ritz value of the last step


def _krylov_schur(op: CurvatureOperator, start: Tensor, k: int, which: str, budget: int, tol: float, max_basis: int,
                  generator: torch.Generator | None, scale_floor: float = 0.0, anorm: float = 0.0) -> _KrylovRun:
    """A thick-restart (block) Lanczos run from the start rows, until the ``k`` wanted pairs pass the test.

    Stops earlier when the ``budget`` of products is spent.

    ``scale_floor`` raises the test's ``|θ|`` to at least that value (the deflated check measures against ``θ_k``).
    ``anorm``: a known lower bound of ``‖H‖``, what rounding is measured against from the first step. Without it, an
    operator that is zero up to rounding (``H`` deflated of its whole range) would pass its rounding off as a Krylov
    space: its norm is learned from its own products.
    """
    b = start.shape[0]
    capacity = min(max_basis, _dim(op) + 2 * b, budget + 2 * b)  # never more rows than can be filled
    run = _BlockKrylovSchur(op, start, capacity, generator, op.dtype)
    run.anorm = anorm
    theta = S = res = None
    while run.bc > 0 and run.num_matvecs + run.bc <= budget:
        if run.m + 2 * run.bc > capacity:
            assert theta is not None and S is not None
            # keep the wanted vectors and a few more (half the basis at most): fewer kept means more new steps per
            # restart, and a restart costs a pass over the basis
            keep = min(capacity - 2 * run.bc, max(k + b, min((run.m + k) // 2, k + 5)))
            run.restart(theta, S, _wanted_order(theta, which)[:keep])
        run.expand()
        theta, S, res = run.ritz()
        order = _wanted_order(theta, which)[:k]
        run.target = 0.1 * tol * float(_scale(theta, order, scale_floor).min())
        if run.m >= k and bool(_resolved(theta, res, order, tol, scale_floor).all()):
            break
    if theta is None:  # nothing left to multiply: the start block spans no new direction
        empty = torch.zeros(0, dtype=torch.float64)
        return _KrylovRun(empty, torch.zeros((op.shape[0], 0), dtype=op.dtype, device=op.device), empty,
                          torch.zeros(0, dtype=torch.bool), run.num_matvecs)
    assert S is not None and res is not None
    order = _wanted_order(theta, which)[:k]
    return _KrylovRun(torch.from_numpy(theta[order]), run.ritz_vectors(S[:, order]), torch.from_numpy(res[order]),
                      torch.from_numpy(_resolved(theta, res, order, tol, scale_floor)), run.num_matvecs,
                      (float(theta.min()), float(theta.max())))


class _Deflated:
    """``Π H Π + σ Y Yᵀ`` with ``Π = I − Y Yᵀ`` for orthonormal ``Y``: ``H`` on the complement of the vectors found.

    The found vectors are moved to ``σ``, a value at the unwanted end of the spectrum, so that what rounding leaves of
    them is neither wanted nor in the way.
    """

    def __init__(self, op: CurvatureOperator, Y: Tensor, sigma: float) -> None:
        self.op, self.sigma = op, sigma
        self.Yt = Y.T.contiguous()
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.space = space_of(op)

    def matvec(self, v: Tensor) -> Tensor:
        c = _sum(self.space, self.Yt @ v)
        w = self.op.matvec(v - self.Yt.T @ c)
        return w - self.Yt.T @ (_sum(self.space, self.Yt @ w) - self.sigma * c)


def _beyond(value: float, kth: float, which: str, margin: float) -> bool:
    """Whether ``value`` is more wanted than the ``k``-th answer ``kth`` by more than ``margin``."""
    if which == "LA":
        return value > kth + margin
    if which == "SA":
        return value < kth - margin
    return abs(value) > abs(kth) + margin


def lanczos(
    op: CurvatureOperator | Tensor,
    k: int = 1,
    *,
    which: Literal["LA", "SA", "LM"] = "LA",
    max_iter: int | None = None,
    tol: float = 1e-3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
) -> EigenResult:
    r"""Extreme eigenpairs by thick-restart (block) Lanczos with partial reorthogonalisation.

    **Krylov space.** From an orthonormal start block ``X₀`` of ``b = block_size`` vectors (random, or warm-start
    vectors plus 5% of a random direction), the Krylov space ``span{X₀, H X₀, H² X₀, …}`` is built as
    ``H Vᵀ = Vᵀ T + Xᵀ G``: ``V`` orthonormal, ``T = V H Vᵀ`` symmetric, ``X`` the next block (Lanczos 1950; block
    form Golub & Underwood 1977). A Ritz pair ``(θᵢ, Vᵀ sᵢ)`` from ``T sᵢ = θᵢ sᵢ`` has the residual
    ``‖H y − θ y‖ = ‖G sᵢ‖`` for free. Where the new part of a block is at rounding level (an invariant subspace),
    it is replaced by a random vector orthogonal to the basis and the run goes on; what the replacement drops above
    rounding (below the ``ε^¾ ‖H‖`` threshold it may still be a real direction) is added to the residuals of the Ritz
    pairs built on it, so that no pair is called converged on a residual that leaves it out.

    **Bounded memory.** The basis never holds more than ``max_basis`` vectors: when it is full, a thick restart
    (Wu & Simon 2000; equivalent to ARPACK's implicit restart with exact shifts; Krylov-Schur form of Stewart 2001)
    keeps the ``max(k + block_size, min(k + 5, m / 2))`` most wanted Ritz vectors and the residual block,
    ``T ← diag(θ)`` plus an arrowhead coupling, and the iteration goes on. Extra memory is ``max_basis`` vectors of
    length ``P`` (the rows, each a product's own output) plus one chunk-sized staging buffer, however many products
    ``max_iter`` allows.

    **Cheap steps.** The product's output becomes the new vector in place. Its coefficients on the vectors ``H X``
    couples to (the previous block; after a restart, the kept Ritz vectors) are known, ``V H Xᵀ = Gᵀ``, and are
    subtracted without being measured, as in the three-term recurrence of plain Lanczos (Paige 1976); only the
    coefficients on ``X`` itself (the new diagonal block of ``T``) cost dots: one classical Gram-Schmidt pass, a second
    only where what one pass leaves (rounding, plus ``X``'s own non-orthogonality times the coefficients) exceeds the
    threshold ``δ`` below; the "twice is enough" norm-drop test (Daniel, Gragg, Kaufman & Stewart 1976) would fire at
    nearly every Lanczos step. So a one-vector step reads the new vector five times (a dot, two axpys, a norm, the
    normalisation). The loss of orthogonality to every earlier vector, the coupled ones included, is *estimated*
    from the recurrence itself (Simon 1984's ω-recurrence, written for a dense ``T``); when an
    estimate exceeds ``δ``, the block is orthogonalised against the vectors whose estimate exceeds ``ε^¼ δ`` (Simon's
    partial reorthogonalisation), then and at the next step. ``δ = √ε`` (semi-orthogonality) keeps ``T`` accurate to
    ``O(ε ‖H‖)`` (Simon 1984), so no ghost copies appear, but Ritz vectors of such a basis are accurate to
    ``√ε ‖H‖`` only: ``δ`` is lowered to what the tolerance needs (``0.1 tol |θ| / (‖H‖ √max_basis)``, at least
    ``ε^¾``), and where the estimates still exceed it, Ritz vectors and restarts use the measured Gram matrix of the
    basis (one pass) to orthonormalise it, so reported residuals are true ones to ``O(ε ‖H‖)``. The Ritz check after
    each step is an ``eigh`` of a ``max_basis``-square matrix: microseconds, far below one product when
    ``P ≫ max_basis²``.

    **Stopping.** The run stops when each of the ``k`` wanted pairs has

    .. math::
        \|H y_i - \theta_i y_i\| \le \tau \, \min\bigl(|\theta_i|,\ \theta_{\max} - \theta_{\min}\bigr),
        \qquad \tau = \min(\mathrm{tol},\ 0.1),

    with ``θ_max − θ_min`` the spread of the current Ritz values, or when ``max_iter`` products are spent. The spread
    makes the test shift-invariant, as the Krylov space is: on ``H + σI`` a relative residual alone is small after
    one step whatever the vector, while a one-vector space (no spread yet) never passes. Residuals above 10% of
    ``|θ|`` never pass, whatever ``tol``: they do not say which eigenvalue a vector is near.

    **Convergence that means something.** A single start vector sees one direction of each eigenspace, so it cannot
    find a repeated eigenvalue twice (a linear layer under MSE with ``o`` outputs has every eigenvalue ``o``-fold),
    and its Ritz values can pass the test while a copy of an eigenvalue above the ``k``-th is missing. So
    ``converged[i]`` is true only when every returned pair passed the test **and** the run has evidence that no
    unreported eigenvalue lies beyond the ``k``-th:

    - with ``block_size ≥ k``, the random start block sees every eigenspace of dimension ``≤ k`` in full (if ``λ_k``
      has a higher multiplicity, ``k`` copies of it are still the answer);
    - with ``block_size < k`` (the default for ``k > 1``, fewer products), a **deflated check**: a fresh random start
      in the complement of the ``k`` vectors found, a Lanczos run on ``(I − YYᵀ) H (I − YYᵀ)`` until its own most
      wanted Ritz pair passes the same test (scaled by ``max(|θ|, |θ_k|)``). If that value lies beyond ``θ_k``, an
      eigenvalue was missed: it joins the found vectors, a block run of ``k + 1`` from them settles the ``k`` answers
      with true residuals, and the check is repeated; otherwise the check is the evidence. Any multiplicity is found,
      one copy per check.

    Both rest on the random start having a component along every eigenvector (probability 1) that the Krylov
    polynomial amplifies before a Ritz pair passes the test (the Kaniel-Paige-Saad bounds): a probabilistic
    argument, as for any Krylov method. A warm start keeps only 5% of a random direction, so a new direction
    orthogonal to the warm vectors is found later, and for ``k = 1`` (no check) can be missed.

    Args:
        op: an operator or a dense symmetric matrix.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic (most negative), ``"LM"`` largest
            magnitude.
        max_iter: maximum products, the check's included; default ``max(4k + 30, 60)`` when no check runs
            (``block_size ≥ k``), ``max(12k + 60, 120)`` otherwise. Must be at least ``k``.
        tol: relative residual tolerance ``‖H y − θ y‖ ≤ tol · |θ|``, a finite positive number (0.1 at most
            counts, see Stopping).
        init: optional ``(P,)`` or ``(P, j)`` warm-start vectors (e.g. the previous estimate's eigenvectors), summed
            round robin into the ``block_size`` start vectors, each plus 5% of a random direction.
        generator: source of every random vector (start block, checks, restarts after an invariant subspace).
        block_size: vectors per block (products per step), default 1. ``≥ k`` finds multiplicities and clusters of
            up to ``block_size`` eigenvalues in one run, without a check, at more products for well separated ones.
        max_basis: most basis vectors held at once (memory: ``max_basis · P`` numbers); default
            ``max(2k + 10, 20, k + 3 · block_size)``; at least ``k + 2 · block_size``.

    Returns:
        An :class:`EigenResult` sorted by ``which`` (``LA``: descending; ``SA``: ascending; ``LM``: descending
        ``|λ|``), with residuals ``‖H v − λ v‖ / |λ|`` from the recurrence.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, -6.0, 3.0, 2.0], dtype=torch.float64))
        >>> res = lanczos(A, k=2, which="LA", tol=1e-8, generator=torch.Generator().manual_seed(0))
        >>> [round(lam, 6) for lam in res.eigenvalues.tolist()]
        [3.0, 2.0]
        >>> round(lanczos(A, which="SA", generator=torch.Generator().manual_seed(0)).eigenvalues.item(), 6)
        -6.0

        A repeated top eigenvalue is found as often as it occurs:

        >>> g = torch.Generator().manual_seed(1)
        >>> Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
        >>> spectrum = torch.cat([torch.tensor([5.0, 5, 5]), torch.linspace(-1, 3, 37)]).double()
        >>> A = Q @ torch.diag(spectrum) @ Q.T
        >>> res = lanczos(A, k=3, tol=1e-8, max_iter=200, generator=torch.Generator().manual_seed(0))
        >>> [round(lam, 6) for lam in res.eigenvalues.tolist()], bool(res.converged.all())
        ([5.0, 5.0, 5.0], True)
    """
    op = as_operator(op)
    _check_positive_int("k", k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}.")
    tol = _check_tol(tol)
    n, space = _dim(op), space_of(op)
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension {n}.")
    b = _check_positive_int("block_size", block_size)
    check = b < k
    if max_iter is None:
        max_iter = max(12 * k + 60, 120) if check else max(4 * k + 30, 60)
    _check_positive_int("max_iter", max_iter)
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}: k eigenpairs take at least k products.")
    if b > n or b * math.ceil(k / b) > max_iter:
        raise ValueError(f"block_size={b} does not fit: it must be at most P={n}, and max_iter={max_iter} must allow "
                         f"the ceil(k / block_size) = {math.ceil(k / b)} whole blocks that give k={k} Ritz pairs.")
    if max_basis is None:
        max_basis = max(2 * k + 10, 20, k + 3 * b)
    _check_positive_int("max_basis", max_basis)
    if max_basis < k + 2 * b:
        raise ValueError(f"max_basis={max_basis} is below k + 2 * block_size = {k + 2 * b}: a restart keeps k Ritz "
                         "vectors and needs room for the residual block and one more block.")
    if init is not None and (init.ndim not in (1, 2) or init.shape[0] != op.shape[0]):
        raise ValueError(f"init must have {op.shape[0]} rows, got shape {tuple(init.shape)}.")
    tau = min(tol, CLAIM_TOL_CAP)

    run = _krylov_schur(op, _start_block(op, init, b, generator), k, which, max_iter, tau, max_basis, generator)
    used, evidence = run.num_matvecs, not check
    while check and bool(run.resolved.all()) and k < n:
        kth = float(run.values[-1])
        Y = _orthonormal_columns(run.vectors, space)  # Ritz vectors are orthonormal to √ε only; the deflation needs
        sigma = {"LA": run.spectrum[0], "SA": run.spectrum[1]}.get(which, 0.0)  # better
        start = _start_block(op, None, 1, generator)
        start -= _sum(space, start @ Y) @ Y.T
        anorm = max(abs(run.spectrum[0]), abs(run.spectrum[1]))  # a lower bound of ‖H‖
        probe = _krylov_schur(_Deflated(op, Y, sigma), start, 1, which, max_iter - used, tau, max_basis, generator,
                              scale_floor=abs(kth), anorm=anorm)
        used += probe.num_matvecs
        if probe.values.numel() == 0 or not bool(probe.resolved.all()):
            break  # the budget ran out (or left no room for a product): no evidence
        # a value within the tolerance of θ_k changes no answer beyond the tolerance
        if not _beyond(float(probe.values[0]), kth, which, tau * abs(kth)):
            evidence = True
            break
        # a missed eigenvalue: settle the k answers from the k + 1 vectors found, with true residuals, and check again
        found = torch.cat([run.vectors, probe.vectors], dim=1).T
        if max_iter - used < k + 1:
            break
        run = _krylov_schur(op, found, k, which, max_iter - used, tau, max(max_basis, 4 * k + 3), generator,
                            anorm=anorm)
        used += run.num_matvecs
    evidence = evidence or k == n
    scale = run.values.abs()
    rel = torch.where(scale > 0, run.residuals / scale.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.where(run.residuals == 0, 0.0, math.inf))
    return EigenResult(eigenvalues=run.values, eigenvectors=run.vectors, num_matvecs=used,
                       converged=run.resolved & torch.tensor(evidence), residuals=rel)


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
    space = space_of(op)
    samples: list[float] = []
    total = total_sq = 0.0
    stderr = math.nan
    for i in range(num_probes):
        z = _draw(op, 1, distribution, generator)[:, 0]
        z = _orthonormalize_against(z, basis, passes=1, space=space)
        s = float(_dot(space, z, op.matvec(z)).to(torch.float64))
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
    n, space = _dim(op), space_of(op)
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
    if s == n and space is not None:
        # the sketch would be the whole space, whose orthonormalisation from sharded rows drops the directions H
        # shrinks below rounding (an ill-conditioned H S): the identity's columns are exact, in n products
        eye = space.local(torch.eye(n, dtype=op.dtype, device=op.device))
        exact = float(_sum(space, torch.trace(eye.T @ op.matmat(eye))).to(torch.float64))
        return TraceResult(value=exact, stderr=0.0, num_matvecs=n, num_probes=0, samples=[])
    S = _draw(op, s, distribution, generator)
    Q = _orthonormal_columns(op.matmat(S), space)
    exact = float(_sum(space, torch.trace(Q.T @ op.matmat(Q))).to(torch.float64)) if Q.shape[1] else 0.0
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
    if eigenvectors.shape[0] != op.shape[0]:
        raise ValueError(f"eigenvectors must have {op.shape[0]} rows, got shape {tuple(eigenvectors.shape)}.")
    V = _columns(eigenvectors).to(device=op.device, dtype=op.dtype)
    space = space_of(op)
    matvecs = 0
    if eigenvalues is None:
        V = _orthonormal_columns(V, space)
        exact = float(_sum(space, torch.trace(V.T @ op.matmat(V))).to(torch.float64))
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
        num_steps: Lanczos steps per probe: plain Lanczos with full reorthogonalisation, not restarted (a restart would
            change the quadrature), so its basis holds ``num_steps`` vectors of length ``P``.
        num_points: grid size when ``grid`` is not given (spanning the Ritz values ± 3σ).
        sigma: broadening; default 1% of the Ritz value range, at least 1e-12 of the largest |Ritz value| (1e-12 for
            a spectrum that is exactly zero).
        grid: explicit evaluation points.
        generator: source of the probes.
    """
    op = as_operator(op)
    _check_positive_int("num_probes", num_probes)
    _check_positive_int("num_steps", num_steps)
    steps = min(num_steps, _dim(op))
    nodes, weights = [], []
    matvecs = 0
    for _ in range(num_probes):
        z = _draw(op, 1, "rademacher", generator)[:, 0]
        dec = _lanczos_steps(op, z / _norm(z, space=space_of(op)), steps)
        matvecs += dec.num_matvecs
        if not bool(torch.isfinite(dec.alpha).all() and torch.isfinite(dec.beta).all()):
            raise FloatingPointError("spectral_density: the Lanczos recurrence is not finite: the operator returned "
                                     f"NaN/Inf, or its products overflow {op.dtype}.")
        theta, S = torch.linalg.eigh(dec.tridiagonal())
        w = S[0] ** 2
        pad = steps - theta.shape[0]  # stopped early at an invariant subspace: pad with zero-weight nodes
        nodes.append(torch.cat([theta, theta.new_zeros(pad)]))
        weights.append(torch.cat([w, w.new_zeros(pad)]))
    N, W = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(N.min()), float(N.max())
    if sigma is None:
        # relative to the spectrum's own scale (an absolute floor would swamp a spectrum of 1e-20); 1e-12 only for a
        # spectrum that is exactly zero
        sigma = max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi))) or 1e-12
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
        blocks: 1-D long index tensors, one per block (into this process's entries, for sharded vectors).
        num_probes: probes (>= 2).
        distribution: ``"rademacher"`` or ``"normal"``.
        generator: source of the probes.

    Returns:
        One :class:`TraceResult` per block (each with ``num_matvecs`` equal to the shared total).
    """
    op = as_operator(op)
    _check_positive_int("num_probes", num_probes, 2)
    space = space_of(op)
    samples = torch.empty((num_probes, len(blocks)), dtype=torch.float64)
    for i in range(num_probes):
        z = _draw(op, 1, distribution, generator)[:, 0]
        zhz = (z * op.matvec(z)).to(torch.float64)
        row = torch.stack([zhz[idx.to(zhz.device)].sum() for idx in blocks]) if blocks else zhz[:0]
        samples[i] = _sum(space, row).cpu()
    mean = samples.mean(dim=0)
    stderr = samples.std(dim=0) / math.sqrt(num_probes)
    return [
        TraceResult(value=float(mean[j]), stderr=float(stderr[j]), num_matvecs=num_probes, num_probes=num_probes,
                    samples=samples[:, j].tolist())
        for j in range(len(blocks))
    ]
