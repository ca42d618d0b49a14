"""A 2-process FSDP2 run (Lightning's ModelParallelStrategy, fully_shard) on CPU (gloo), for test_distributed; or an
FSDP1 run (Lightning's FSDPStrategy, FullyShardedDataParallel).

Usage: python fsdp_run.py OUTDIR {with,without,one} [fsdp2|fsdp1]

FSDP1 on CPU: Lightning's FSDPStrategy asks for a GPU accelerator (a check on the exact class, so a subclass passes it)
and gives FullyShardedDataParallel no CPU device, so the model wraps its layers itself in ``configure_model`` with
``device_id="cpu"`` (Lightning then keeps that wrapping); everything else is Lightning's FSDPStrategy.

The same 32 examples per step as the single-process reference in the test: ranks get 16 each ("one": the same run with
the callback on one process, fully_shard over a mesh of one). Writes the CSV logs (rank zero), the final weights
gathered whole (``weights.pt``), each rank's length of the stored top eigenvectors (``vectors-KIND-RANK.txt``) and a
completion line.
"""

import os
import sys

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
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
        if FLAVOUR == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if not isinstance(self.net, FSDP):
                cpu = torch.device("cpu")
                for i in (0, 2):
                    self.net[i] = FSDP(self.net[i], device_id=cpu, use_orig_params=True)
                self.net = FSDP(self.net, device_id=cpu, use_orig_params=True)
            return
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
        return torch.optim.Adam(self.parameters(), lr=0.01)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, past its GPU-only check (see the module docstring)."""


FLAVOUR = sys.argv[3] if len(sys.argv) > 3 else "fsdp2"


def main():
    out, kind = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callbacks = []
    world = 1 if kind == "one" else 2
    if kind != "without":
        callbacks.append(CurvatureMonitor(every_n_train_steps=2, top_k=2, num_probes=8, tol=1e-8, max_iter=100,
                                          dtype="float64", metrics=["trace", "eigenvalues", "grad_curvature",
                                                                    "lambda_min", "density", "preconditioned"],
                                          modules=["net.0", "net.2"], layer_metrics=["trace", "lambda_max",
                                                                                      "eig_mass"]))
    if FLAVOUR == "fsdp1":
        strategy = CPUFSDPStrategy(process_group_backend="gloo")
    else:
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                         save_distributed_checkpoint=False)
    trainer = pl.Trainer(
        max_steps=5, accelerator="cpu", devices=world, strategy=strategy,
        callbacks=callbacks, logger=CSVLogger(out, name=kind, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
    )
    model = Net()
    trainer.fit(model)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    if callbacks:
        with open(os.path.join(out, f"vectors-{kind}-{trainer.global_rank}.txt"), "w") as f:
            f.write(str(callbacks[0].plan.vectors["top"].shape[0]))
    if trainer.global_rank == 0:
        torch.save(weights, os.path.join(out, f"weights-{kind}.pt"))
        print("FIT COMPLETE", flush=True)


if __name__ == "__main__":
    main()
