"""A tiny Hugging Face GPT-2 (built from a local config) trained under FSDP2 (ModelParallelStrategy, fully_shard per
block and on the model, tied input and output embeddings) with CurvatureMonitor at its defaults, for
test_distributed.

Usage: python fsdp_gpt2_run.py OUTDIR {with,without,one}

"with"/"without": 2 CPU processes (gloo), 8 sequences each; "one": the callback on 1 process with all 16. Writes the CSV
logs (rank zero), the final weights gathered whole (``weights-KIND.pt``) and a completion line.
"""

import os
import sys

import lightning.pytorch as pl
import torch
import transformers
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_curvature import CurvatureMonitor


def tokens() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(0, 40, (64, 12), generator=g))


class GPT2(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16,
                                         bos_token_id=0, eos_token_id=0)
        torch.manual_seed(0)
        self.model = transformers.GPT2LMHeadModel(config)

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(tokens(), num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(tokens(), batch_size=16 // world, sampler=sampler)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main():
    out, kind = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    world = 1 if kind == "one" else 2
    callbacks = [] if kind == "without" else [CurvatureMonitor(every_n_train_steps=2, top_k=2)]
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", devices=world,
        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                       save_distributed_checkpoint=False),
        callbacks=callbacks, logger=CSVLogger(out, name=kind, version=0), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, use_distributed_sampler=False,
    )
    model = GPT2()
    trainer.fit(model)
    weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
               for k, v in model.state_dict().items()}
    if trainer.global_rank == 0:
        torch.save(weights, os.path.join(out, f"weights-{kind}.pt"))
        print("FIT COMPLETE", flush=True)


if __name__ == "__main__":
    main()
