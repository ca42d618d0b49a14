"""The digits MLP under LightningCLI, with CurvatureMonitor added from the command line (no Hydra).

    python examples/cli.py fit --trainer.max_epochs=5 \
        --trainer.callbacks+=lightning_curvature.CurvatureMonitor \
        --trainer.callbacks.every_n_train_steps=10 --trainer.callbacks.top_k=3
    python examples/cli.py fit --print_config                  # the full config, callbacks included
    python examples/cli.py fit --config my.yaml                # or from a YAML file

Logs go to ``lightning_logs/version_N/`` (TensorBoard) unless ``--trainer.logger`` says otherwise.
LightningCLI needs ``jsonargparse[signatures]`` (in the ``examples`` extra).
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from lightning_curvature.demo import DigitsDataModule, MLPClassifier


def main(args: list[str] | None = None) -> LightningCLI:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return LightningCLI(
        MLPClassifier,
        DigitsDataModule,
        args=args,
        trainer_defaults={"accelerator": "cpu", "devices": 1, "log_every_n_steps": 1},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
