"""Small classifiers for digits, as LightningModules with a configurable optimizer."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "adam", "adamw")


class _Classifier(pl.LightningModule):
    def __init__(self, lr: float, optimizer: str, momentum: float, weight_decay: float) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        self.lr = lr
        self.optimizer_name = optimizer
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.net: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean())
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        cls = torch.optim.Adam if self.optimizer_name == "adam" else torch.optim.AdamW
        return cls(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class MLPClassifier(_Classifier):
    """A tanh MLP on flattened 8x8 digits.

    Args:
        hidden: widths of the hidden layers.
        dropout: dropout probability after each hidden layer.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: weight decay.
    """

    def __init__(
        self,
        hidden: list[int] | tuple[int, ...] = (64, 64),
        dropout: float = 0.0,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        in_features: int = 64,
        num_classes: int = 10,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)


class CNNClassifier(_Classifier):
    """A small CNN with BatchNorm for ``(N, 1, 8, 8)`` digits.

    Args:
        channels: channels of the two conv layers.
        dropout: dropout before the classifier.
        lr: learning rate.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: weight decay.
    """

    def __init__(
        self,
        channels: int = 8,
        dropout: float = 0.0,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        num_classes: int = 10,
    ) -> None:
        super().__init__(lr, optimizer, momentum, weight_decay)
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels * 16, num_classes),
        )
