"""The finite-difference backend where double backward cannot run: compiled modules and fused attention (CPU).

Three tables, markdown on stdout (progress on stderr):

``accuracy``: the largest relative error over 10 probes (6 Gaussian, 4 Rademacher) of finite-difference products
against exact float64 products, with the kink check on (default) and off: the test problems of
``tests/problems.py`` (``FD_PROBLEMS``) in float32 and float64, and three larger float32 models.

``compiled``: a ``torch.compile``d model (inductor). Time of one Hessian-vector product by
:class:`~lightning_curvature.finite_difference.FiniteDifferenceOperator` through the compiled module, against the exact
double-backward :class:`~lightning_curvature.HessianOperator` on the original module (``_orig_mod``: the compiled one
cannot be differentiated twice) and the finite-difference operator on the original module, all in units of one
eager gradient measured in the same run (interleaved round-robin repeats; median and fastest times, the ratio of
the fastest ones). Also: dynamo's compiled graphs and graph breaks before and after the products and after one more
training step, and each product's relative error against an exact float64 product.

``attention``: a 2-layer causal transformer language model using ``F.scaled_dot_product_attention``, one sequence of
length L. Peak memory above the settled baseline (resident set size: VmHWM reset through /proc/self/clear_refs; one
fresh subprocess per measurement) and time of one product: the finite-difference operator with PyTorch's default SDPA
kernel (the fused flash-attention CPU kernel, which has no double backward) against the exact double-backward operator
(which must use the math kernel and keeps its first-order graph for the whole estimate). Times of the first product
(FD: with the gradient at θ for the kink check; exact: building the graph + one product) and the fastest further
product; a gradient's time is the fastest of three.

Usage::

    python benchmarks/first_order.py                          # all three tables (about 5 minutes on 2 cores)
    python benchmarks/first_order.py --only compiled
    python benchmarks/first_order.py --only attention --seq 256,1024,4096
    python benchmarks/first_order.py --threads 2              # torch threads (default 1: the machine is shared)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import interleaved, log, md_table  # noqa: E402

from lightning_curvature import HessianOperator, module_loss_fn  # noqa: E402
from lightning_curvature.finite_difference import FiniteDifferenceOperator, race_backends  # noqa: E402

RACES = 5  # runs of backend='auto''s comparison per compiled model


# ---------------------------------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(h.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Token embedding, ``layers`` pre-norm blocks (causal SDPA, GELU MLP), final norm, linear head."""

    def __init__(self, vocab: int = 128, d: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.ln(self.blocks(self.emb(tokens))))


def lm_case(batch: int, seq: int, vocab: int = 128) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyLM(vocab)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    return model, lambda m: F.cross_entropy(m(x).reshape(-1, vocab), y.reshape(-1))


def mlp_case(batch: int = 256, act: type[nn.Module] = nn.Tanh) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 256), act(), nn.Linear(256, 256), act(), nn.Linear(256, 10))
    x, y = torch.randn(batch, 64, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return model, lambda m: F.cross_entropy(m(x.to(next(m.parameters()).dtype)), y)  # float64 copies too


def train_a_little(model: nn.Module, closure: Callable[[nn.Module], Tensor], steps: int = 30) -> None:
    """A few SGD steps, so the Hessian is not the one at initialisation."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        closure(model).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def gradient_fn(model: nn.Module, closure: Callable[[nn.Module], Tensor]) -> Callable[[], None]:
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        closure(model).backward()
        for p in model.parameters():
            p.grad = None

    return step


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------- accuracy
def probes(n: int, seed: int = 0) -> Tensor:
    """6 Gaussian and 4 Rademacher probes (float64), as in tests/test_finite_difference.py."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return torch.cat([normal, torch.randint(0, 2, (n, 4), generator=g).double() * 2 - 1], dim=1)


def accuracy_rows(name: str, model: nn.Module, closure: Callable[[nn.Module], Tensor],
                  dtype: torch.dtype = torch.float32) -> list[list]:
    """Max relative error over 10 probes of FD products (kink check on / off) against exact float64 products."""
    model = model.to(dtype)
    m64 = copy.deepcopy(model).double()
    loss64, theta64 = module_loss_fn(m64, closure)
    exact = HessianOperator(loss64, theta64, backend="double-backward")
    V = probes(exact.shape[0])
    HV = exact.matmat(V)
    cells = []
    for tol in (1e-2, None):
        op = FiniteDifferenceOperator(model, closure, asymmetry_tol=tol)
        err = float(((op.matmat(V.to(dtype)).double() - HV).norm(dim=0) / HV.norm(dim=0)).max())
        cells.append((err, op))
    (on, op), (off, _) = cells
    return [[name, exact.shape[0], str(dtype).replace("torch.", ""), f"**{on:.1e}**", f"{off:.1e}",
             f"{op.num_shrinks} / {op.num_matvecs}", f"{op.max_asymmetry:.1e}"]]


def accuracy_table() -> str:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from problems import FD_PROBLEMS

    rows = []
    for p in FD_PROBLEMS:  # the test problems, in float32 and float64 (a closure casts the inputs to the model)
        for dtype in (torch.float32, torch.float64):
            x = p.inputs.to(dtype) if p.inputs.is_floating_point() else p.inputs
            y = p.targets.to(dtype) if p.targets.is_floating_point() else p.targets

            def closure(m: nn.Module, x: Any = x, y: Any = y, p: Any = p) -> Tensor:
                dt = next(m.parameters()).dtype
                return p.criterion(m(x.to(dt)), y.to(dt) if y.is_floating_point() else y)

            rows += accuracy_rows(f"tests: {p.name}", copy.deepcopy(p.model), closure, dtype)
    for act in (nn.Tanh, nn.ReLU):
        model, closure = mlp_case(act=act)
        train_a_little(model, closure)
        rows += accuracy_rows(f"MLP 64-256-256-10 {act.__name__}, batch 256", model, closure)
    model, closure = lm_case(batch=2, seq=128)
    train_a_little(model, closure)
    rows += accuracy_rows("LM 2x(d=64, 4 heads, GELU), L=128, batch 2", model, closure)
    header = ["model", "P", "dtype", "max rel. error (kink check on, default)", "kink check off",
              "products retaken / products", "max asymmetry"]
    return md_table(header, rows)


# ---------------------------------------------------------------------------------------------------- compiled
def compiled_rows(name: str, model: nn.Module, closure: Callable[[nn.Module], Tensor], repeats: int) -> list[list]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    train_a_little(model, closure)
    cmodel = torch.compile(model)
    log(f"{name}: compiling (inductor)")
    t0 = time.perf_counter()
    gradient_fn(cmodel, closure)()
    compile_s = time.perf_counter() - t0

    def graphs() -> int:
        return int(counters["stats"]["unique_graphs"])

    before = graphs()
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(2))
    fd_c = FiniteDifferenceOperator(cmodel, closure, mode="train")
    fd_e = FiniteDifferenceOperator(model, closure, mode="train")
    loss_fn, theta = module_loss_fn(model, closure, mode="train")
    exact = HessianOperator(loss_fn, theta, backend="double-backward")
    # exact float64 reference product, for the error column
    m64 = copy.deepcopy(model).double()
    loss64, theta64 = module_loss_fn(m64, closure, mode="train")
    ref = HessianOperator(loss64, theta64, backend="double-backward").matvec(v.double())
    errors = {"fd_c": rel_err(fd_c.matvec(v), ref), "fd_e": rel_err(fd_e.matvec(v), ref),
              "exact": rel_err(exact.matvec(v), ref)}
    after_fd, fd_grads = graphs(), fd_c.num_gradients
    gradient_fn(cmodel, closure)()  # training goes on with the compiled module
    after_train = graphs()
    # the exact operator (backend "auto") on the compiled module: last, as it may compile graphs of its own
    lc, tc = module_loss_fn(cmodel, closure, mode="train")
    on_compiled = HessianOperator(lc, tc)
    try:
        errors["on_compiled"] = rel_err(on_compiled.matvec(v), ref)
        compiled_exact = f"works with backend {on_compiled.backend!r}"
    except Exception as err:  # noqa: BLE001 - report whatever it is
        compiled_exact = f"fails ({type(err).__name__})"
    compiled_exact += f", compiled graphs now {graphs()}"

    def scratch() -> None:
        op = HessianOperator(loss_fn, theta, backend="double-backward")
        op.matvec(v)
        op.release()

    fns = {
        "grad_e": gradient_fn(model, closure),
        "grad_c": gradient_fn(cmodel, closure),
        "fd_c": lambda: fd_c.matvec(v),
        "fd_e": lambda: fd_e.matvec(v),
        "exact": lambda: exact.matvec(v),
        "scratch": scratch,
    }
    if "on_compiled" in errors:
        fns["on_compiled"] = lambda: on_compiled.matvec(v)
    log(f"{name}: timing {len(fns)} candidates x {repeats}")
    t = interleaved(fns, repeats=repeats, warmup=2)
    # what backend="auto" decides on this compiled module in mode="train": race_backends, as the callback runs it
    races = [race_backends(exact, fd_c, generator=torch.Generator().manual_seed(i)) for i in range(RACES)]
    exact.release()
    after_timing, breaks = graphs(), sum(counters["graph_break"].values())
    g = t["grad_e"][1]

    def cell(key: str) -> str:  # median (min); the ratio of fastest times, the steadier one on a loaded machine
        return f"{t[key][0] * 1e3:.2f} ({t[key][1] * 1e3:.2f}) ms = **{t[key][1] / g:.2f}**"

    info = (f"compiled graphs: {before} after the first training step (compiled in {compile_s:.1f} s), {after_fd} "
            f"after {fd_grads} FD gradients through it, {after_train} after one more training step; the exact "
            f"operator on the compiled module {compiled_exact}; {after_timing} after all timings "
            f"({fd_c.num_gradients} FD gradients through the compiled module); graph breaks: {breaks}")
    return [
        [name, "gradient, eager", cell("grad_e"), "", ""],
        [name, "gradient, compiled", cell("grad_c"), "", ""],
        [name, "FD product through the compiled module", cell("fd_c"), f"{errors['fd_c']:.1e}", info],
        [name, "FD product, eager", cell("fd_e"), f"{errors['fd_e']:.1e}", ""],
        [name, "exact double backward on `_orig_mod`, graph reused", cell("exact"), f"{errors['exact']:.1e}", ""],
        [name, "exact double backward on `_orig_mod`, from scratch", cell("scratch"), "", ""],
    ] + ([[name, f"exact `{on_compiled.backend}` on the compiled module (auto's fallback)", cell("on_compiled"),
           f"{errors['on_compiled']:.1e}", ""]] if "on_compiled" in errors else []) + [
        [name, f"`backend='auto'`, `mode='train'`: `race_backends` ({RACES} runs)",
         f"FD / exact per product {statistics.median(r.first_order_seconds / r.exact_seconds for r in races):.2f}: "
         f"picks **{'finite differences' if sum(r.first_order_wins for r in races) > RACES / 2 else 'exact'}** "
         f"({sum(r.first_order_wins for r in races)}/{RACES} for FD)",
         f"{statistics.median(r.relative_difference for r in races):.1e} vs exact", ""]]


def compiled_table(repeats: int) -> str:
    rows = compiled_rows("MLP 64-256-256-10 tanh, batch 256", *mlp_case(), repeats=repeats)
    rows += compiled_rows("LM 2x(d=64, 4 heads), L=256, batch 4", *lm_case(batch=4, seq=256), repeats=repeats)
    return md_table(["model", "what", "median (min) time = min / min eager gradient", "rel. error vs float64",
                     "compilation"], rows)


# ---------------------------------------------------------------------------------------------------- attention
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) / 1024  # kB


def reset_peak() -> float:
    """Reset the peak resident set size (VmHWM) to the current one and return that, in MB (Linux).

    ``ru_maxrss`` cannot serve: it survives ``execve``, so a child started by a big parent reports the parent's peak.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_mb() -> float:
    return _status_mb("VmHWM")


def attention_worker(method: str, seq: int, products: int) -> dict[str, Any]:
    """One measurement in a fresh process: peak RSS above the settled baseline and times of ``products`` products."""
    model, closure = lm_case(batch=1, seq=seq)
    P = sum(p.numel() for p in model.parameters())
    v = torch.randn(P, generator=torch.Generator().manual_seed(2))
    step = gradient_fn(model, closure)
    step()  # warm up kernels and the allocator
    base = reset_peak()
    grad_s = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        grad_s = min(grad_s, time.perf_counter() - t0)
    grad_peak = peak_mb() - base
    base = reset_peak()
    if method == "fd":
        op: Any = FiniteDifferenceOperator(model, closure)
    else:
        loss_fn, theta = module_loss_fn(model, closure)
        op = HessianOperator(loss_fn, theta, backend="double-backward")
    times = []
    for _ in range(products):
        t0 = time.perf_counter()
        hv = op.matvec(v)
        times.append(time.perf_counter() - t0)
    op.release()
    return {"method": method, "seq": seq, "P": P, "extra_mb": peak_mb() - base, "grad_mb": grad_peak,
            "grad_s": grad_s, "first_s": times[0], "next_s": min(times[1:]), "norm": float(hv.norm())}


def run_worker(method: str, seq: int, threads: int, products: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([method, seq, products]),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def attention_table(seqs: list[int], threads: int, products: int) -> str:
    rows = []
    for seq in seqs:
        r = {}
        for method in ("fd", "exact"):
            log(f"attention: {method} at L={seq}")
            r[method] = run_worker(method, seq, threads, products)
        fd, ex = r["fd"], r["exact"]
        rows.append([
            seq,
            f"{fd['grad_mb']:.0f}",
            f"{fd['extra_mb']:.0f}",
            f"{ex['extra_mb']:.0f}",
            f"**{ex['extra_mb'] / max(fd['extra_mb'], 1e-9):.1f}x**",
            f"{fd['first_s']:.3f} / {fd['next_s']:.3f}",
            f"{ex['first_s']:.3f} / {ex['next_s']:.3f}",
            f"**{ex['first_s'] / fd['first_s']:.2f}x** / **{ex['next_s'] / fd['next_s']:.2f}x**",
            f"{fd['next_s'] / fd['grad_s']:.2f} / {ex['next_s'] / fd['grad_s']:.2f}",
        ])
    header = ["L", "gradient: peak MB", "FD: peak MB", "exact: peak MB", "exact / FD memory",
              "FD: first / next product, s", "exact: first / next product, s", "exact / FD time (first / next)",
              "next product in gradients (FD / exact)"]
    return md_table(header, rows)


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="accuracy,compiled,attention",
                        help="comma list of: accuracy, compiled, attention")
    parser.add_argument("--seq", default="256,512,1024,2048,4096", help="sequence lengths of the attention table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21, help="interleaved repeats of the compiled table")
    parser.add_argument("--products", type=int, default=4, help="products per attention measurement (>= 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        method, seq, products = json.loads(args.worker)
        print(json.dumps(attention_worker(method, seq, products)))
        return
    only = args.only.split(",")
    load = os.getloadavg()[0]
    print(f"# First-order (finite-difference) backend: compiled modules and fused attention\n\n"
          f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} torch thread(s), torch {torch.__version__}, load average {load:.2f} at the start; "
          f"`python benchmarks/first_order.py {' '.join(sys.argv[1:])}`\n")
    if "accuracy" in only:
        print("## Accuracy: finite-difference products against exact float64 products (10 probes)\n")
        print(accuracy_table() + "\n")
    if "compiled" in only:
        print("## Compiled module (inductor): one product, in eager gradients\n")
        print(compiled_table(args.repeats) + "\n")
    if "attention" in only:
        print("## Fused attention: 2-layer causal LM (d=64, 4 heads, GELU), batch 1, one process per cell\n")
        print(attention_table([int(s) for s in args.seq.split(",")], args.threads, args.products) + "\n")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
