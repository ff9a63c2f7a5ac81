"""``lt-finetune``: LightningCLI over TransferModule and the datamodules, plus ``groups`` and ``preview``.

Usage::

    lt-finetune fit --config examples/configs/animal_mnist_mobilenetv2.yaml
    lt-finetune test --config examples/configs/animal_mnist_mobilenetv2.yaml --ckpt_path best.ckpt
    lt-finetune groups resnet18                 # the layer groups callbacks address, as a table
    lt-finetune preview --config cfg.yaml --output plan.png   # the fine-tuning plan, before training
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from lt_finetune.module import TransferModule

__all__ = ["FinetuneCLI", "main"]


class FinetuneCLI(LightningCLI):
    """LightningCLI with the number of classes taken from the datamodule and the best checkpoint reported."""

    @override
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def after_fit(self) -> None:
        """Print where the best checkpoint is, for ``test``/``predict`` to use."""
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        if self.trainer.is_global_zero and path:
            score = getattr(callback, "best_model_score", None)
            shown = f" ({callback.monitor}={float(score):.4f})" if score is not None else ""  # type: ignore[union-attr]
            print(f"Best checkpoint{shown}: {path}")

    def after_predict(self) -> None:
        """Save the predicted probabilities next to the run's outputs and say where."""
        outputs = self.trainer.predict_loop.predictions
        if not self.trainer.is_global_zero or not outputs:
            return
        import os

        import torch

        batches = outputs[0] if outputs and isinstance(outputs[0], list) else outputs
        probabilities = torch.cat([torch.as_tensor(b) for b in batches])
        path = os.path.join(self.trainer.default_root_dir, "predictions.pt")
        os.makedirs(self.trainer.default_root_dir, exist_ok=True)
        torch.save(probabilities, path)
        print(f"Saved predicted probabilities {tuple(probabilities.shape)} to {path}")


def _cli(args: Sequence[str], run: bool = True) -> FinetuneCLI:
    # LightningCLI reads sys.argv; handing it ``args`` as well makes it warn, so present them as sys.argv.
    saved = sys.argv
    sys.argv = [saved[0] if saved else "lt-finetune", *args]
    try:
        return FinetuneCLI(
            TransferModule,
            pl.LightningDataModule,
            subclass_mode_data=True,
            run=run,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved


def _groups(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="lt-finetune groups", description="Print the layer groups of a backbone.")
    parser.add_argument("backbone", nargs="?", help="timm name, 'torchvision/<name>'")
    parser.add_argument("--model.backbone", dest="model_backbone", help="same as the positional argument")
    parser.add_argument("--config", help="a fit config; its model.backbone is used")
    ns = parser.parse_args(list(args))
    name = ns.backbone or ns.model_backbone
    if name is None and ns.config:
        import yaml

        with open(ns.config) as f:
            name = (yaml.safe_load(f).get("model") or {}).get("backbone")
    if not name:
        parser.error("name a backbone: `lt-finetune groups resnet18` or `--config CONFIG`")
    from lt_finetune.backbones import create_backbone
    from lt_finetune.groups import format_groups, layer_groups

    backbone, _ = create_backbone(name, pretrained=False)
    print(f"Layer groups of {name} (input side first; the task head is the group 'head'):")
    print(format_groups(layer_groups(backbone)))
    return 0


def _preview(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lt-finetune preview",
        description="Compute the fine-tuning plan of a fit config without training; other arguments go to `fit`.",
    )
    parser.add_argument("--output", default="schedule_preview.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--steps_per_epoch", type=int, help="optimizer steps per epoch (default: from the data)")
    ns, rest = parser.parse_known_args(list(args))
    from lt_finetune.preview import preview_schedule

    cli = _cli(rest, run=False)
    trainer, model = cli.trainer, cli.model
    steps = ns.steps_per_epoch or _steps_per_epoch(trainer, cli.datamodule)
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
    callbacks = list(getattr(trainer, "callbacks", []))
    plan = preview_schedule(model, callbacks, max_epochs=epochs, steps_per_epoch=steps)
    print(plan.table())
    plan.plot(ns.output)
    print(f"Plot written to {ns.output}")
    return 0


def _steps_per_epoch(trainer: pl.Trainer, datamodule: pl.LightningDataModule | None) -> int:
    if datamodule is None:
        raise ValueError("preview needs a datamodule in the config, or --steps_per_epoch.")
    datamodule.setup("fit")
    batches = len(datamodule.train_dataloader())
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        batches = int(batches * limit)
    elif isinstance(limit, int):
        batches = min(batches, limit)
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def main(args: Sequence[str] | None = None) -> int:
    """Entry point of the ``lt-finetune`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "groups":
        return _groups(argv[1:])
    if argv and argv[0] == "preview":
        return _preview(argv[1:])
    _cli(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
