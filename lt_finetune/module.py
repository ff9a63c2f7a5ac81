"""TransferModule: a pretrained backbone, a task head, metrics and optimizer wiring, as one LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MulticlassConfusionMatrix
from typing_extensions import override

from lt_finetune._version import VERSION_KEY, __version__
from lt_finetune.backbones import backbone_data_config, create_backbone
from lt_finetune.extras import EXTRA_MODULES, trainable_modules
from lt_finetune.feature_cache import FeatureBatch
from lt_finetune.groups import LayerGroup, layer_groups
from lt_finetune.inference import CHECKPOINT_KEY, ImagePrediction, inference_settings, predict_images
from lt_finetune.lora import restore_lora, save_lora
from lt_finetune.loss_terms import LossTermsMixin, StepOutputs, StreamOutputs, split_batch
from lt_finetune.optim import build_param_groups
from lt_finetune.slim import restore_slim_checkpoint, slim_checkpoint
from lt_finetune.snapshot import load_snapshots, save_snapshots
from lt_finetune.validation import check_choice, check_float, check_int

Task = Literal["multiclass", "multilabel", "binary"]
OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
# A scheduler return type (not Any) lets LightningCLI build one from `class_path` and `init_args` in YAML.
SchedulerFactory = Callable[
    [torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau
]
#: What a ``ReduceLROnPlateau`` scheduler watches unless ``scheduler_monitor`` says otherwise.
DEFAULT_PLATEAU_MONITOR = "val/loss"

__all__ = ["TransferModule", "WarmupCosine"]


class WarmupCosine:
    """Learning-rate factor: linear warm-up from ~0 to 1, then cosine decay to ``min_ratio``; for ``LambdaLR``.

    A callable object rather than a closure, so that ``LambdaLR`` saves it in checkpoints and it pickles.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = max(int(warmup_steps), 0)
        self.total_steps = max(int(total_steps), 1)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class TransferModule(LossTermsMixin, pl.LightningModule):
    """Fine-tune a pretrained backbone with a new head for classification.

    **Optimizer contract** (public interface the callbacks rely on): ``configure_optimizers`` returns one
    optimizer whose param groups are named after the layer groups of ``self.backbone`` (see
    :func:`lt_finetune.groups.layer_groups`) plus ``"head"``, in input-to-output order, each with its own
    ``lr``; norm and bias parameters sit in ``"<group>/no_decay"`` companions with ``weight_decay=0``. Every
    group is present from the first step, frozen or not. Each group has the keys ``name`` and ``layer_group``.

    **Feature hooks**: :meth:`forward_features` (images to pooled features) and :meth:`forward_head`
    (features to logits); ``forward`` is their composition. Feature-level methods (domain adaptation,
    feature caching) build on these.

    **Loss terms** (``lt_finetune.loss_terms``): callbacks register extra losses with :meth:`add_loss_term`;
    each training step computes the features once, adds every term to the task loss and logs each one.

    **From a checkpoint to answers**: fitted on a datamodule with ``classes`` (such as
    :class:`~lt_finetune.data.ImageFolderDataModule`), the module keeps its class names, task and eval
    preprocessing in every checkpoint (see :mod:`lt_finetune.inference`), so
    ``TransferModule.load_from_checkpoint(path).predict_images("new_images/")`` returns class names and
    probabilities; :attr:`classes` holds the names. ``test`` also computes the confusion matrix
    (:attr:`test_confusion_matrix`, multiclass), from which ``lt-finetune test`` reports per-class results.

    **Batches**: ``(x, y, *rest)``, or a dict from Lightning's ``CombinedLoader`` with the labelled stream under
    ``"source"`` and unlabelled streams (a target domain) under other keys; all streams go through one forward
    pass in training, and loss terms see their features and logits.

    Args:
        backbone: A timm model name, ``"torchvision/<name>"``, or an ``nn.Module`` (see
            :func:`lt_finetune.backbones.create_backbone`). A module is not saved in the hyper-parameters: pass
            it again to ``load_from_checkpoint``.
        num_classes: Number of classes (labels for ``"multilabel"``; 1 or 2 for ``"binary"``).
        pretrained: ``False``, ``True`` (the library's download/cache path) or a local weights file.
        task: ``"multiclass"`` (cross-entropy), ``"multilabel"`` or ``"binary"`` (binary cross-entropy).
        drop_rate: Dropout before the classifier.
        label_smoothing: Label smoothing for ``"multiclass"``.
        lr: Peak learning rate of the default optimizer.
        weight_decay: Weight decay of the default optimizer (never applied to norms and biases).
        optimizer: Optimizer factory taking the param groups (LightningCLI: ``--model.optimizer SGD``);
            ``None`` gives AdamW with ``lr`` and ``weight_decay``.
        scheduler: Scheduler factory taking the optimizer, stepped every step (LightningCLI: ``class_path`` and
            ``init_args``); a ``ReduceLROnPlateau`` is stepped every epoch on ``scheduler_monitor``. ``None``
            gives ``schedule``.
        scheduler_monitor: Logged metric a ``ReduceLROnPlateau`` scheduler watches; ``None`` for ``"val/loss"``.
            Other schedulers watch none, so it must be ``None`` with them.
        schedule: Default schedule: ``"cosine"`` (linear warm-up over ``warmup_fraction`` of the steps, then
            cosine to 0, per step) or ``"constant"``.
        warmup_fraction: Fraction of the total steps used for warm-up by the default schedule.
        input_size: Input size ``(C, H, W)`` used to find the feature size of a plain module backbone.

    Example::

        >>> model = TransferModule("resnet18", num_classes=5)
        >>> model(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        num_classes: int = 10,
        pretrained: bool | str = False,
        task: Task = "multiclass",
        drop_rate: float = 0.0,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_monitor: str | None = None,
        schedule: Literal["cosine", "constant"] = "cosine",
        warmup_fraction: float = 0.05,
        input_size: tuple[int, int, int] = (3, 224, 224),
    ) -> None:
        super().__init__()
        check_choice("task", task, ("multiclass", "multilabel", "binary"))
        check_int("num_classes", num_classes, 1)
        if task == "binary" and num_classes > 2:
            raise ValueError(f"Expected `num_classes` to be 1 or 2 for task='binary', got {num_classes}.")
        if task == "multiclass" and num_classes < 2:
            raise ValueError(f"Expected `num_classes` >= 2 for task='multiclass', got {num_classes}.")
        check_float("drop_rate", drop_rate, 0.0, 1.0, high_open=True)
        check_float("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        check_float("warmup_fraction", warmup_fraction, 0.0, 1.0, high_open=True)
        check_float("lr", lr, 0.0, low_open=True)
        check_float("weight_decay", weight_decay, 0.0)
        check_choice("schedule", schedule, ("cosine", "constant"))
        if scheduler_monitor is not None and (not isinstance(scheduler_monitor, str) or not scheduler_monitor):
            raise TypeError(f"Expected `scheduler_monitor` to be a metric name or None, got {scheduler_monitor!r}.")
        if pretrained is not None and not isinstance(pretrained, (bool, str)):
            raise TypeError(
                f"Expected `pretrained` to be a bool or a weights file path, got {pretrained!r} of type "
                f"{type(pretrained).__name__}."
            )
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.backbone, self.num_features = create_backbone(
            backbone, pretrained, input_size=(input_size[0], input_size[1], input_size[2])
        )
        outputs = 1 if task == "binary" else num_classes
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(self.num_features, outputs))
        self.task = task
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_monitor = scheduler_monitor
        metrics = _metrics(task, num_classes)
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.test_confusion = MulticlassConfusionMatrix(num_classes) if task == "multiclass" else None
        #: Confusion matrix ``[true, predicted]`` of the last ``test`` run (multiclass), or ``None``.
        self.test_confusion_matrix: torch.Tensor | None = None
        #: Class names, task and eval preprocessing, from the datamodule at fit time or from the checkpoint.
        self.inference: dict[str, Any] | None = None
        # Targets checked on an accelerator so far: reading their range back costs a device sync, so only the
        # first ``_TARGET_CHECKS`` batches there are checked (every batch on the CPU, where it costs nothing).
        self._accelerator_target_checks = 0

    # -- model -----------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` to pooled features ``[B, num_features]``."""
        features = self.backbone(x)
        if features.ndim == 4:
            features = features.mean(dim=(2, 3))
        return features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features to logits."""
        return self.head(features)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def layer_groups(self) -> list[LayerGroup]:
        """The backbone's layer groups, input side first (the head is the group ``"head"``)."""
        return layer_groups(self.backbone)

    @property
    def data_config(self) -> dict[str, Any]:
        """Input size, mean, std, interpolation and crop fraction the backbone's weights expect."""
        return backbone_data_config(self.backbone)

    @property
    def classes(self) -> list[str] | None:
        """Class names (index ``i`` names output ``i``), known once fitted on a datamodule or loaded; else ``None``."""
        return None if self.inference is None else list(self.inference["classes"])

    def _inference_settings(self) -> dict[str, Any]:
        if self.inference is not None:
            return self.inference
        # Never fitted on a datamodule: the backbone's own preprocessing and numbered classes.
        count = self.hparams["num_classes"] if self.task != "binary" else 2
        config = {**self.data_config, "input_size": tuple(self.hparams["input_size"])}
        fallback = type("_Data", (), {"classes": [str(i) for i in range(count)], "data_config": config})()
        return inference_settings(fallback, self.task)

    @torch.no_grad()
    def predict_images(self, images: Any, *, batch_size: int = 32, top_k: int = 5) -> list[ImagePrediction]:
        """Classify image files, folders (searched recursively) or PIL images; return names and probabilities.

        Images are read as RGB (grayscale, palette and RGBA files converted, as in training) and go through the
        eval transform the model was fitted with (saved in the checkpoint). The model is put in eval mode for the
        call and its mode restored.

        Args:
            images: A path, a folder, a PIL image, or a sequence of them.
            batch_size: Images per forward pass.
            top_k: ``(name, probability)`` pairs listed per image.

        Returns:
            One :class:`~lt_finetune.inference.ImagePrediction` ``(path, label, probability, top_k)`` per image, in
            order (folders contribute their files sorted by path).

        Raises:
            OSError: If an image file cannot be read; the message names it.
            FileNotFoundError: If a folder holds no image files.

        Example::

            >>> model = TransferModule("resnet18", num_classes=3)
            >>> from PIL import Image
            >>> (answer,) = model.predict_images(Image.new("L", (40, 30)), top_k=2)
            >>> answer.label in ("0", "1", "2"), len(answer.top_k)
            (True, 2)
        """
        return predict_images(self, images, self._inference_settings(), batch_size=batch_size, top_k=top_k)

    @override
    def to_torchscript(
        self, file_path: Any = None, method: str | None = "trace", example_inputs: Any | None = None, **kwargs: Any
    ) -> Any:
        """Trace the model (TorchScript) on an input of its eval size; ``method="script"`` scripts it instead.

        timm and torchvision backbones are traceable but not all scriptable, so tracing is the default.
        """
        if method == "trace" and example_inputs is None:
            size = self._inference_settings()["preprocessing"]["input_size"]
            example_inputs = torch.zeros(1, *size, device=self.device)
        return super().to_torchscript(file_path, method, example_inputs, **kwargs)

    # -- data checks -----------------------------------------------------------------------------------------

    def _check_datamodule_preprocessing(self) -> None:
        # A test or predict run whose datamodule preprocesses differently from training gives other answers.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.inference is None or not getattr(datamodule, "classes", None):
            return
        now = inference_settings(datamodule, self.task)
        saved = self.inference
        changed = {k: (saved["preprocessing"].get(k), v) for k, v in now["preprocessing"].items()}
        changed = {k: pair for k, pair in changed.items() if pair[0] is not None and tuple_(pair[0]) != tuple_(pair[1])}
        if now["classes"] != saved["classes"]:
            changed["classes"] = (saved["classes"], now["classes"])
        if changed:
            shown = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in changed.items())
            rank_zero_warn(
                f"{type(datamodule).__name__} differs from the data the checkpoint was trained on ({shown}); "
                "predictions follow the datamodule. Pass the training settings to get the model's answers."
            )

    @override
    def setup(self, stage: str) -> None:
        """Check the datamodule's classes against ``num_classes`` and keep its class names and preprocessing.

        Raises:
            ValueError: If the datamodule has a different number of classes than the head (multiclass and
                multilabel), before the first step.
        """
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        classes = getattr(datamodule, "classes", None)
        if not classes:
            return
        expected = self.hparams["num_classes"]
        fits = len(classes) in (1, 2) if self.task == "binary" else len(classes) == expected
        if not fits:
            raise ValueError(
                f"TransferModule(num_classes={expected}, task={self.task!r}) does not fit the {len(classes)} "
                f"classes of {type(datamodule).__name__} ({_shown(classes)}); pass num_classes={len(classes)} "
                "(the lt-finetune CLI takes it from the datamodule unless `model.num_classes` is given)."
            )
        if stage == "fit" or self.inference is None:
            self.inference = inference_settings(datamodule, self.task)

    # -- steps -----------------------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            if target.is_floating_point() and target.ndim == 2:  # soft targets from Mixup/CutMix
                return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
            on_host = target.device.type == "cpu"
            if on_host or self._accelerator_target_checks < _TARGET_CHECKS:
                _check_targets(target, logits.shape[-1])
                self._accelerator_target_checks += 0 if on_host else 1
            return F.cross_entropy(logits, target, label_smoothing=self.hparams["label_smoothing"])
        if self.task == "binary":
            logits = logits.squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, target.float())

    def _metric_inputs(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.task == "multiclass" and target.is_floating_point() and target.ndim == 2:
            target = target.argmax(dim=-1)
        if self.task == "binary":
            logits = logits.squeeze(-1)
        return logits, target.long() if self.task != "multiclass" else target

    def _shared_step(self, batch: Any, metrics: MetricCollection, stage: str) -> torch.Tensor:
        x, target, streams = split_batch(batch)
        if streams and stage == "train":
            # One forward pass over every stream, as domain-adaptation methods expect (shared BatchNorm statistics).
            sizes = [len(x), *(len(s[0]) for s in streams.values())]
            features_all = self.forward_features(torch.cat([x, *(s[0] for s in streams.values())]))
            logits_all = self.forward_head(features_all)
            features, *stream_features = features_all.split(sizes)
            logits, *stream_logits = logits_all.split(sizes)
        else:
            # A FeatureBatch holds backbone features cached by CachedProbe: only the head runs.
            features = x if isinstance(batch, FeatureBatch) else self.forward_features(x)
            logits = self.forward_head(features)
            stream_features, stream_logits = [], []
        loss = self._loss(logits, target)
        metrics.update(*self._metric_inputs(logits.detach(), target))
        if stage == "test" and self.test_confusion is not None:
            self.test_confusion.update(logits.detach().argmax(dim=-1), target)
        if stage == "train":
            outputs = StepOutputs(
                features=features,
                logits=logits,
                target=target,
                inputs=x,
                streams={
                    name: StreamOutputs(inputs=s[0], features=f, logits=lg, labels=s[1])
                    for (name, s), f, lg in zip(streams.items(), stream_features, stream_logits)
                },
                batch=batch,
                stage=stage,
            )
            loss = self.apply_loss_terms(loss, outputs)
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=len(x))
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.train_metrics, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.val_metrics, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, self.test_metrics, "test")

    @override
    def on_test_epoch_start(self) -> None:
        self.test_confusion_matrix = None

    @override
    def on_test_epoch_end(self) -> None:
        if self.test_confusion is not None:
            self.test_confusion_matrix = self.test_confusion.compute().cpu()
            self.test_confusion.reset()

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (softmax for multiclass, sigmoid otherwise)."""
        if isinstance(batch, dict):
            batch = batch.get("source", next(iter(batch.values())))
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        logits = self(x)
        return logits.softmax(dim=-1) if self.task == "multiclass" else logits.sigmoid()

    # -- optimisation ----------------------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """Param groups following the optimizer contract (without ``lr``: the optimizer's default applies).

        Extra trainable modules (``lt_finetune.extras``, e.g. a domain discriminator) get their own groups, after
        ``"head"``.
        """
        head = [(f"head.{n}", p) for n, p in self.head.named_parameters()]
        weight_decay = self.hparams["weight_decay"] if self.optimizer_factory is None else None
        extras = {name: list(m.named_parameters()) for name, m in trainable_modules(self).items()}
        return build_param_groups(self.layer_groups(), head, weight_decay, extras=extras)

    def build_optimizer(self, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer and its per-step scheduler (``None`` for a constant rate), for ``total_steps`` steps."""
        groups = self.param_groups()
        if self.optimizer_factory is None:
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                groups, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
            )
        else:
            optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is not None:
            return optimizer, self.scheduler_factory(optimizer)
        if self.hparams["schedule"] == "constant":
            return optimizer, None
        warmup = round(self.hparams["warmup_fraction"] * total_steps)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total_steps))

    @override
    def configure_optimizers(self) -> Any:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        if not 0 < total < 2**40:
            total = 1  # an infinite run (max_steps=-1 and no max_epochs): the schedule then stays at its start
        optimizer, scheduler = self.build_optimizer(total)
        if scheduler is None:
            return optimizer
        monitor = self.scheduler_monitor
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # Per epoch: its metric is logged once an epoch, and each step would count as an epoch without progress.
            config = {"scheduler": scheduler, "interval": "epoch", "monitor": monitor or DEFAULT_PLATEAU_MONITOR}
            return {"optimizer": optimizer, "lr_scheduler": config}
        if monitor is not None:
            raise ValueError(
                f"TransferModule(scheduler_monitor={monitor!r}) names the metric a ReduceLROnPlateau scheduler "
                f"watches, but the scheduler is a {type(scheduler).__name__}, which watches none; remove "
                "`scheduler_monitor`."
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_train_epoch_end(self) -> None:
        """Check that each ``ReduceLROnPlateau``'s metric was logged, before Lightning steps the scheduler on it.

        Raises:
            ValueError: If the metric was not logged by the end of the epoch; the message lists what was.
        """
        trainer = self.trainer
        logged = trainer.callback_metrics
        for config in trainer.lr_scheduler_configs:
            if not config.reduce_on_plateau or config.interval != "epoch" or config.monitor in logged:
                continue
            watched = config.monitor
            hint = (
                " Validation logs it: give the fit validation data and validate every epoch, or watch a training "
                "metric such as 'train/loss'."
                if str(watched).startswith("val/")
                else ""
            )
            raise ValueError(
                f"TransferModule(scheduler_monitor={self.scheduler_monitor!r}): ReduceLROnPlateau watches "
                f"{watched!r}, which was not logged by the end of epoch {trainer.current_epoch}; logged: "
                f"{sorted(logged)}. Set `scheduler_monitor` to a metric logged every epoch.{hint}"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_snapshots(self, checkpoint)
        checkpoint[VERSION_KEY] = __version__
        if self.inference is not None:
            checkpoint[CHECKPOINT_KEY] = self.inference
        save_lora(self, checkpoint)  # the adapter layout, so that loading can re-create the adapters
        slim_checkpoint(self, checkpoint)  # last: leaves out pretrained tensors (SlimCheckpoint), snapshot included

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._check_checkpoint_matches(checkpoint)
        restore_slim_checkpoint(self, checkpoint)  # a slim checkpoint's pretrained tensors, before anything reads them
        load_snapshots(self, checkpoint)
        # LoRA adapters (lt_finetune.lora) before the weights are loaded: the state dict has their parameters.
        restore_lora(self, checkpoint)
        if CHECKPOINT_KEY in checkpoint:
            self.inference = dict(checkpoint[CHECKPOINT_KEY])
            self._check_datamodule_preprocessing()
        # Extra modules (a domain discriminator) exist only while the callback that added them is in the fit: a
        # model loaded for inference, or resumed without that callback, does without them.
        state = checkpoint.get("state_dict", {})
        present = set(trainable_modules(self))
        prefix = EXTRA_MODULES + "."
        dropped = sorted({k.split(".")[1] for k in state if k.startswith(prefix) and k.split(".")[1] not in present})
        if dropped:
            for key in [k for k in state if k.startswith(prefix) and k.split(".")[1] in dropped]:
                del state[key]
            rank_zero_info(f"lt_finetune: the checkpoint's extra modules {dropped} are not used by this model.")

    def _check_checkpoint_matches(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another backbone or head size with the fix, before Lightning's key-by-key error."""
        written = str(checkpoint.get(VERSION_KEY, "0.1.0 or earlier"))
        saved = (checkpoint.get("hyper_parameters") or {}).get("backbone")
        mine = self.hparams.get("backbone")
        if isinstance(saved, str) and isinstance(mine, str) and saved != mine:
            raise ValueError(
                f"The checkpoint was written by TransferModule(backbone={saved!r}); this model has "
                f"backbone={mine!r}. To resume or evaluate it, build the model with backbone={saved!r} "
                "(`TransferModule.load_from_checkpoint(path)` does); to fine-tune another backbone, start without "
                "`ckpt_path`."
            )
        head = (checkpoint.get("state_dict") or {}).get("head.1.weight")
        own: torch.Tensor = self.head[1].weight  # type: ignore[assignment]
        if isinstance(head, torch.Tensor) and head.shape != own.shape:
            raise ValueError(
                f"The checkpoint's head has {head.shape[0]} outputs and {head.shape[1]} input features; this model's "
                f"has {own.shape[0]} and {own.shape[1]}. Build it with the checkpoint's `num_classes` and `task` "
                "(`TransferModule.load_from_checkpoint(path)` reads them from the checkpoint)."
            )
        if _newer(written, __version__):
            rank_zero_warn(
                f"lt_finetune: the checkpoint was written by lt_finetune {written}, newer than this {__version__}; "
                "if it does not load, upgrade (`pip install -U lt_finetune`)."
            )

    @override
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as error:
            missing = sorted(set(self.state_dict()) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(self.state_dict()))
            raise ValueError(
                f"These weights do not fit {type(self).__name__}(backbone={self.hparams.get('backbone')!r}): "
                f"{len(missing)} missing keys ({_shown(missing, 3)}), {len(unexpected)} unexpected "
                f"({_shown(unexpected, 3)}). Was it written with another backbone, head or lt_finetune version? "
                "Build the model with the checkpoint's arguments (`TransferModule.load_from_checkpoint(path)`)."
                f"\n{error}"
            ) from error

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Load a checkpoint offline: the weights come from the checkpoint, so pretrained ones are not loaded.

        Pass ``pretrained=...`` explicitly to override; pass ``backbone=`` when it was an ``nn.Module``.
        """
        kwargs.setdefault("pretrained", False)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)


def _newer(version: str, than: str) -> bool:
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())

    return parts(version) > parts(than)


#: Batches whose targets are range-checked on an accelerator (every batch is on the CPU).
_TARGET_CHECKS = 16


def _check_targets(target: torch.Tensor, num_classes: int) -> None:
    """Class indices outside ``[0, num_classes)`` are a configuration error: say so, not an index error."""
    if target.numel() == 0 or target.is_floating_point():
        return
    low, high = (int(v) for v in torch.aminmax(target))
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"TransferModule(num_classes={num_classes}) got a target class {high if high >= num_classes else low}: "
            f"class indices must lie in [0, {num_classes - 1}]. Set `num_classes` to the number of classes in the "
            "data (with lt_finetune's datamodules the CLI links it from `data.num_classes`)."
        )


def tuple_(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _shown(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _metrics(task: Task, num_classes: int) -> MetricCollection:
    if task == "multiclass":
        metrics: dict[str, Any] = {
            "acc": Accuracy(task="multiclass", num_classes=num_classes),
            "f1": F1Score(task="multiclass", num_classes=num_classes, average="macro"),
        }
        if num_classes >= 5:
            metrics["top5"] = Accuracy(task="multiclass", num_classes=num_classes, top_k=5)
        return _collection(metrics)
    if task == "multilabel":
        return _collection(
            {
                "acc": Accuracy(task="multilabel", num_labels=num_classes),
                "f1": F1Score(task="multilabel", num_labels=num_classes, average="macro"),
            }
        )
    return _collection({"acc": Accuracy(task="binary"), "f1": F1Score(task="binary")})


def _collection(metrics: dict[str, Any]) -> MetricCollection:
    # No compute groups: torchmetrics merges metrics whose states are equal after the first update, and a first
    # batch of one class makes macro F1 and top-5 accuracy look alike; merged, top-5 then reported plain accuracy.
    return MetricCollection(metrics, compute_groups=False)
