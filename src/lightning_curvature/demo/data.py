"""scikit-learn's digits as a LightningDataModule."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(image: bool = False) -> tuple[Tensor, Tensor]:
    """Digits as float32 features in ``[0, 1]``, ``(N, 64)`` or ``(N, 1, 8, 8)`` with ``image``, and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("The digits data needs scikit-learn: pip install 'lightning-curvature[examples]'.") from err
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return (x.view(-1, 1, 8, 8) if image else x), y


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), split into train and validation sets.

    Args:
        batch_size: training batch size; ``0`` or a value >= the training set size means full batch.
        val_fraction: fraction held out for validation (split with a fixed seed).
        image: yield ``(N, 1, 8, 8)`` images instead of 64-dimensional vectors.
        num_train: optional cap on the number of training examples (e.g. for fast full-batch runs).
        shuffle: shuffle the training set each epoch.
        seed: seed of the train/validation split.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        image: bool = False,
        num_train: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0 means full batch), got {batch_size}.")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.image = image
        self.num_train = num_train
        self.shuffle = shuffle
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors(self.image)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(round(self.val_fraction * len(x)))
        val, train = order[:n_val], order[n_val:]
        if self.num_train is not None:
            train = train[: self.num_train]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def _bs(self, n: int) -> int:
        return n if self.batch_size == 0 else min(self.batch_size, n)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self._bs(len(self.train_set)), shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=512)
