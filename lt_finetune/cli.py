"""``lt-finetune``: LightningCLI over TransferModule and the datamodules, plus ``groups`` and ``preview``.

``groups``, ``preview`` and ``export`` are subcommands of the same parser as ``fit``, ``validate``, ``test`` and
``predict``: ``lt-finetune --help`` lists them all and ``lt-finetune <subcommand> --help`` describes each.
``test`` also prints per-class precision and recall and writes ``confusion_matrix.png``; ``predict`` writes
``predictions.csv`` (path, class name, probability, top-k); both under ``trainer.default_root_dir``.

Usage::

    lt-finetune fit --config examples/configs/animal_mnist_mobilenetv2.yaml
    lt-finetune test --config examples/configs/animal_mnist_mobilenetv2.yaml --ckpt_path best.ckpt
    lt-finetune groups resnet18                 # the layer groups callbacks address, as a table
    lt-finetune preview --config cfg.yaml --output plan.png   # the fine-tuning plan, before training
    lt-finetune predict --config cfg.yaml --ckpt_path best.ckpt --data.predict_dir new_images/
    lt-finetune export --ckpt_path best.ckpt --format onnx   # best.onnx and best.onnx.json (class names)
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
from jsonargparse.typing import Path_fr, PositiveInt
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lt_finetune.data  # noqa: F401  (registers the datamodules: listed in --help, usable by short name)
from lt_finetune.module import TransferModule

__all__ = ["FinetuneArgumentParser", "FinetuneCLI", "class_path_hint", "main", "resolve_config_paths"]

_DESCRIPTION = (
    "Fine-tune a pretrained backbone: fit, validate, test and predict run a Trainer; "
    "groups and preview plan a run without training; export writes a checkpoint as TorchScript or ONNX."
)
#: The subcommands this CLI adds to the Trainer's, with their one-line help.
_PLANNING_SUBCOMMANDS = {
    "groups": "Print the layer groups of a backbone: the names the callbacks address.",
    "preview": "Compute and plot the fine-tuning plan of a fit config, without training.",
    "export": "Export a checkpoint to TorchScript or ONNX, with its class names and preprocessing beside it.",
    "soup": "Average checkpoints (uniform and greedy soups, WiSE-FT sweep), scored on validation data.",
    "rank": "Score candidate backbones on the training data (LogME, H-score, LEEP, NCE) and recommend one.",
    "advise": "Recommend a fine-tuning recipe from the data and the backbone, and write it as a fit config.",
}
#: Subcommands that build no Trainer, model or datamodule from the config.
_STANDALONE = ("groups", "export")


class FinetuneArgumentParser(LightningArgumentParser):
    """The CLI's parser: an error about a misspelled class name says which names are close."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(message + class_path_hint(message), ex)


def class_path_hint(message: str) -> str:
    """For ``module 'm' has no attribute 'Name'`` in a parse error, the close names that ``m`` does have.

    Example::

        >>> print(class_path_hint("module 'lt_finetune.callbacks' has no attribute 'FreezeBakbone'"), end="")
        <BLANKLINE>
        Did you mean: lt_finetune.callbacks.FreezeBackbone?
    """
    import difflib
    import importlib
    import re

    hints = []
    for module_name, name in re.findall(r"module '([\w.]+)' has no attribute '(\w+)'", message):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, public, n=3, cutoff=0.6)
        hints += [f"{module_name}.{c}" for c in close]
    return f"\nDid you mean: {' or '.join(dict.fromkeys(hints))}?" if hints else ""


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
        for name, build in (
            ("groups", self._groups_parser),
            ("preview", self._preview_parser),
            ("export", self._export_parser),
            ("soup", self._soup_parser),
            ("rank", self._rank_parser),
            ("advise", self._advise_parser),
        ):
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

    def _soup_parser(self, **kwargs: Any) -> LightningArgumentParser:
        from lt_finetune.soup_command import soup_parser

        return soup_parser(self, **kwargs)

    def soup(self) -> None:
        """Soups and WiSE-FT of checkpoints (``soup``); see :mod:`lt_finetune.soup_command`."""
        from lt_finetune.soup_command import run_soup

        run_soup(self)

    def _rank_parser(self, **kwargs: Any) -> LightningArgumentParser:
        from lt_finetune.rank_command import rank_parser

        return rank_parser(self, **kwargs)

    def rank(self) -> None:
        """Score candidate backbones on the training data (``rank``); see :mod:`lt_finetune.rank_command`."""
        from lt_finetune.rank_command import run_rank

        run_rank(self)

    def _advise_parser(self, **kwargs: Any) -> LightningArgumentParser:
        from lt_finetune.advise_command import advise_parser

        return advise_parser(self, **kwargs)

    def advise(self) -> None:
        """Recommend a recipe and write it as a fit config (``advise``); see :mod:`lt_finetune.advise_command`."""
        from lt_finetune.advise_command import run_advise

        run_advise(self)

    def _export_parser(self, **kwargs: Any) -> LightningArgumentParser:
        from lt_finetune.export import EXPORT_FORMATS

        parser = self.parser_class(**kwargs)
        parser.add_argument("--ckpt_path", type=Path_fr, required=True, help="A checkpoint of TransferModule.")
        parser.add_argument(
            "--format", type=Literal[EXPORT_FORMATS], default="torchscript", help="torchscript, or onnx ([onnx] extra)."
        )
        parser.add_argument(
            "--output", type=str | None, default=None, help="File to write; None: the checkpoint's name, .pt or .onnx."
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
        if self.subcommand not in _STANDALONE:  # they build no model and have no seed to set
            super()._set_seed()

    @override
    def _parse_ckpt_path(self) -> None:
        if self.config.get("subcommand") != "export":  # export loads the checkpoint itself; it has no model section
            super()._parse_ckpt_path()

    @override
    def before_instantiate_classes(self) -> None:
        """Resolve relative input paths of a config file against the file's folder when the cwd lacks them."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if config is not None and self.subcommand not in _STANDALONE:
            resolve_config_paths(config)

    @override
    def instantiate_classes(self) -> None:
        if self.subcommand in _STANDALONE:
            self.config_init = self.parser.instantiate_classes(self.config)
            return
        super().instantiate_classes()

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """``predict`` logs nothing: without a logger of the config's own it makes no ``version_N`` folder."""
        if self.subcommand != "predict" or self._get(self.config_init, "trainer", default={}).get("logger") not in (
            None,
            True,
        ):
            return super().instantiate_trainer(**kwargs)
        saved, self.save_config_callback = self.save_config_callback, None  # its config.yaml would go there too
        try:
            return super().instantiate_trainer(**{"logger": False, **kwargs})
        finally:
            self.save_config_callback = saved

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
        from lt_finetune.lora import lora_summary

        print(lora_summary(backbone))  # what LoRA() wraps when given no target_modules

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

    def export(self) -> None:
        """Export a checkpoint (``export``) and say where its files are."""
        from lt_finetune.export import default_output, export_model

        options = self.config["export"]
        ckpt = options.ckpt_path.absolute
        model = TransferModule.load_from_checkpoint(ckpt, map_location="cpu")
        from lt_finetune.lora import merge_lora

        merged = merge_lora(model.backbone)  # the same function with plain layers: no adapter matmuls at inference
        if merged:
            print(f"Merged the LoRA adapters of {merged} layers into their weights")
        output = options.output or default_output(ckpt, options.format)
        path, sidecar = export_model(model, output, options.format)
        print(f"Exported {options.format} model to {path} (class names and preprocessing in {sidecar})")

    def after_fit(self) -> None:
        """Print where the best checkpoint is, for ``test``/``predict`` to use."""
        callback = self.trainer.checkpoint_callback
        path = getattr(callback, "best_model_path", "") if callback is not None else ""
        if self.trainer.is_global_zero and path:
            score = getattr(callback, "best_model_score", None)
            shown = f" ({callback.monitor}={float(score):.4f})" if score is not None else ""  # type: ignore[union-attr]
            print(f"Best checkpoint{shown}: {path}")

    def before_predict(self) -> None:
        """Add a :class:`~lt_finetune.inference.PredictionWriter` (``predictions.csv``) unless the config has one."""
        from lt_finetune.inference import PredictionWriter

        callbacks: list[Any] = getattr(self.trainer, "callbacks")  # noqa: B009 (mypy does not see the property)
        if not any(isinstance(c, PredictionWriter) for c in callbacks):
            callbacks.append(PredictionWriter())

    def after_predict(self) -> None:
        """Say where the predictions were written."""
        from lt_finetune.inference import PredictionWriter

        for callback in getattr(self.trainer, "callbacks", []):
            if isinstance(callback, PredictionWriter) and callback.written and self.trainer.is_global_zero:
                print(f"Predictions (path, class name, probability, top-k) written to {callback.written}")

    def after_test(self) -> None:
        """Print per-class precision and recall and write the confusion matrix as ``confusion_matrix.png``."""
        model = self.model
        confusion = getattr(model, "test_confusion_matrix", None)
        if confusion is None or not self.trainer.is_global_zero:
            return

        from lt_finetune.report import per_class_table, plot_confusion_matrix

        classes = getattr(model, "classes", None) or [str(i) for i in range(confusion.shape[0])]
        print("Per-class results on the test split:")
        print(per_class_table(confusion, classes))
        path = plot_confusion_matrix(
            confusion, classes, os.path.join(self.trainer.default_root_dir, "confusion_matrix.png")
        )
        print(f"Confusion matrix written to {path}")


#: Input paths a config may give: the weights file, and the image folders of ImageFolderDataModule.
_INPUT_PATHS = ("model.pretrained", *(f"data.init_args.{split}_dir" for split in ("train", "val", "test", "predict")))


def resolve_config_paths(config: Any) -> None:
    """Make relative input paths work from any working directory, in place.

    A relative ``model.pretrained`` or image folder that exists from the working directory is kept, as Lightning
    reads every path; one that does not, but exists beside a config file given with ``--config`` (the last one
    first), is taken from there. So ``lt-finetune fit --config examples/configs/x.yaml`` finds the files
    ``x.yaml`` names relative to itself, from the repository root or anywhere else.
    """
    given = config.get("config") or []
    given = given if isinstance(given, list) else [given]
    folders = [Path(str(getattr(c, "absolute", c))).parent for c in reversed(given) if c]
    for key in _INPUT_PATHS:
        value = config.get(key)
        if not isinstance(value, str) or not value or os.path.isabs(value) or os.path.exists(value):
            continue
        found = next((folder / value for folder in folders if (folder / value).exists()), None)
        if found is not None:
            config[key] = os.path.normpath(found)


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
            parser_class=FinetuneArgumentParser,
            # A run killed during a save keeps its previous last.ckpt whole (lt_finetune.checkpoint_io).
            trainer_defaults={"plugins": {"class_path": "lt_finetune.checkpoint_io.AtomicCheckpointIO"}},
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
