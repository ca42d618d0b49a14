"""Peak memory of one CurvatureMonitor estimate relative to one training step (CPU), no growth over a run, and the
memory of ``lanczos`` against the number of parameters.

    python benchmarks/memory.py [--hidden 1024] [--batch 256]
    python benchmarks/memory.py --lanczos [--sizes 1e5,1e6,1e7] [--max-iter 200]

Each measurement runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_`` at 1 MiB, so that a freed vector goes back
to the system at once and the peak counts live tensors rather than the allocator's cache: the inputs are built, the
resident set size (RSS) is read, the peak is reset (``/proc/self/clear_refs``), the operation runs once and the peak
RSS (``VmHWM``) is read; the difference is the peak extra memory of the operation. Training step: forward, backward,
optimizer step. Estimate: one ``CurvatureMonitor.estimate`` at the callback's defaults. The last line trains the demo's
64-64 MLP for 2,000 steps with an estimate every 10 steps and reports the RSS at step 200 and step 2,000.

``--lanczos``: ``lanczos(op, k=1, max_iter, tol=1e-6)`` on a float32 diagonal operator with evenly spaced eigenvalues
(it does not converge, so every run spends ``max_iter`` products), for each ``P``; the extra memory is also given in
vectors of ``P`` floats, whose count should not grow with ``P`` (nor with ``max_iter``). The ``max_basis=max_iter``
row keeps every vector, as the unrestarted Lanczos did.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB


def _reset_peak() -> None:
    """Start the peak RSS (``VmHWM``) again from the current RSS (Linux >= 4.0; else the peak since exec stands)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so a child would report its parent's peak
    return _status_mb("VmHWM")


def _lanczos_child(size: float, max_iter: int, unbounded: bool) -> dict:
    import torch

    from lightning_curvature import lanczos

    torch.set_num_threads(2)

    class Diagonal:
        def __init__(self, d: torch.Tensor) -> None:
            self.d, self.shape, self.dtype, self.device = d, (d.numel(), d.numel()), d.dtype, d.device

        def matvec(self, v: torch.Tensor) -> torch.Tensor:
            return self.d * v

    P = int(size)
    small = Diagonal(torch.linspace(0, 1, 1000))
    lanczos(small, k=1, max_iter=40, tol=1e-6, generator=torch.Generator().manual_seed(0))  # warm-up
    op = Diagonal(torch.linspace(0, 1, P))
    kwargs = {"max_basis": max_iter + 2} if unbounded else {}
    base = _rss_mb()
    _reset_peak()
    res = lanczos(op, k=1, max_iter=max_iter, tol=1e-6, generator=torch.Generator().manual_seed(0), **kwargs)
    extra = _peak_mb() - base
    return {"params": P, "extra_mb": extra, "vectors": extra * 2**20 / (4 * P), "products": res.num_matvecs}


def _child(what: str, hidden: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from lightning_curvature import CurvatureMonitor
    from lightning_curvature.demo import MLPClassifier

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MLPClassifier(hidden=(hidden, hidden), lr=0.1)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = sum(p.numel() for p in model.parameters())
    # warm up the allocator and kernels with one step of each kind, then measure from a settled baseline
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    if what == "growth":
        import lightning.pytorch as pl
        from torch.utils.data import DataLoader, TensorDataset

        rss = {}

        class Probe(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step in (200, 2000):
                    rss[trainer.global_step] = _rss_mb()

        data = DataLoader(TensorDataset(torch.randn(2048, 64), torch.randint(0, 10, (2048,))), batch_size=batch,
                          shuffle=True)
        trainer = pl.Trainer(max_steps=2000, callbacks=[CurvatureMonitor(every_n_train_steps=10), Probe()],
                             logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             enable_model_summary=False, accelerator="cpu")
        trainer.fit(model, data)
        return {"params": params, "rss_200": rss[200], "rss_2000": rss[2000]}
    base = _rss_mb()
    _reset_peak()
    if what == "step":
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    else:
        CurvatureMonitor().estimate(model, [((x, y), 0)], optimizer=opt)
    return {"params": params, "extra_mb": _peak_mb() - base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--child", choices=["step", "estimate", "growth", "lanczos", "lanczos-unbounded"])
    parser.add_argument("--lanczos", action="store_true", help="lanczos memory against P instead")
    parser.add_argument("--sizes", default="1e5,1e6,1e7", help="--lanczos: parameter counts, comma-separated")
    parser.add_argument("--max-iter", type=int, default=200, help="--lanczos: products per run")
    parser.add_argument("--size", type=float, default=1e5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("lanczos", "lanczos-unbounded"):
        print(json.dumps(_lanczos_child(args.size, args.max_iter, args.child == "lanczos-unbounded")))
        return
    if args.child:
        print(json.dumps(_child(args.child, args.hidden, args.batch)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    if args.lanczos:
        print(f"lanczos(k=1, max_iter={args.max_iter}, tol=1e-6) on a float32 diagonal operator that does not "
              f"converge, CPU\n")
        print("| P | basis | products | peak extra memory (MB) | in vectors of P floats |")
        print("|---|---|---|---|---|")
        for size in args.sizes.split(","):
            for child, label in (("lanczos", "max_basis default (20)"),
                                 ("lanczos-unbounded", "max_basis = max_iter (every vector kept)")):
                if child == "lanczos-unbounded" and float(size) * 4 * args.max_iter > 4 * 2**30:
                    print(f"| {float(size):,.0f} | {label} | | skipped (over 4 GB) | |")
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", child, "--size", size, "--max-iter",
                                      str(args.max_iter)], capture_output=True, text=True, env=env)
                if out.returncode != 0:  # e.g. an older lanczos without max_basis
                    print(f"| {float(size):,.0f} | {label} | | failed: {out.stderr.strip().splitlines()[-1][:60]} | |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"| {r['params']:,} | {label} | {r['products']} | {r['extra_mb']:.1f} | {r['vectors']:.1f} |",
                      flush=True)
        return

    def run(what: str, hidden: int = args.hidden) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", what, "--hidden", str(hidden), "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    step, est = run("step"), run("estimate")
    print(f"MLP 64-{args.hidden}-{args.hidden}-10 ({step['params']:,} parameters), batch {args.batch}, CPU\n")
    print("| operation | peak extra memory (MB) | ratio to a training step |")
    print("|---|---|---|")
    print(f"| training step (forward, backward, SGD step) | {step['extra_mb']:.1f} | 1.00 |")
    ratio = est["extra_mb"] / step["extra_mb"]
    print(f"| CurvatureMonitor estimate at defaults | {est['extra_mb']:.1f} | {ratio:.2f} |")
    growth = run("growth", hidden=64)
    print(f"\nRSS over 2,000 training steps of the 64-64 MLP ({growth['params']:,} parameters) with an estimate every "
          f"10 steps: {growth['rss_200']:.1f} MB at step 200, "
          f"{growth['rss_2000']:.1f} MB at step 2,000 ({growth['rss_2000'] - growth['rss_200']:+.1f} MB).")


if __name__ == "__main__":
    main()
