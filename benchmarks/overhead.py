"""Training-time overhead of ``CurvatureMonitor`` on compute-bound models (CPU), with and without a cadence budget.

For every model: ``trainer.fit`` on synthetic data without the callback, with ``CurvatureMonitor()`` at its defaults
(the cadence of the ``max_overhead=0.05`` budget, :class:`~lightning_curvature.budget.CadenceBudget`; another share
with ``--max-overhead``) and with ``CurvatureMonitor(every_n_train_steps=100)`` (the same estimates at a fixed
cadence). Runs are interleaved (round robin, the order rotating each round) and repeated; the realised overhead is the
median over rounds of ``(time with) / (time without) - 1``, the times being the training loop only
(``on_train_start`` to ``on_train_end``: no Trainer construction, no setup).

``--long K`` adds, per model, interleaved pairs of runs (without, at the defaults) of about K steady gaps of the
budget (calibrated from a short run at ``every_n_train_steps=100``), long enough for the budget to make several
estimates.

Also per model: the parameter count P, one gradient (forward + backward of the training loss, outside Lightning,
median of 10), and the anatomy of an estimate at the defaults, from the ``every_n_train_steps=100`` runs (the second
and later estimates: warm-started; the first, cold one, apart): seconds, gradient units and products of the top
eigenvalue (Lanczos), the trace (deflated Hutchinson), the curvature along the gradient and the last update, the
``eos`` ratio, and the rest (building the operator: the loss and its first-order graph, isolation, logging).

The anatomy wraps the measurement plan's methods on the callback instance (benchmark-only instrumentation; it
changes nothing in the library).

Usage::

    python benchmarks/overhead.py                         # all models (about 40 min on 2 cores)
    python benchmarks/overhead.py --only mlp-1e5,cnn-1e5  # some of them
    python benchmarks/overhead.py --seconds 10 --repeats 2
    python benchmarks/overhead.py --threads 2             # torch and BLAS threads (default 2)
    python benchmarks/overhead.py --no-main --long 3      # only the budget over runs of 3 steady gaps (long)

stdout carries the markdown (``> benchmarks/overhead_results.md``); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import blas_threads, log, machine_info, md_table  # noqa: E402

from lightning_curvature import CurvatureMonitor, HessianOperator, module_loss_fn  # noqa: E402
from lightning_curvature.budget import CadenceBudget  # noqa: E402

PARTS = ("eigenvalues", "trace", "grad_curvature", "eos", "rest")


# ---------------------------------------------------------------------------------------------------- models
class Classifier(pl.LightningModule):
    """Cross-entropy classifier trained with SGD (momentum 0.9)."""

    def __init__(self, net: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def mlp(widths: list[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn(channels: list[int], hidden: int | None = None) -> nn.Module:
    """3x32x32 images: a 3x3 conv at full resolution, then stride-2 3x3 convs, flatten, linear layers."""
    layers: list[nn.Module] = []
    size = 32
    for i, (a, b) in enumerate(zip([3, *channels], channels)):
        stride = 1 if i == 0 else 2
        layers += [nn.Conv2d(a, b, 3, padding=1, stride=stride), nn.ReLU()]
        size //= stride
    layers.append(nn.Flatten())
    features = channels[-1] * size * size
    if hidden:
        layers += [nn.Linear(features, hidden), nn.ReLU()]
        features = hidden
    layers.append(nn.Linear(features, 10))
    return nn.Sequential(*layers)


def transformer_lm(vocab: int, d: int, heads: int, ffn: int, layers: int) -> pl.LightningModule:
    """Lightning's demo ``LightningTransformer`` (an ``nn.Transformer``, SGD lr 0.1), resized; dropout as shipped.

    Its ``prepare_data`` would download WikiText-2: the data here are synthetic tokens.
    """
    from lightning.pytorch.demos import LightningTransformer, Transformer

    class SyntheticLM(LightningTransformer):
        def prepare_data(self) -> None:
            pass

    module = SyntheticLM(vocab_size=vocab)
    module.model = Transformer(vocab_size=vocab, ninp=d, nhead=heads, nhid=ffn, nlayers=layers)
    return module


def classification_data(shape: tuple[int, ...], n: int, seed: int) -> TensorDataset:
    """Gaussian inputs labelled by a random linear teacher (learnable, so the curvature moves)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(math.prod(shape), 10, generator=g)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    return TensorDataset(x, y)


def token_data(vocab: int, seq: int, n: int, seed: int) -> TensorDataset:
    """Token sequences from a random sparse Markov chain; the target is the input shifted by one."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    tokens = torch.empty(n, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(seq):
        pick = torch.randint(0, 4, (n,), generator=g)
        tokens[:, t + 1] = successors[tokens[:, t], pick]
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


@dataclass
class Spec:
    name: str
    build: Callable[[], pl.LightningModule]
    data: Callable[[], TensorDataset]
    batch: int
    description: str


def _classifier(net: Callable[[], nn.Module], lr: float) -> Callable[[], pl.LightningModule]:
    return lambda: Classifier(net(), lr)


SPECS = {
    s.name: s for s in [
        Spec("mlp-1e5", _classifier(lambda: mlp([128, 256, 256, 10]), 0.05),
             lambda: classification_data((128,), 256 * 32, 0), 256, "MLP 128-256-256-10, ReLU, batch 256"),
        Spec("mlp-1e6", _classifier(lambda: mlp([512, 1024, 1024, 10]), 0.05),
             lambda: classification_data((512,), 256 * 32, 0), 256,
             "MLP 512-1024-1024-10, ReLU, batch 256 (the issue's model)"),
        Spec("mlp-1e7", _classifier(lambda: mlp([1024, 2048, 2048, 2048, 10]), 0.02),
             lambda: classification_data((1024,), 64 * 32, 0), 64, "MLP 1024-2048-2048-2048-10, ReLU, batch 64"),
        Spec("cnn-1e5", _classifier(lambda: cnn([16, 32, 64, 128]), 0.02),
             lambda: classification_data((3, 32, 32), 128 * 32, 0), 128,
             "CNN 3x32x32, convs 16-32-64-128 (stride 2 after the first), linear, batch 128"),
        Spec("cnn-1e6", _classifier(lambda: cnn([32, 64, 128, 256], hidden=128), 0.02),
             lambda: classification_data((3, 32, 32), 64 * 32, 0), 64,
             "CNN 3x32x32, convs 32-64-128-256, linear 4096-128-10, batch 64"),
        Spec("cnn-1e7", _classifier(lambda: cnn([64, 128, 256, 512, 1024], hidden=1024), 0.01),
             lambda: classification_data((3, 32, 32), 16 * 32, 0), 16,
             "CNN 3x32x32, convs 64-128-256-512-1024, linear 4096-1024-10, batch 16"),
        Spec("transformer", lambda: transformer_lm(1000, 128, 4, 512, 2), lambda: token_data(1000, 32, 16 * 32, 0),
             16, "Lightning's demo `LightningTransformer` (`nn.Transformer` encoder-decoder, dropout 0.2, SGD lr 0.1) "
             "at d 128, 4 heads, FFN 512, 2+2 layers, vocab 1000, batch 16 sequences of 32 tokens"),
    ]
}


# ---------------------------------------------------------------------------------------------------- callbacks
def profile(cb: CurvatureMonitor) -> list[dict[str, float]]:
    """Time the plan's parts on this callback instance: one dict per estimate, ``{part: seconds, part + "#": products,
    "total": seconds, "total#": products}``; nested calls count in the outermost part."""
    records: list[dict[str, float]] = []
    plan = cb.plan
    depth = [0]

    def wrap(method: Callable[..., Any], part: Callable[[tuple[Any, ...]], str]) -> Callable[..., Any]:
        @functools.wraps(method)
        def timed(op: Any, *args: Any, **kwargs: Any) -> Any:
            depth[0] += 1
            n0, t0 = op.num_matvecs, time.perf_counter()
            try:
                return method(op, *args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0 and records:
                    name = part(args)
                    records[-1][name] = records[-1].get(name, 0.0) + time.perf_counter() - t0
                    records[-1][name + "#"] = records[-1].get(name + "#", 0.0) + op.num_matvecs - n0
        return timed

    plan._eigs = wrap(plan._eigs, lambda a: "eigenvalues" if a[0] == "top" else "eos")  # type: ignore[method-assign]
    plan._trace = wrap(plan._trace, lambda a: "trace")  # type: ignore[method-assign]
    plan._directional = wrap(plan._directional, lambda a: "grad_curvature")  # type: ignore[method-assign]
    plan._stability = wrap(plan._stability, lambda a: "eos")  # type: ignore[method-assign]
    estimate = cb.estimate

    @functools.wraps(estimate)
    def estimate_and_record(pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> dict[str, float]:
        records.append({"step": pl_module.trainer.global_step})
        out = estimate(pl_module, *args, **kwargs)
        if out:
            records[-1]["total"] = out["seconds"]
            records[-1]["total#"] = out["num_hvps"]
        else:
            records.pop()
        return out

    cb.estimate = estimate_and_record  # type: ignore[method-assign]
    return records


class Stopwatch(Callback):
    """Wall time of the training loop: from ``on_train_start`` to ``on_train_end``."""

    def __init__(self) -> None:
        self.t0 = self.seconds = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    seconds: float
    estimates: list[dict[str, float]] = field(default_factory=list)
    budget: CadenceBudget | None = None


def fit(spec: Spec, config: str, steps: int, max_overhead: float) -> Run:
    pl.seed_everything(0, verbose=False)
    module = spec.build()
    loader = DataLoader(spec.data(), batch_size=spec.batch, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(0))
    watch = Stopwatch()
    cb: CurvatureMonitor | None = None
    if config == "every100":
        cb = CurvatureMonitor(every_n_train_steps=100)
    elif config == "defaults":  # the cadence of the max_overhead budget (5% unless --max-overhead says otherwise)
        cb = CurvatureMonitor() if max_overhead == 0.05 else CurvatureMonitor(max_overhead=max_overhead)
    records = profile(cb) if cb is not None else []
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[watch, *([cb] if cb else [])], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        accelerator="cpu", devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    run = Run(watch.seconds, records)
    if config == "defaults" and cb is not None:
        run.budget = cb.budget
    return run


class Gradient:
    """Times one forward + backward of the training loss on one batch, outside Lightning (median of a few)."""

    def __init__(self, spec: Spec) -> None:
        pl.seed_everything(0, verbose=False)
        self.module = spec.build()
        self.batch = next(iter(DataLoader(spec.data(), batch_size=spec.batch)))
        self.P = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        self.seconds(repeats=2)  # warm-up

    def seconds(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.module.training_step(self.batch, 0).backward()
            times.append(time.perf_counter() - t0)
            self.module.zero_grad(set_to_none=True)
        return statistics.median(times)

    def hvp_seconds(self, repeats: int = 5) -> float:
        """One Hessian-vector product alone (double backward through a graph built beforehand), median."""
        loss_fn, theta = module_loss_fn(self.module, lambda m: m.training_step(self.batch, 0))
        op = HessianOperator(loss_fn, theta)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(0))
        op.matvec(v)  # builds the first-order graph
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op.matvec(v)
            times.append(time.perf_counter() - t0)
        op.release()
        return statistics.median(times)


def measure(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds; in each, the gradient's time first (for the units), then every configuration."""
    gradient = Gradient(spec)
    log(f"{spec.name}: P = {gradient.P:,}, gradient {gradient.seconds() * 1e3:.1f} ms")
    probe = fit(spec, "without", 30, args.max_overhead)
    step = probe.seconds / 30
    steps = int(min(max(args.seconds / step, args.min_steps), args.max_steps))
    steps = max(100, steps // 100 * 100)
    log(f"{spec.name}: ~{step * 1e3:.1f} ms per step: {steps} steps per run")
    configs = ("without", "every100", "defaults")
    runs: dict[str, list[Run]] = {c: [] for c in configs}
    grads, hvps = [], []
    loads = [os.getloadavg()[0]]
    fit(spec, "every100", 101, args.max_overhead)  # warm-up: first calls into autograd's double backward
    for r in range(args.repeats):
        grads.append(gradient.seconds())
        hvps.append(gradient.hvp_seconds() / grads[-1])
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for c in order:
            run = fit(spec, c, steps, args.max_overhead)
            runs[c].append(run)
            log(f"{spec.name} round {r + 1}: {c} {run.seconds:.1f} s, {len(run.estimates)} estimates")
        loads.append(os.getloadavg()[0])
    return {"spec": spec, "P": gradient.P, "grads": grads, "hvps": hvps, "steps": steps, "runs": runs, "loads": loads}


def measure_long(spec: Spec, args: argparse.Namespace) -> dict[str, Any]:
    """The budget over runs of ``--long`` steady gaps: interleaved pairs (without, budget).

    The steady gap is calibrated first: a warm estimate's seconds (the defaults, ``--min-steps`` steps) over
    ``max_overhead`` x the step time without the callback.
    """
    f = args.max_overhead
    fit(spec, "every100", 101, f)  # warm-up
    base = fit(spec, "without", args.min_steps, f)
    calib = fit(spec, "every100", args.min_steps, f)
    warm = statistics.median(e["total"] for e in calib.estimates[1:])
    step = base.seconds / args.min_steps
    gap = warm / (f * step)
    steps = min(int(math.ceil(args.long * gap / 100) * 100), args.long_max_steps)
    log(f"{spec.name} (long): warm estimate {warm:.2f} s, step {step * 1e3:.1f} ms, steady gap ~{gap:.0f} steps: "
        f"{steps} steps per run")
    runs: dict[str, list[Run]] = {"without": [], "defaults": []}
    loads = [os.getloadavg()[0]]
    for r in range(args.long_repeats):
        for c in (("without", "defaults") if r % 2 == 0 else ("defaults", "without")):
            run = fit(spec, c, steps, f)
            runs[c].append(run)
            log(f"{spec.name} long round {r + 1}: {c} {run.seconds:.1f} s, estimates at "
                f"{[int(e['step']) for e in run.estimates]}")
        loads.append(os.getloadavg()[0])
    return {"spec": spec, "steps": steps, "gap": gap, "runs": runs, "loads": loads}


# ---------------------------------------------------------------------------------------------------- report
def wall_overhead(result: dict[str, Any], config: str) -> float:
    """Median over rounds of (loop time with) / (without) - 1."""
    ratios = [w.seconds / b.seconds for w, b in zip(result["runs"][config], result["runs"]["without"])]
    return statistics.median(ratios) - 1


def own_overhead(result: dict[str, Any], config: str) -> float:
    """Median over runs of (the estimates' seconds) / (the loop's other seconds), from inside each run."""
    values = []
    for run in result["runs"][config]:
        spent = sum(e["total"] for e in run.estimates)
        values.append(spent / (run.seconds - spent))
    return statistics.median(values)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def anatomy(result: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Per part: median gradient units and products of the warm estimates (the second and later) of the default runs;
    "cold": the first estimate's; "total": the warm estimate's."""
    warm: list[tuple[dict[str, float], float]] = []
    cold: list[tuple[dict[str, float], float]] = []
    for run, grad in zip(result["runs"]["every100"], result["grads"]):
        warm += [(e, grad) for e in run.estimates[1:]]
        cold += [(e, grad) for e in run.estimates[:1]]
    out = {}
    for p in PARTS:
        if p == "rest":
            units = [(e["total"] - sum(e.get(q, 0.0) for q in PARTS[:-1])) / g for e, g in warm]
            products = [e["total#"] - sum(e.get(q + "#", 0.0) for q in PARTS[:-1]) for e, _ in warm]
        else:
            units = [e.get(p, 0.0) / g for e, g in warm]
            products = [e.get(p + "#", 0.0) for e, _ in warm]
        out[p] = (statistics.median(units), statistics.median(products))
    out["total"] = (statistics.median(e["total"] / g for e, g in warm), statistics.median(e["total#"] for e, _ in warm))
    out["cold"] = (statistics.median(e["total"] / g for e, g in cold), statistics.median(e["total#"] for e, _ in cold))
    product_parts = ("eigenvalues", "trace", "grad_curvature")
    per = [sum(e.get(q, 0.0) for q in product_parts) / g / max(1.0, sum(e.get(q + "#", 0.0) for q in product_parts))
           for e, g in warm]
    out["per_product"] = (statistics.median(per), 1.0)
    return out


def report_long(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    for res in results:
        steps = [[int(e["step"]) for e in run.estimates] for run in res["runs"]["defaults"]]
        loads = res["loads"]
        rows.append([
            res["spec"].name, f"{res['gap']:,.0f}", res["steps"], "; ".join(", ".join(map(str, s)) for s in steps),
            f"**{pct(wall_overhead(res, 'defaults'))}**", pct(own_overhead(res, "defaults")),
            f"{min(loads):.1f}-{max(loads):.1f}",
        ])
    header = ["model", "calibrated steady gap, steps", "steps per run", "budget's estimates at (per run)",
              "overhead, wall", "overhead, own", "load average"]
    return "\n".join([
        f"## The budget ({pct(args.max_overhead)}) over runs of about {args.long:g} steady gaps",
        "",
        "Steady gap: a warm estimate's seconds (from a `CurvatureMonitor(every_n_train_steps=100)` run) over "
        f"{args.max_overhead} x the step time without the callback. {args.long_repeats} interleaved pair(s) of runs "
        "(without, `CurvatureMonitor()`) of that many gaps; overheads as in the first table.",
        "",
        md_table(header, rows),
    ])


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    f = args.max_overhead
    rows, anat = [], []
    for res in results:
        spec, grad = res["spec"], statistics.median(res["grads"])
        a = anatomy(res)
        step = statistics.median(b.seconds / res["steps"] / g for b, g in zip(res["runs"]["without"], res["grads"]))
        last = res["runs"]["defaults"][-1].budget
        assert last is not None
        gap = (last.cost or float("nan")) / (f * (last.step_seconds or float("nan")))
        n_default = statistics.median(len(r.estimates) for r in res["runs"]["defaults"])
        n_every = statistics.median(len(r.estimates) for r in res["runs"]["every100"])
        loads = res["loads"]
        rows.append([
            spec.name, f"{res['P']:,}", f"{grad * 1e3:.1f}", f"{step:.2f}", res["steps"],
            f"{a['cold'][0]:.0f} ({a['cold'][1]:.0f})", f"{a['total'][0]:.0f} ({a['total'][1]:.0f})",
            f"{statistics.median(res['hvps']):.2f} / {a['per_product'][0]:.2f}",
            f"**{pct(wall_overhead(res, 'defaults'))}** / {pct(own_overhead(res, 'defaults'))} ({n_default:g})",
            f"{pct(wall_overhead(res, 'every100'))} / {pct(own_overhead(res, 'every100'))} ({n_every:g})",
            f"{gap:,.0f}", f"{min(loads):.1f}-{max(loads):.1f}",
        ])
        anat.append([spec.name, *[f"{a[p][0]:.1f} ({a[p][1]:.0f})" for p in (*PARTS, "total")]])
    header = ["model", "P", "gradient, ms", "train step, units", "steps per run", "cold estimate, units (HVPs)",
              "warm estimate, units (HVPs)", "HVP alone / in the estimate, units",
              f"overhead at the defaults (budget {pct(f)}): wall / own (estimates)",
              "overhead at `every_n_train_steps=100`: wall / own (estimates)", "budget's steady gap, steps",
              "load average"]
    anat_header = ["model", *[f"{p}, units (HVPs)" for p in PARTS], "total, units (HVPs)"]
    return "\n".join([
        "## Realised overhead",
        "",
        "Units: one gradient (forward + backward of the training loss, outside Lightning) of the same model and "
        "batch, timed in the same round. Overhead *wall*: median over the interleaved rounds of (training-loop time "
        "with the callback) / (without) - 1. Overhead *own*: the estimates' own seconds over the rest of the same "
        "run's loop (insensitive to load changes between runs; leaves out the callback's per-step hooks and the "
        "weight snapshot for `update_curvature`). HVP alone: one double-backward product through a graph built "
        "beforehand; in the estimate: the seconds of the parts that make products (eigenvalues, trace, "
        "grad_curvature) over their products, bookkeeping (probes, orthogonalisation, Ritz vectors) included. "
        "Defaults: `CurvatureMonitor()` (metrics trace, eigenvalues, eos, grad_curvature; the cadence of the "
        f"`max_overhead={f}` budget). `every_n_train_steps=100`: the same estimates at a fixed cadence. The budget "
        "charges the step-0 estimate too, so a run shorter than the training that pays for it and the second one "
        "(about three steady gaps) holds the step-0 estimate only, and its overhead is that (cold) estimate over the "
        "run. Steady gap: the budget's predicted cost over "
        f"{f} x its measured step time, at the end of the last run. Estimates per run in parentheses; the load "
        "average is sampled before and after each round.",
        "",
        md_table(header, rows),
        "",
        "## Anatomy of a warm estimate at the defaults",
        "",
        "Median over the second and later estimates of the `every_n_train_steps=100` runs, in gradient units "
        "(products in parentheses). eigenvalues: Lanczos top-1, warm-started, tol 1e-3; trace: deflated Hutchinson, "
        "rtol 0.05, "
        "at most 20 probes; grad_curvature: gᵀHg/‖g‖² and uᵀHu/‖u‖²; eos: the SGD threshold (no product); rest: "
        "building the operator (the loss and its first-order graph), isolation, logging.",
        "",
        md_table(anat_header, anat),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SPECS), help=f"comma list of: {', '.join(SPECS)}")
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per run without the callback")
    parser.add_argument("--min-steps", type=int, default=400)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--max-overhead", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", type=float, default=0.0,
                        help="also run the budget over runs of this many steady gaps (0: not)")
    parser.add_argument("--long-repeats", type=int, default=1, help="interleaved pairs of long runs")
    parser.add_argument("--long-max-steps", type=int, default=20000)
    parser.add_argument("--no-main", action="store_true", help="only the long runs")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in SPECS]
    if bad:
        parser.error(f"unknown models {bad}; choose from {list(SPECS)}")
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    start = time.perf_counter()
    with blas_threads(args.threads):
        print("# CurvatureMonitor: training-time overhead\n")
        info = machine_info(args).replace("python benchmarks/run.py", "python benchmarks/overhead.py")
        print(info.replace("- versions: ", "- versions (peers of run.py not used here): "))
        print(f"- models: {'; '.join(f'`{n}`: {SPECS[n].description}' for n in names)}")
        if not args.no_main:
            print(f"- {args.repeats} interleaved rounds per model, about {args.seconds:g} s of training per run "
                  f"without the callback ({args.min_steps} to {args.max_steps} steps)")
        if args.long > 0:
            print(f"- long runs: {args.long_repeats} interleaved pair(s) of about {args.long:g} steady gaps each "
                  f"(at most {args.long_max_steps} steps)")
        sys.stdout.flush()
        results, long = [], []
        for name in names:
            if not args.no_main:
                results.append(measure(SPECS[name], args))
            if args.long > 0:
                long.append(measure_long(SPECS[name], args))
        if results:
            print("\n" + report(results, args))
        if long:
            print("\n" + report_long(long, args))
        print(f"\nTotal {time.perf_counter() - start:.0f} s; load average at the end: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
