"""Cost of one Lanczos step against one Hessian-vector product, measured side by side on real model HVPs.

    python benchmarks/krylov.py                              # P = 1e5, 1.58M (MLP 512-1024-1024-10), 1e7
    python benchmarks/krylov.py --sizes 1.58e6 --repeats 7   # only the issue's MLP
    python benchmarks/krylov.py --threads 1
    python benchmarks/krylov.py --baseline /tmp/old/src        # also an older checkout's lanczos, in the same rounds

For each model: a tanh MLP ``d_in-h-h-10`` with cross-entropy on a fixed random batch of 256, and its
``HessianOperator`` (double-backward backend: the first-order graph is built once and every product is one reverse pass
through it, as inside a ``CurvatureMonitor`` estimate). The weights are at initialisation, where the top eigenvalues
take some 60 products to converge to ``tol = 1e-3``, so a run with ``max_iter = n`` below that spends exactly ``n``
products; the last row of each configuration runs to convergence. Every run's operator is wrapped in a stopwatch, so
that the products of the run are timed inside the run itself:

    ratio = (Lanczos wall time) / (wall time spent in its products)

1.00 means the bookkeeping (orthogonalisation, restarts, Ritz checks) is free; 1.15 means it costs 15% of a product.
Measuring both in the same run keeps the ratio steady on a shared, noisy machine, where a product's cost changes
from minute to minute. Rounds repeat (one run of every configuration per round) and medians are reported; ``vs bare``
divides the time per step by the median of bare products (random unit vectors) timed in the same rounds, as a check.
With ``--baseline``, the ``lanczos`` of another source tree (``git archive <commit> src | tar -x -C /tmp/old``) runs
in the same rounds as this one, so both rows see the same machine load.
The basis holds at most ``max_basis`` rows of ``P`` floats (``max_basis = 20`` for ``k = 1``): after ``n`` products,
``n`` Krylov vectors and the residual. So ``n = 10`` and ``n = 19`` measure a growing basis of up to 20 vectors
without a restart, ``n = 20`` is the first run that pays one (the 20th product needs a free row: the restart keeps 6
Ritz vectors and the residual), and ``n = 60`` restarts every 13 products.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature import HessianOperator, lanczos

LANCZOS: dict[str, Callable[..., object]] = {"": lanczos}


def load_baseline(src: str) -> Callable[..., object]:
    """``lanczos`` of the ``lightning_curvature`` package under ``src``, imported as a separate package."""
    import importlib.util
    import pathlib

    root = pathlib.Path(src) / "lightning_curvature"
    spec = importlib.util.spec_from_file_location("lc_baseline", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lc_baseline"] = module
    spec.loader.exec_module(module)
    return module.estimators.lanczos

# (label, kwargs) of the Lanczos runs; ``max_iter`` is added per run
CONFIGS: list[tuple[str, dict]] = [
    ("k=1", {"k": 1}),
    ("k=5", {"k": 5}),
    ("k=5, block_size=5", {"k": 5, "block_size": 5}),
]


def mlp_for(params: float) -> tuple[nn.Module, int]:
    """A tanh MLP ``d_in-h-h-10`` with about ``params`` parameters (the issue's 512-1024-1024-10 at 1.58M)."""
    if abs(params - 1.58e6) / 1.58e6 < 0.05:
        d_in, h = 512, 1024
    else:
        d_in = 64 if params < 3e5 else 512
        h = int((-(d_in + 11) + ((d_in + 11) ** 2 + 4 * params) ** 0.5) / 2)  # h² + (d_in + 11) h ≈ params
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    return model, d_in


class Stopwatch:
    """An operator that times every call of the one it wraps."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.seconds, self.count = op, 0.0, 0
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t0
        self.count += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.op.matmat(V)
        self.seconds += time.perf_counter() - t0
        self.count += V.shape[1]
        return out


def elapsed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(params: float, steps: list[int], repeats: int, products: int) -> list[list[str]]:
    model, d_in = mlp_for(params)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, d_in, generator=g), torch.randint(0, 10, (256,), generator=g)
    op = HessianOperator.from_module(model, F.cross_entropy, x, y, backend="double-backward")
    P = op.shape[0]
    vs = torch.randn(products, P, generator=g)
    vs /= vs.norm(dim=1, keepdim=True)

    def bare() -> None:
        for v in vs:
            op.matvec(v)

    runs: dict[tuple[str, int | str], Callable[[Stopwatch], object]] = {}
    for tag, solver in LANCZOS.items():
        for label, kw in CONFIGS:
            name = f"{tag}{label}"
            for n in steps:
                if n >= kw["k"]:
                    runs[(name, n)] = (lambda sw, kw=kw, n=n, f=solver: f(
                        sw, max_iter=n, tol=1e-3, generator=torch.Generator().manual_seed(1), **kw))
            # to convergence (with the deflated check where k > block_size)
            runs[(name, "converged")] = (lambda sw, kw=kw, f=solver: f(
                sw, max_iter=300, tol=1e-3, generator=torch.Generator().manual_seed(1), **kw))
    bare()  # builds the first-order graph, warms up the allocator and the kernels
    for key, fn in list(runs.items()):
        try:
            fn(Stopwatch(op))
        except TypeError:  # an older lanczos without this keyword (a baseline run): skip the row
            del runs[key]
    t_prod: list[float] = []
    ratio: dict[tuple[str, int | str], list[float]] = {key: [] for key in runs}
    per_step: dict[tuple[str, int | str], list[float]] = {key: [] for key in runs}
    in_products: dict[tuple[str, int | str], list[float]] = {key: [] for key in runs}
    counts: dict[tuple[str, int | str], int] = {}
    for _ in range(repeats):
        t_prod.append(elapsed(bare) / products)
        for key, fn in runs.items():
            sw = Stopwatch(op)
            total = elapsed(lambda fn=fn, sw=sw: fn(sw))
            counts[key] = sw.count
            ratio[key].append(total / sw.seconds)
            per_step[key].append(total / sw.count)
            in_products[key].append(sw.seconds / sw.count)
    prod = statistics.median(t_prod)
    rows = []
    for (label, n), rs in ratio.items():
        step = statistics.median(per_step[(label, n)])
        inner = statistics.median(in_products[(label, n)])
        name = label if isinstance(n, int) else f"{label}, {n}"
        rows.append([f"{P:,}", name, str(counts[(label, n)]), f"{inner * 1e3:.1f}", f"{step * 1e3:.1f}",
                     f"{statistics.median(rs) * inner * 1e3 - inner * 1e3:+.2f}", f"**{statistics.median(rs):.3f}**",
                     f"{step / prod:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1.58e6,1e7", help="approximate parameter counts, comma-separated")
    parser.add_argument("--steps", default="10,19,20,60", help="products per Lanczos run, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    parser.add_argument("--products", type=int, default=10, help="bare products per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", help="a src directory whose lanczos runs in the same rounds, for comparison")
    parser.add_argument("--runs", default=";".join(label for label, _ in CONFIGS),
                        help="which configurations, labels separated by ';' (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    print(f"# `python benchmarks/krylov.py {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.threads} torch threads, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at the "
          f"start; median of {args.repeats} interleaved rounds.\n")
    print("| P | run | products | ms per product (in the run) | Lanczos ms per product | bookkeeping ms per step | "
          "ratio | vs bare |")
    print("|---|---|---|---|---|---|---|---|")
    if args.baseline:
        LANCZOS[f"baseline ({args.baseline}): "] = load_baseline(args.baseline)
    chosen = {r.strip() for r in args.runs.split(";")}
    CONFIGS[:] = [(label, kw) for label, kw in CONFIGS if label in chosen]
    for size in args.sizes.split(","):
        for row in measure(float(size), steps, args.repeats, args.products):
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
