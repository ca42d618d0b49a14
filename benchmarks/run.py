"""Side-by-side CPU benchmarks: lightning-curvature against PyHessian, hessian-eigenthings and curvlinops.

Every number in one table is measured in the same process, interleaved (round robin over the candidates, so a
load spike on a shared machine hits them all alike), and reported as a median over repeats after warm-up.
Ratios are against a gradient (forward + backward) timed in the same run.

Usage (from the bench virtualenv, see benchmarks/README.md)::

    python benchmarks/run.py                      # full run (< 10 min on 2 cores)
    python benchmarks/run.py --quick              # short run (< 2 min)
    python benchmarks/run.py --only hvp,eig       # a subset of: hvp, eig, trace, callback
    python benchmarks/run.py --threads 4          # torch / BLAS threads (default 2, as on CI machines)

Peers are optional: a peer that is not installed prints "not installed" in its rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_curvature as lc
from lightning_curvature import HessianOperator, estimators

TABLES = ("hvp", "eig", "trace", "callback")
SKETCH = 20  # Hutch++ sketch size of the stopping-rule row of table 3
DEFLATE = 10  # eigenvectors deflated by the deflated-Hutchinson row of table 3
PEERS = {"pyhessian": "PyHessian", "hessian_eigenthings": "hessian-eigenthings", "curvlinops": "curvlinops-for-pytorch"}


# ---------------------------------------------------------------------------------------------------- helpers
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the markdown)."""
    try:
        import resource

        rss = f", max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    except ImportError:  # pragma: no cover - not on Linux
        rss = ""
    print(f"[{time.perf_counter() - _T0:6.1f} s{rss}] {msg}", file=sys.stderr, flush=True)


def have(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return v if isinstance(v, str) else f"{v}"

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def sec(seconds: float) -> str:
    return f"{seconds:.2f}"


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2g}%"


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, tuple[float, float]]:
    """(median, min) wall time of each callable, run round robin (the start rotates each round)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for k in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[k].append(dt)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def clear_grads(model: nn.Module, collect: bool = False) -> None:
    """PyHessian's constructor leaves create_graph grads in .grad (a reference cycle); drop them."""
    for p in model.parameters():
        p.grad = None
    if collect:
        gc.collect()


def rms(values: Any) -> float:
    v = list(values)
    return math.sqrt(sum(x * x for x in v) / len(v))


def rel_err_topk(found: list[float] | Tensor, ref: list[float]) -> float:
    """Max relative error of the k found eigenvalues, both sorted descending (algebraic)."""
    f = sorted((float(v) for v in found), reverse=True)
    r = sorted(ref, reverse=True)[: len(f)]
    return max(abs(a - b) / abs(b) for a, b in zip(f, r))


# ---------------------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    name: str
    model: nn.Module  # eval mode, trained for a few hundred SGD steps
    prev: nn.Module  # the same model 10 SGD steps earlier (for warm starts)
    x: Tensor
    y: Tensor
    P: int = 0
    description: str = ""
    warm: bool = True  # whether ``prev`` is a distinct earlier model (warm-start rows make sense)
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.P = sum(p.numel() for p in self.model.parameters())

    def op(self, backend: str = "auto", dtype: torch.dtype | None = None, model: nn.Module | None = None) -> Any:
        return HessianOperator.from_module(
            model or self.model, F.cross_entropy, self.x, self.y, backend=backend, dtype=dtype  # type: ignore[arg-type]
        )


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 16, 10),
    )


def build_problem(name: str, steps: int) -> Problem:
    """Train on digits (SGD, momentum 0.9) for ``steps`` steps; benchmark on a held-out batch, in eval mode."""
    from lightning_curvature.demo import load_digits_tensors

    image = name.startswith("cnn")
    X, Y = load_digits_tensors(image=image)
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    X, Y = X[order], Y[order]
    batch = 128 if image else 256
    n_train = len(X) - batch
    torch.manual_seed(0)
    model = make_cnn() if image else make_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    prev = model
    model.train()
    for step in range(steps):
        if step == steps - 10:
            prev = copy.deepcopy(model)
        idx = torch.randint(0, n_train, (batch,), generator=gen)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    prev.zero_grad(set_to_none=True)
    model.eval()
    prev.eval()
    desc = (
        "MLP 64-256-256-10 tanh, batch 256" if not image
        else "CNN conv16-BN-ReLU-conv32/2-BN-ReLU-linear, eval-mode BatchNorm, batch 128 of 1x8x8"
    )
    prob = Problem(name, model, prev, X[n_train:], Y[n_train:], description=desc, warm=steps >= 10)
    trained = f"{steps} SGD steps" if steps else "at initialisation (no training)"
    prob.description = f"{desc}, P = {prob.P:,}, digits, {trained}"
    return prob


# ---------------------------------------------------------------------------------------------------- peers
def pyhessian_hessian(prob: Problem) -> Any:
    from pyhessian import hessian

    clear_grads(prob.model)
    return hessian(prob.model, nn.CrossEntropyLoss(), data=(prob.x, prob.y), cuda=False)


@contextlib.contextmanager
def count_pyhessian_hvps() -> Iterator[list[int]]:
    """Count PyHessian's HVPs by wrapping ``pyhessian.hessian.hessian_vector_product`` (its only HVP call)."""
    import pyhessian  # noqa: F401 - loads the submodule; the package attribute `hessian` is the class

    ph = sys.modules["pyhessian.hessian"]
    original = ph.hessian_vector_product
    counter = [0]

    def counting(gradsH: Any, params: Any, v: Any) -> Any:
        counter[0] += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counting
    try:
        yield counter
    finally:
        ph.hessian_vector_product = original


def eigenthings_operator(prob: Problem) -> Any:
    import hessian_eigenthings as he

    return he.HessianOperator(prob.model, [(prob.x, prob.y)], he.supervised_loss(F.cross_entropy))


class CountingOperator:
    """A hessian-eigenthings operator that counts its products (and forwards to the real one)."""

    def __init__(self, inner: Any) -> None:
        import hessian_eigenthings as he

        self.inner = inner
        self.count = 0
        outer = self

        class _Op(he.CurvatureOperator):
            size = property(lambda s: inner.size)
            device = property(lambda s: inner.device)
            dtype = property(lambda s: inner.dtype)

            def matvec(self, v: Tensor) -> Tensor:
                outer.count += 1
                return inner.matvec(v)

        self.op = _Op()


def curvlinops_operator(prob: Problem) -> Any:
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(
        prob.model, nn.CrossEntropyLoss(), list(prob.model.parameters()), [(prob.x, prob.y)],
        check_deterministic=False,
    )


@contextlib.contextmanager
def count_curvlinops_columns() -> Iterator[list[int]]:
    """Count curvlinops' HVPs as the columns passed to ``HessianLinearOperator._matmat_batch``."""
    from curvlinops import HessianLinearOperator

    original = HessianLinearOperator._matmat_batch
    counter = [0]

    def counting(self: Any, X: Any, y: Any, M: list[Tensor]) -> Any:
        counter[0] += M[0].shape[-1]
        return original(self, X, y, M)

    HessianLinearOperator._matmat_batch = counting  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        HessianLinearOperator._matmat_batch = original  # type: ignore[method-assign]


def vmapped_hvp(op: HessianOperator) -> Callable[[Tensor], Any]:
    """Benchmark-only: a block of probes through ``vmap(jvp(grad(loss)))`` on our operator's pure loss."""
    from torch.func import grad, jvp, vmap

    def one(t: dict[str, Tensor]) -> dict[str, Tensor]:
        return jvp(grad(op.loss_fn), (op.params,), (t,))[1]

    batched = vmap(one)

    def run(V: Tensor) -> dict[str, Tensor]:  # V: (K, P)
        parts = torch.split(V, op.numels, dim=1)
        tangents = {k: part.reshape(V.shape[0], *s) for k, part, s in zip(op.names, parts, op.shapes)}
        return batched(tangents)

    return run


# ---------------------------------------------------------------------------------------------------- table 1
def hvp_rows(prob: Problem, repeats: int, warmup: int, K: int) -> list[list[Any]]:
    torch.manual_seed(0)
    model, params = prob.model, list(prob.model.parameters())
    v = torch.randn(prob.P)
    ref = prob.op("double-backward", torch.float64).matvec(v.double())
    V = torch.randn(K, prob.P)
    op_db, op_fr = prob.op("double-backward"), prob.op("forward-over-reverse")
    fns: dict[str, Callable[[], Any]] = {}
    results: dict[str, Tensor] = {}
    per_probe: dict[str, int] = {}
    notes: dict[str, str] = {}

    def gradient() -> Any:
        return torch.autograd.grad(F.cross_entropy(model(prob.x), prob.y), params)

    fns["gradient (autograd.grad: forward + backward)"] = gradient
    name = "ours: double-backward, first-order graph reused"
    fns[name] = lambda: op_db.matvec(v)
    results[name] = op_db.matvec(v)
    name = "ours: double-backward, fresh operator (build graph + 1 HVP)"
    fns[name] = lambda: prob.op("double-backward").matvec(v)
    name = f"ours: HessianOperator.matmat ({K} columns, double-backward), per column"
    VT_ours = V.T.contiguous()
    fns[name] = lambda: op_db.matmat(VT_ours)
    per_probe[name] = K
    name = "ours: forward-over-reverse"
    fns[name] = lambda: op_fr.matvec(v)
    results[name] = op_fr.matvec(v)
    try:
        vm = vmapped_hvp(op_fr)
        vm(V[:2])
        name = f"ours: vmap(jvp(grad)) block of {K} (benchmark-only), per probe"
        fns[name] = lambda: vm(V)
        per_probe[name] = K
        results[name] = torch.cat([t.reshape(1, -1) for t in vm(v[None]).values()], dim=1)[0]
    except Exception as err:  # noqa: BLE001
        notes["ours: vmap(jvp(grad))"] = f"failed: {type(err).__name__}: {err}"[:100]
    if have("pyhessian"):
        from pyhessian.utils import hessian_vector_product

        H = pyhessian_hessian(prob)
        v_list = [t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]
        name = "PyHessian: hessian_vector_product (graph retained)"
        fns[name] = lambda: hessian_vector_product(H.gradsH, H.params, v_list)
        results[name] = torch.cat([t.reshape(-1) for t in hessian_vector_product(H.gradsH, H.params, v_list)])
    if have("hessian_eigenthings"):
        he_op = eigenthings_operator(prob)
        name = "hessian-eigenthings: HessianOperator.matvec (autograd)"
        fns[name] = lambda: he_op.matvec(v)
        results[name] = he_op.matvec(v)
    if have("curvlinops"):
        cl_op = curvlinops_operator(prob)
        name = "curvlinops: HessianLinearOperator @ v"
        fns[name] = lambda: cl_op @ v
        results[name] = cl_op @ v
        name = f"curvlinops: HessianLinearOperator @ V ({K} columns), per column"
        VT = V.T.contiguous()
        fns[name] = lambda: cl_op @ VT
        per_probe[name] = K
    # Block rows allocate hundreds of MB per call; freeing that (glibc gives it back to the OS) makes the next small
    # call fault its pages in again. So single-vector rows and block rows are timed in two separate interleaved
    # groups; the gradient of the first group is the denominator of both.
    singles = {k: f for k, f in fns.items() if k not in per_probe}
    blocks = {k: f for k, f in fns.items() if k in per_probe}
    times = interleaved(singles, repeats, warmup)
    block_times = interleaved(blocks, repeats, warmup) if blocks else {}
    if have("pyhessian"):
        del H
        clear_grads(model, collect=True)
    g, g_min = times["gradient (autograd.grad: forward + backward)"]
    rows = []
    for name, (t, t_min) in {**times, **block_times}.items():
        t, t_min = t / per_probe.get(name, 1), t_min / per_probe.get(name, 1)
        diff = ""
        if name in results:
            diff = f"{float((results[name].double() - ref).norm() / ref.norm()):.1e}"
        rows.append([name, ms(t), f"**{t / g:.2f}**", ms(t_min), f"{t_min / g_min:.2f}", diff])
    for name, note in notes.items():
        rows.append([name, note, "", "", "", ""])
    return rows


def table_hvp(probs: list[Problem], quick: bool) -> str:
    repeats, warmup, K = (7, 2, 16) if quick else (25, 3, 32)
    out = [
        "## Table 1: one Hessian-vector product, time relative to one gradient",
        "",
        f"Median (and min: noise on a shared machine only slows things down, so the min ratio is the steadier one) "
        f"of {repeats} interleaved repeats after {warmup} warm-up rounds. *gradient* = "
        "`torch.autograd.grad(loss, params)` (forward + backward) in the same run. *rel. diff* = "
        "‖Hv − Hv₆₄‖/‖Hv₆₄‖ against our double-backward operator in float64 (same v): all compute the same Hessian. "
        f"Block rows push K = {K} probes through one call and report time per probe; they are timed in a second "
        "interleaved group (their large allocations would otherwise slow the small calls down).",
    ]
    for prob in probs:
        log(f"hvp {prob.name}")
        rows = hvp_rows(prob, repeats, warmup, K)
        out += ["", f"### {prob.description}", "",
                md_table(["method", "median ms", "× gradient", "min ms", "× gradient (min)", "rel. diff"], rows)]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- table 2
def reference_spectrum(prob: Problem, k: int = 5) -> dict[str, Any]:
    """Top-k (LA) and λ_min of the float64 Hessian by ARPACK (scipy eigsh) on our double-backward operator."""
    if "spectrum" in prob.cache:
        return prob.cache["spectrum"]
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = prob.op("double-backward", torch.float64)

    def mv(u: np.ndarray) -> np.ndarray:
        return op.matvec(torch.from_numpy(np.ascontiguousarray(u, dtype=np.float64).reshape(-1))).numpy()

    L = LinearOperator((prob.P, prob.P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(prob.P)
    (top, vecs), t_top = timed(lambda: eigsh(L, k=k, which="LA", tol=1e-10, v0=v0))
    n_top = op.num_matvecs
    low, _ = timed(lambda: eigsh(L, k=1, which="SA", tol=1e-6, v0=v0, return_eigenvectors=False))
    res = [float(np.linalg.norm(mv(vecs[:, i]) - top[i] * vecs[:, i]) / abs(top[i])) for i in range(k)]
    out = {
        "top": sorted(top.tolist(), reverse=True), "min": float(low[0]), "matvecs": n_top, "seconds": t_top,
        "residual": max(res),
    }
    prob.cache["spectrum"] = out
    return out


def warm_vectors(prob: Problem, k: int) -> Tensor:
    """Top-k eigenvectors (Lanczos, tol 1e-3) at the model 10 SGD steps earlier: what a callback keeps between
    estimates."""
    key = f"warm{k}"
    if key not in prob.cache:
        op = prob.op(model=prob.prev)
        gen = torch.Generator().manual_seed(123)
        solver = getattr(estimators, "lanczos", None)
        if solver is not None:
            prob.cache[key] = solver(op, k, which="LA", tol=1e-3, generator=gen).eigenvectors
        else:
            prob.cache[key] = lc.power_iteration(op, k, max_iter=100, tol=1e-3, generator=gen).eigenvectors
    return prob.cache[key]


@dataclass
class EigRun:
    hvps: float
    seconds: float
    err: float
    converged: str = ""


def eig_methods(prob: Problem, k: int) -> dict[str, tuple[str, Callable[[int], tuple[list[float], int, str]]]]:
    """name -> (how HVPs are counted, run(seed) -> (eigenvalues, hvps, converged))."""
    methods: dict[str, tuple[str, Callable[[int], tuple[list[float], int, str]]]] = {}
    tol = 1e-3

    def ours_cold(seed: int) -> tuple[list[float], int, str]:
        op = prob.op()
        r = lc.power_iteration(op, k, max_iter=100, tol=tol, generator=torch.Generator().manual_seed(seed))
        return r.eigenvalues.tolist(), op.num_matvecs, f"{int(r.converged.sum())}/{k}"

    def ours_warm(seed: int) -> tuple[list[float], int, str]:
        op = prob.op()
        init = warm_vectors(prob, k)
        r = lc.power_iteration(op, k, max_iter=100, tol=tol, init=init, generator=torch.Generator().manual_seed(seed))
        return r.eigenvalues.tolist(), op.num_matvecs, f"{int(r.converged.sum())}/{k}"

    methods["ours: power_iteration (cold, tol 1e-3 on residual)"] = ("op.num_matvecs", ours_cold)
    if prob.warm:
        methods["ours: power_iteration (warm: eigvecs 10 SGD steps earlier)"] = ("op.num_matvecs", ours_warm)
    if hasattr(estimators, "lanczos"):
        def ours_lanczos(seed: int, warm: bool = False) -> tuple[list[float], int, str]:
            op = prob.op()
            init = warm_vectors(prob, k) if warm else None
            r = estimators.lanczos(op, k, which="LA", tol=tol, init=init, generator=torch.Generator().manual_seed(seed))
            return r.eigenvalues.tolist(), op.num_matvecs, f"{int(r.converged.sum())}/{k}"

        methods["ours: lanczos (which='LA', tol 1e-3 on Ritz residual, cold)"] = ("op.num_matvecs", ours_lanczos)
        if prob.warm:
            methods["ours: lanczos (warm: eigvecs 10 SGD steps earlier)"] = (
                "op.num_matvecs", lambda seed: ours_lanczos(seed, warm=True),
            )
    if have("pyhessian"):
        def pyhessian_eigs(seed: int) -> tuple[list[float], int, str]:
            torch.manual_seed(seed)  # PyHessian draws from the global RNG
            with count_pyhessian_hvps() as n:
                H = pyhessian_hessian(prob)
                vals, _ = H.eigenvalues(maxIter=100, tol=tol, top_n=k)
            del H
            clear_grads(prob.model)
            return vals, n[0], "?"

        methods["PyHessian: hessian.eigenvalues (power it., tol 1e-3 on Δλ)"] = (
            "wrap pyhessian.hessian.hessian_vector_product", pyhessian_eigs,
        )
    if have("hessian_eigenthings"):
        import hessian_eigenthings as he

        def he_power(seed: int) -> tuple[list[float], int, str]:
            c = CountingOperator(eigenthings_operator(prob))
            r = he.deflated_power_iteration(c.op, k=k, max_iter=100, tol=tol, seed=seed)
            return r.eigenvalues.tolist(), c.count, f"{int(r.converged.sum())}/{k}"

        def he_lanczos(max_iter: int | None) -> Callable[[int], tuple[list[float], int, str]]:
            def run(seed: int) -> tuple[list[float], int, str]:
                c = CountingOperator(eigenthings_operator(prob))
                r = he.lanczos(c.op, k=k, max_iter=max_iter, tol=tol, which="LA", seed=seed)
                return r.eigenvalues.tolist(), c.count, f"{int(r.converged.sum())}/{k}"

            return run

        how = "counting operator wrapper"
        methods["hessian-eigenthings: deflated_power_iteration (tol 1e-3)"] = (how, he_power)
        methods["hessian-eigenthings: lanczos (which='LA', default max_iter=2k)"] = (how, he_lanczos(None))
        methods["hessian-eigenthings: lanczos (which='LA', max_iter=40)"] = (how, he_lanczos(40))
    if have("curvlinops"):
        from scipy.sparse.linalg import eigsh

        def cl_eigsh(seed: int) -> tuple[list[float], int, str]:
            with count_curvlinops_columns() as n:
                A = curvlinops_operator(prob).to_scipy()
                v0 = np.random.default_rng(seed).standard_normal(prob.P).astype(A.dtype)
                vals = eigsh(A, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
            return vals.tolist(), n[0], f"{k}/{k}"

        methods["curvlinops: HessianLinearOperator.to_scipy() + scipy eigsh (LA, tol 1e-3)"] = (
            "wrap _matmat_batch (columns)", cl_eigsh,
        )
    return methods


def table_eig(probs: list[Problem], quick: bool) -> str:
    seeds = [0] if quick else [0, 1, 2]
    if not quick:  # a saddle-ish point where the top-5 by magnitude is not the top-5 by value
        log("training cnn-init")
        probs = [*probs, build_problem("cnn-init", 0)]
    out = [
        "## Table 2: top-1 and top-5 eigenvalues",
        "",
        f"Median over seeds {seeds} of HVPs, wall time (operator construction included) and the max relative error "
        "of the k eigenvalues (sorted descending, algebraic) against a converged float64 reference: scipy `eigsh` "
        "(ARPACK, which='LA', tol=1e-10) on our double-backward operator in float64. *converged* is what the method "
        "itself reports (PyHessian reports nothing; scipy raises if it does not converge). All at max 100 "
        "products per eigenpair where the method has that knob.",
    ]
    for prob in probs:
        ref = reference_spectrum(prob)
        if prob.warm:
            warm_vectors(prob, 1), warm_vectors(prob, 5)
        for _, (_, run) in eig_methods(prob, 1).items():  # warm-up: first calls pay one-time costs
            with contextlib.suppress(Exception):
                run(999)
        top = ", ".join(f"{v:.4f}" for v in ref["top"])
        out += [
            "",
            f"### {prob.description}",
            "",
            f"Reference: λ₁..λ₅ = {top}; λ_min = {ref['min']:.4f} (|λ_min| < λ₅, so largest-magnitude and "
            f"largest-algebraic top-5 coincide here)" if abs(ref["min"]) < ref["top"][-1] else
            f"Reference: λ₁..λ₅ = {top}; λ_min = {ref['min']:.4f} (|λ_min| > λ₅: largest-magnitude top-5 "
            "differs from largest-algebraic top-5)",
            f"({ref['matvecs']} float64 HVPs, {ref['seconds']:.1f} s, max relative residual {ref['residual']:.1e})",
            "",
        ]
        rows = []
        for k in (1, 5) if prob.warm else (5,):
            methods = eig_methods(prob, k)
            for name, (how, run) in methods.items():
                log(f"eig {prob.name} k={k}: {name}")
                runs: list[EigRun] = []
                try:
                    for seed in seeds:
                        (vals, n, conv), t = timed(lambda run=run, seed=seed: run(seed))
                        runs.append(EigRun(n, t, rel_err_topk(vals, ref["top"]), conv))
                except Exception as err:  # noqa: BLE001
                    rows.append([k, name, f"failed: {type(err).__name__}: {err}"[:80], "", "", "", how])
                    continue
                rows.append([
                    k, name, f"{statistics.median(r.hvps for r in runs):.0f}",
                    sec(statistics.median(r.seconds for r in runs)),
                    pct(statistics.median(r.err for r in runs)),
                    " ".join(sorted({r.converged for r in runs})), how,
                ])
        out.append(md_table(["k", "method", "HVPs", "s", "max rel. err", "converged", "HVPs counted by"], rows))
        gc.collect()
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- table 3
def exact_diagonal_mlp(model: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
    """Exact Hessian diagonal of mean cross-entropy for a Sequential of Linear layers and elementwise activations.

    Samples do not interact (no batch statistics), so for a Linear layer ``z = W a + b`` the diagonal is
    ``∂²L/∂W_ij² = (1/N) Σ_n a_nj² ∂²ℓ_n/∂z_ni²`` and ``∂²L/∂b_i² = (1/N) Σ_n ∂²ℓ_n/∂z_ni²``; the per-sample
    pre-activation curvatures ``∂²ℓ_n/∂z_ni²`` come out of one HVP per unit ``i`` with ``e_i`` in every sample's row
    (the pre-activation Hessian is block diagonal over samples). Float64, in named_parameters order.
    """
    model = copy.deepcopy(model).double().eval()
    x = x.double()
    layers = list(model)
    parts: list[Tensor] = []
    N = x.shape[0]
    for li, layer in enumerate(layers):
        if not isinstance(layer, nn.Linear):
            if any(True for _ in layer.parameters()):
                raise TypeError(f"exact_diagonal_mlp handles Linear layers only, got {type(layer).__name__}")
            continue
        with torch.no_grad():
            a = x
            for m in layers[:li]:
                a = m(a)
            z = layer(a)
        z = z.detach().requires_grad_(True)
        h = z
        for m in layers[li + 1:]:
            h = m(h)
        (g,) = torch.autograd.grad(F.cross_entropy(h, y, reduction="sum"), z, create_graph=True)
        width = z.shape[1]
        E = torch.eye(width, dtype=z.dtype)[:, None, :].expand(width, N, width)  # E[i] = e_i in every row
        (HE,) = torch.autograd.grad(g, z, E, is_grads_batched=True)  # HE[i, n] = (∂²ℓ_n/∂z_n²) e_i
        d = torch.diagonal(HE, dim1=0, dim2=2)  # d[n, i] = ∂²ℓ_n/∂z_ni²
        parts += [(d.T @ a.pow(2) / N).reshape(-1), d.sum(0) / N]
    return torch.cat(parts)


def exact_trace(prob: Problem) -> tuple[float, str]:
    diag = exact_diagonal_mlp(prob.model, prob.x, prob.y)  # type: ignore[arg-type]
    op = prob.op("double-backward", torch.float64)
    idx = torch.randperm(prob.P, generator=torch.Generator().manual_seed(0))[:8]
    worst = 0.0
    for i in idx.tolist():
        e = torch.zeros(prob.P, dtype=torch.float64)
        e[i] = 1.0
        worst = max(worst, abs(float(op.matvec(e)[i]) - float(diag[i])))
    check = f"max |Hᵢᵢ − eᵢᵀHeᵢ| = {worst:.1e} on 8 random coordinates (max |Hᵢᵢ| = {float(diag.abs().max()):.2e})"
    return float(diag.sum()), check


def curvlinops_fixed_budget(prob: Problem, fn: Callable[..., Any]) -> Callable[[int, int], tuple[float, int]]:
    def run(seed: int, b: int) -> tuple[float, int]:
        torch.manual_seed(seed)  # curvlinops draws its probes from the global RNG
        with count_curvlinops_columns() as n:
            value = float(fn(curvlinops_operator(prob), b))
        return value, n[0]

    return run


def table_trace(probs: list[Problem], quick: bool, target: float) -> str:
    prob = next(p for p in probs if p.name == "mlp")
    seeds = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    ladder = [12, 24, 48, 96, 192, 384, 768, 1536] if not quick else [12, 24, 48, 96, 192, 384]
    (tr, check), t_exact = timed(lambda: exact_trace(prob))
    out = [
        f"## Table 3: trace to {100 * target:.3g}% relative error",
        "",
        f"### {prob.description}",
        "",
        f"Reference: exact trace = {tr:.6f}, the sum of the exact Hessian diagonal (per-sample pre-activation "
        f"curvature, float64, {t_exact:.1f} s); check: {check}.",
        "",
        f"{len(seeds)} seeds. **Stopping rules**: the estimator decides when to stop; median HVPs and time, the "
        f"root-mean-square relative error over the seeds and how many seeds ended within {100 * target:.3g}%. Our "
        "stopping rules use rtol = target/2 (stderr ≤ half the target: within it with ~95% probability). **Fixed "
        f"budgets**: each budget on the ladder {ladder} is a fresh, independent run per seed; reported is the "
        f"smallest budget whose RMS relative error over the seeds is ≤ {100 * target:.3g}% there and at the next "
        "budget (a confirmation against lucky draws), with the median time of one run at that budget.",
        "",
    ]
    rows: list[list[Any]] = []
    samples: list[float] = []
    rtol = target / 2  # stderr <= target/2: the error is within the target with ~95% probability

    # --- stopping rules
    def stopping(name: str, how: str, run: Callable[[int], tuple[float, int]]) -> None:
        log(f"trace: {name}")
        res = []
        try:
            for seed in seeds:
                (value, n), t = timed(lambda run=run, seed=seed: run(seed))
                res.append((n, t, abs(value - tr) / abs(tr)))
        except Exception as err:  # noqa: BLE001
            rows.append([name, "stopping rule", f"failed: {type(err).__name__}: {err}"[:80], "", "", "", how])
            return
        within = sum(e <= target for _, _, e in res)
        rows.append([
            name, "stopping rule", f"{statistics.median(n for n, _, _ in res):.0f}",
            sec(statistics.median(t for _, t, _ in res)), pct(rms(e for _, _, e in res)),
            f"{within}/{len(res)}", how,
        ])

    def ours_rtol(seed: int) -> tuple[float, int]:
        op = prob.op()
        r = lc.hutchinson_trace(op, 100_000, rtol=rtol, min_probes=10, generator=torch.Generator().manual_seed(seed))
        return r.value, op.num_matvecs

    stopping(f"ours: hutchinson_trace(rtol={rtol:g}, min_probes=10)", "op.num_matvecs", ours_rtol)
    if hasattr(estimators, "hutchpp_trace"):
        def ours_hpp_rtol(seed: int) -> tuple[float, int]:
            op = prob.op()
            r = estimators.hutchpp_trace(op, 2 * SKETCH + 100_000, sketch_size=SKETCH, rtol=rtol, min_probes=10,
                                         generator=torch.Generator().manual_seed(seed))
            return r.value, op.num_matvecs

        stopping(f"ours: hutchpp_trace(sketch_size={SKETCH}, rtol={rtol:g}, min_probes=10)", "op.num_matvecs",
                 ours_hpp_rtol)
    if hasattr(estimators, "deflated_hutchinson_trace") and hasattr(estimators, "lanczos"):
        def ours_deflated(seed: int) -> tuple[float, int]:
            op = prob.op()
            gen = torch.Generator().manual_seed(seed)
            top = estimators.lanczos(op, DEFLATE, which="LA", tol=1e-3, generator=gen)
            r = estimators.deflated_hutchinson_trace(op, top.eigenvectors, 100_000, eigenvalues=top.eigenvalues,
                                                     rtol=rtol, min_probes=10, generator=gen)
            return r.value, op.num_matvecs

        stopping(f"ours: lanczos(k={DEFLATE}) + deflated_hutchinson_trace(rtol={rtol:g}), HVPs of both",
                 "op.num_matvecs", ours_deflated)
    if have("pyhessian"):
        for tol in (1e-3, target):
            def ph_trace(seed: int, tol: float = tol) -> tuple[float, int]:
                torch.manual_seed(seed)
                with count_pyhessian_hvps() as n:
                    H = pyhessian_hessian(prob)
                    vhv = H.trace(maxIter=100, tol=tol)
                del H
                clear_grads(prob.model)
                return float(np.mean(vhv)), n[0]

            label = "default" if tol == 1e-3 else "= target"
            stopping(f"PyHessian: hessian.trace(maxIter=100, tol={tol:g}) ({label})",
                     "wrap pyhessian.hessian.hessian_vector_product", ph_trace)

    # --- fixed budgets
    fixed: dict[str, tuple[str, Callable[[int, int], tuple[float, int]]]] = {}

    def ours_fixed(seed: int, b: int) -> tuple[float, int]:
        op = prob.op()
        r = lc.hutchinson_trace(op, b, generator=torch.Generator().manual_seed(seed))
        samples.extend(r.samples)
        return r.value, op.num_matvecs

    fixed["ours: hutchinson_trace(num_probes=b)"] = ("op.num_matvecs", ours_fixed)
    if hasattr(estimators, "hutchpp_trace"):
        def ours_hpp_fixed(seed: int, b: int) -> tuple[float, int]:
            op = prob.op()
            r = estimators.hutchpp_trace(op, b, generator=torch.Generator().manual_seed(seed))
            return r.value, op.num_matvecs

        fixed["ours: hutchpp_trace(num_matvecs=b)"] = ("op.num_matvecs", ours_hpp_fixed)
    if have("curvlinops"):
        import curvlinops

        for fn_name in ("hutchinson_trace", "hutchpp_trace", "xtrace"):
            if not hasattr(curvlinops, fn_name):
                continue

            fixed[f"curvlinops: {fn_name}(A, b)"] = (
                "wrap _matmat_batch (columns)", curvlinops_fixed_budget(prob, getattr(curvlinops, fn_name)),
            )
    if have("hessian_eigenthings"):
        import hessian_eigenthings as he

        def he_hpp(seed: int, b: int) -> tuple[float, int]:
            c = CountingOperator(eigenthings_operator(prob))
            r = he.hutch_plus_plus(c.op, num_matvecs=b, seed=seed)
            return r.estimate, c.count

        fixed["hessian-eigenthings: hutch_plus_plus(num_matvecs=b)"] = ("counting operator wrapper", he_hpp)

    for name, (how, run) in fixed.items():
        levels: list[tuple[int, list[tuple[int, float, float]], float]] = []
        try:
            for b in ladder:
                log(f"trace: {name}, budget {b}")
                res = []
                for seed in seeds:
                    s_b = 1_000 * seed + b  # independent draws per budget (no shared prefix of probes)
                    (value, n), t = timed(lambda run=run, s_b=s_b, b=b: run(s_b, b))
                    res.append((n, t, abs(value - tr) / abs(tr)))
                levels.append((b, res, rms(e for _, _, e in res)))
                if len(levels) >= 2 and levels[-1][2] <= target and levels[-2][2] <= target:
                    break
        except Exception as err:  # noqa: BLE001
            rows.append([name, "fixed budget", f"failed: {type(err).__name__}: {err}"[:80], "", "", "", how])
            continue
        reached = len(levels) >= 2 and levels[-1][2] <= target and levels[-2][2] <= target
        b, res, med_err = levels[-2] if reached else levels[-1]
        within = sum(e <= target for _, _, e in res)
        hvps = f"{statistics.median(n for n, _, _ in res):.0f}" if reached else f"> {b} (not reached)"
        rows.append([name, "fixed budget", hvps, sec(statistics.median(t for _, t, _ in res)), pct(med_err),
                     f"{within}/{len(res)}", how])
    out.append(md_table(["method", "rule", "HVPs", "s", "RMS rel. err", "within", "HVPs counted by"], rows))
    if len(samples) > 2:
        s = statistics.stdev(samples) / abs(tr)
        out += [
            "",
            f"Per-probe relative standard deviation of Rademacher Hutchinson here: σ/tr = {s:.2f} "
            f"(from {len(samples)} samples), so plain Hutchinson needs about (σ/(ε·tr))² = {(s / 0.01) ** 2:,.0f} "
            f"probes for a 1% RMS error and {(s / 0.05) ** 2:,.0f} for 5%.",
        ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- table 4
def table_callback(quick: bool) -> str:
    import lightning.pytorch as pl

    from lightning_curvature import CurvatureMonitor
    from lightning_curvature.demo import DigitsDataModule, MLPClassifier

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    steps, repeats = (200, 2) if quick else (1000, 5)

    def fit(with_cb: bool) -> tuple[float, list[Tensor], dict[str, float]]:
        pl.seed_everything(0, verbose=False)
        model = MLPClassifier()
        dm = DigitsDataModule()
        cb = CurvatureMonitor() if with_cb else None
        trainer = pl.Trainer(
            max_steps=steps, callbacks=[cb] if cb else [], logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            accelerator="cpu", devices=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            trainer.fit(model, dm)
            dt = time.perf_counter() - t0
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("curvature/")}
        return dt, [p.detach().clone() for p in model.parameters()], metrics

    log("callback: warm-up fit")
    fit(False)  # warm-up (imports, first DataLoader)
    t_with, t_without = [], []
    w_with: list[Tensor] = []
    w_without: list[Tensor] = []
    metrics: dict[str, float] = {}
    for r in range(repeats):
        for with_cb in ((True, False) if r % 2 == 0 else (False, True)):
            dt, w, m = fit(with_cb)
            (t_with if with_cb else t_without).append(dt)
            if with_cb:
                w_with, metrics = w, m
            else:
                w_without = w
    a, b = statistics.median(t_with), statistics.median(t_without)
    a_min, b_min = min(t_with), min(t_without)
    every = CurvatureMonitor().every_n_train_steps
    n_est = math.ceil(steps / every)
    same = all(torch.equal(p, q) for p, q in zip(w_with, w_without))
    rows = [
        ["without callback", sec(b), "1.00", sec(b_min), "1.00", ""],
        ["`CurvatureMonitor()` (defaults)", sec(a), f"**{a / b:.2f}**", sec(a_min), f"{a_min / b_min:.2f}",
         f"{n_est} estimates, {1e3 * (a_min - b_min) / n_est:.0f} ms each (from the difference of the mins)"],
    ]
    extra = ""
    if "curvature/seconds" in metrics:
        extra = (f" Last estimate as logged: {metrics.get('curvature/num_hvps', float('nan')):.0f} HVPs in "
                 f"{1e3 * metrics['curvature/seconds']:.0f} ms.")
    return "\n".join([
        "## Table 4: callback overhead on the digits example",
        "",
        f"`MLPClassifier()` + `DigitsDataModule()` (batch 64), `Trainer(max_steps={steps}, logger=False, "
        "enable_progress_bar=False, limit_val_batches=0)`, seed 0; `trainer.fit` wall time, median of "
        f"{repeats} interleaved runs (and min) after one warm-up fit. Final weights with and without the callback "
        f"bit-identical: **{'yes' if same else 'NO'}**.{extra}",
        "",
        md_table(["run", "median s", "ratio", "min s", "ratio (min)", "note"], rows),
    ])


# ---------------------------------------------------------------------------------------------------- main
def blas_threads(threads: int) -> Any:
    """A context limiting BLAS/OpenMP pools to ``threads`` (threadpoolctl), or a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def machine_info(args: argparse.Namespace) -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
            if names:
                cpu = names[0]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), check=False).stdout.strip()
    except OSError:
        rev = "?"
    blas = ""
    with contextlib.suppress(Exception):
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i['internal_api']} {i.get('version') or ''} ({i['num_threads']} threads)".strip()
                         for i in threadpool_info() if i.get("user_api") == "blas")
    dists = ["torch", "lightning", "lightning-curvature", "numpy", "scipy", "scikit-learn", *PEERS.values()]
    load = os.getloadavg()
    lines = [
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "- command: `" + " ".join(["python benchmarks/run.py", *sys.argv[1:]]) + "`",
        f"- machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        f"- threads: torch {torch.get_num_threads()}, BLAS limited to {args.threads} via threadpoolctl"
        + (f" ({blas})" if blas else ""),
        f"- load average at start: {load[0]:.2f} (a shared machine inflates times; ratios are measured interleaved)",
        f"- checkout: {rev or '?'}",
        "- versions: " + ", ".join(f"{d} {version(d)}" for d in dists),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (< 2 min): fewer repeats, seeds, steps")
    parser.add_argument("--only", default=",".join(TABLES), help=f"comma-separated subset of {','.join(TABLES)}")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default 2, as on CI)")
    parser.add_argument("--trace-target", type=float, default=0.05,
                        help="relative error target of table 3 (default 0.05; 0.01 takes thousands of HVPs per run)")
    args = parser.parse_args(argv)
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in only if t not in TABLES]
    if bad:
        parser.error(f"--only takes a comma-separated subset of {TABLES}, got {bad}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)

    start = time.perf_counter()
    with blas_threads(args.threads):
        print("# lightning-curvature benchmarks\n")
        print(machine_info(args))
        missing = [d for m, d in PEERS.items() if not have(m)]
        if missing:
            print(f"- not installed (rows skipped): {', '.join(missing)}")
        probs: list[Problem] = []
        if any(t in only for t in ("hvp", "eig", "trace")):
            steps = 100 if args.quick else 300
            names = ["mlp"] if (args.quick and only != ["hvp"]) else ["mlp", "cnn"]
            if only == ["trace"]:
                names = ["mlp"]
            log(f"training {names}")
            probs = [build_problem(n, steps) for n in names]
        sys.stdout.flush()
        for table in TABLES:
            if table not in only:
                continue
            t0 = time.perf_counter()
            if table == "hvp":
                text = table_hvp(probs, args.quick)
            elif table == "eig":
                text = table_eig(probs, args.quick)
            elif table == "trace":
                text = table_trace(probs, args.quick, args.trace_target)
            else:
                text = table_callback(args.quick)
            print("\n" + text + f"\n\n_({time.perf_counter() - t0:.0f} s)_")
            sys.stdout.flush()
        load = os.getloadavg()
        print(f"\nTotal {time.perf_counter() - start:.0f} s; load average at the end: {load[0]:.2f}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
