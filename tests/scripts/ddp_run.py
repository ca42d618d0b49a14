"""Train a small model with CurvatureMonitor, single process or 2-process DDP on CPU (gloo), for test_distributed.

Usage: python ddp_run.py OUTDIR {single,ddp,ddp_spawn} [current|fixed]
Both runs see the same 32 examples per step: DDP ranks get 16 each, the single process all 32. The logged
curvature must agree.
"""

import atexit
import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_curvature import CurvatureMonitor


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(128, 6, generator=g), torch.randint(0, 3, (128,), generator=g))

    def train_dataloader(self):
        # an explicit sampler: rank r gets examples r, r + W, r + 2W, ... in order, so the union of one step's rank
        # batches (16 each) is the single process's batch of 32 consecutive examples
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.data, batch_size=32 // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Completion(pl.Callback):
    """Notes that ``fit`` ended (in this process)."""

    done = False

    def on_fit_end(self, trainer, pl_module):
        _Completion.done = True


def _leave_without_teardown():
    # gloo sometimes aborts in its C++ teardown after a complete run ("terminate called without an active exception",
    # SIGABRT); in a ddp_spawn child that fails the parent's join, so a child whose fit ended leaves at once (its
    # results are already sent: multiprocessing flushes its queues before the interpreter's exit handlers run)
    if _Completion.done:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__mp_main__":  # a ddp_spawn child (the spawn start method imports the script under this name)
    atexit.register(_leave_without_teardown)


def main():
    out, kind = sys.argv[1], sys.argv[2]
    data = sys.argv[3] if len(sys.argv) > 3 else "current"
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    ddp = kind.startswith("ddp")
    cb = CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=8, tol=1e-8, max_iter=200, dtype="float64",
                          data=data, metrics=["trace", "eigenvalues", "lambda_min", "grad_curvature", "eos"])
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=2 if ddp else 1, strategy=kind if ddp else "auto",
        callbacks=[cb, _Completion()], logger=CSVLogger(out, name=kind, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
    )
    trainer.fit(Net())
    # judged by the test: gloo sometimes aborts at interpreter exit after a complete run ("terminate called without an
    # active exception", rc -6); the run is judged by what it logged and by this line
    print("FIT COMPLETE", flush=True)


if __name__ == "__main__":
    main()
