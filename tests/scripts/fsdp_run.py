"""A 2-process FSDP2 run (Lightning's ModelParallelStrategy, fully_shard) on CPU (gloo), for test_distributed.

Usage: python fsdp_run.py OUTDIR {with,without}

The same 32 examples per step as the single-process reference in the test: ranks get 16 each. Writes the CSV logs
(rank zero), the final weights gathered whole (``weights.pt``) and a completion line.
"""

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_curvature import CurvatureMonitor


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def make_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (128,), generator=g))


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_model()

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(make_data(), num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(make_data(), batch_size=32 // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main():
    out, kind = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callbacks = []
    if kind == "with":
        callbacks.append(CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=8, tol=1e-8, max_iter=100,
                                          dtype="float64", metrics=["trace", "eigenvalues", "grad_curvature"]))
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False),
        callbacks=callbacks, logger=CSVLogger(out, name=kind, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
    )
    model = Net()
    trainer.fit(model)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    if trainer.global_rank == 0:
        torch.save(weights, os.path.join(out, f"weights-{kind}.pt"))
        print("FIT COMPLETE", flush=True)


if __name__ == "__main__":
    main()
