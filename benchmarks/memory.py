"""Peak memory of one CurvatureMonitor estimate relative to one training step (CPU), and no growth over a run.

    python benchmarks/memory.py [--hidden 1024] [--batch 256]

Each measurement runs in a fresh subprocess: the model, a batch and the optimizer are built, the resident set size
(RSS) is read, then the operation runs once and the peak RSS (``ru_maxrss``) is read; the difference is the peak
extra memory of the operation. Training step: forward, backward, optimizer step. Estimate: one
``CurvatureMonitor.estimate`` at the callback's defaults. The last line trains the demo's 64-64 MLP for 2,000 steps
with an estimate every 10 steps and reports the RSS at step 200 and step 2,000.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


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
    parser.add_argument("--child", choices=["step", "estimate", "growth"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.hidden, args.batch)))
        return

    def run(what: str, hidden: int = args.hidden) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", what, "--hidden", str(hidden), "--batch",
                              str(args.batch)], capture_output=True, text=True, check=True)
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
