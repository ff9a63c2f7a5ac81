"""``lt-finetune``: LightningCLI over TransferModule and the datamodules, plus ``groups`` and ``preview``.

``groups`` and ``preview`` are subcommands of the same parser as ``fit``, ``validate``, ``test`` and ``predict``:
``lt-finetune --help`` lists all six and ``lt-finetune <subcommand> --help`` describes each.

Usage::

    lt-finetune fit --config examples/configs/animal_mnist_mobilenetv2.yaml
    lt-finetune test --config examples/configs/animal_mnist_mobilenetv2.yaml --ckpt_path best.ckpt
    lt-finetune groups resnet18                 # the layer groups callbacks address, as a table
    lt-finetune preview --config cfg.yaml --output plan.png   # the fine-tuning plan, before training
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from jsonargparse.typing import Path_fr, PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lt_finetune.module import TransferModule

__all__ = ["FinetuneCLI", "main"]

_DESCRIPTION = (
    "Fine-tune a pretrained backbone: fit, validate, test and predict run a Trainer; "
    "groups and preview plan a run without training."
)
#: The subcommands this CLI adds to the Trainer's, with their one-line help.
_PLANNING_SUBCOMMANDS = {
    "groups": "Print the layer groups of a backbone: the names the callbacks address.",
    "preview": "Compute and plot the fine-tuning plan of a fit config, without training.",
}


class FinetuneCLI(LightningCLI):
    """LightningCLI with the number of classes taken from the datamodule and the best checkpoint reported.

    Beside the Trainer's subcommands it has two that plan a run: ``groups`` (parsed on its own: a backbone name
    or a fit config's) and ``preview`` (parsed like ``fit``, plus ``--output`` and ``--steps_per_epoch``). They
    are real subcommands of the parser, so ``--help`` lists them; :meth:`groups` and :meth:`preview` run them.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action  # the action the call above added: append to its choices
        if subcommands is None:
            raise RuntimeError("LightningCLI added no subcommands to its parser; `groups` and `preview` need them.")
        for name, build in (("groups", self._groups_parser), ("preview", self._preview_parser)):
            description = _PLANNING_SUBCOMMANDS[name]
            subparser = build(**{"description": description, **kwargs.get(name, {})})
            self._subcommand_parsers[name] = subparser
            self._subcommand_method_arguments[name] = []  # nothing is passed on to a Trainer method
            subcommands.add_subcommand(name, subparser, help=description)

    def _groups_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Only a name is needed: no model, data or trainer section, so `groups resnet18` needs no config.
        parser = self.parser_class(**kwargs)
        name_help = "A timm model name, or 'torchvision/<name>'."
        parser.add_argument("backbone", nargs="?", type=str | None, default=None, help=name_help)
        parser.add_argument("--model.backbone", type=str | None, default=None, help="Same as `backbone`.")
        parser.add_argument(
            "--config", type=Path_fr | None, default=None, help="A fit config; its `model.backbone` is used."
        )
        return parser

    def _preview_parser(self, **kwargs: Any) -> LightningArgumentParser:
        # Everything `fit` reads (the model, data and trainer sections) plus where the plot goes.
        parser = self.init_parser(**kwargs)
        self._add_arguments(parser)
        parser.add_argument("--output", type=str, default="schedule_preview.png", help="PNG file to write.")
        parser.add_argument(
            "--steps_per_epoch",
            type=PositiveInt | None,
            default=None,
            help="Optimizer steps per epoch; None counts the batches of the datamodule's train loader.",
        )
        return parser

    @override
    def _set_seed(self) -> None:
        if self.subcommand != "groups":  # groups builds no model and has no seed to set
            super()._set_seed()

    @override
    def instantiate_classes(self) -> None:
        if self.subcommand == "groups":
            self.config_init = self.parser.instantiate_classes(self.config)
            return
        super().instantiate_classes()

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand in _PLANNING_SUBCOMMANDS:
            getattr(self, subcommand)()
            return
        super()._run_subcommand(subcommand)

    def groups(self) -> None:
        """Print the layer groups of the named backbone (``groups``)."""
        options = self.config["groups"]
        name = options.backbone or options.model.backbone
        if name is None and options.config is not None:
            import yaml

            with open(options.config.absolute) as f:
                name = ((yaml.safe_load(f) or {}).get("model") or {}).get("backbone")
        if not name:
            self._subcommand_parsers["groups"].error(
                "name a backbone: `lt-finetune groups resnet18`, `--model.backbone NAME` or `--config CONFIG`"
            )
        from lt_finetune.backbones import create_backbone
        from lt_finetune.groups import format_groups, layer_groups

        backbone, _ = create_backbone(name, pretrained=False)
        print(f"Layer groups of {name} (input side first; the task head is the group 'head'):")
        print(format_groups(layer_groups(backbone)))

    def preview(self) -> None:
        """Print the fine-tuning plan as a table and plot it (``preview``)."""
        from lt_finetune.preview import preview_schedule

        options = self.config["preview"]
        trainer = self.trainer
        steps = options.steps_per_epoch or _steps_per_epoch(trainer, self.datamodule)
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        callbacks = list(getattr(trainer, "callbacks", []))
        plan = preview_schedule(self.model, callbacks, max_epochs=epochs, steps_per_epoch=steps)
        print(plan.table())
        plan.plot(options.output)
        print(f"Plot written to {options.output}")

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
            parser_kwargs={"description": _DESCRIPTION},
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved


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
    _cli(list(sys.argv[1:] if args is None else args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
