"""EMA of the weights, built on Lightning's ``WeightAveraging``, that compose with the fine-tuning policies.

Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` keeps an averaged copy of the model, validates
with it, saves it as the checkpoint's ``state_dict`` (the training weights go to ``current_model_state``) and
restores both on resume. It touches neither the optimizer nor the learning rates, so beside ``FreezeBackbone``,
``GradualUnfreeze`` and ``LayerwiseLR`` the rates stay exactly scheduler x factor, and frozen parameters (and the
running statistics of frozen BatchNorm layers, in eval mode) are constant, so their average is their value. What
:class:`EMA` adds: YAML-friendly arguments, a ``repr`` and a ``state_key`` per configuration (the lt_finetune
callback contract), an averaged copy that leaves out lt_finetune's bookkeeping (the pretrained snapshot, loss
terms), and a refusal of combinations that cannot hold (see :func:`check_weight_averaging`).

Lightning's ``StochasticWeightAveraging`` is refused beside the fine-tuning callbacks: its ``SWALR`` rewrites
every param group's learning rate (off the scheduler x layer-wise factor the policies maintain) and it
re-estimates BatchNorm statistics over the whole network after training, frozen layers included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging, WeightAveraging
from torch import Tensor
from typing_extensions import override

from lt_finetune.policy import LIGHTNING_LOGGING_ATTRS, detach_lightning_logging
from lt_finetune.snapshot import load_snapshots, save_snapshots
from lt_finetune.validation import check_bool, check_float, check_int, check_optional_int

__all__ = ["EMA", "check_weight_averaging"]

# Per-fit bookkeeping lt_finetune keeps on the model: not copied into the averaged model.
_MODULE_ATTRS = ("_lt_finetune_snapshots", "_lt_finetune_loss_terms", "_lt_finetune_loss_term_calls")
_PER_FIT_ATTRS = LIGHTNING_LOGGING_ATTRS


def check_weight_averaging(callbacks: Sequence[Callback]) -> None:
    """Refuse weight-averaging combinations that cannot hold; call it at setup with ``trainer.callbacks``.

    Raises:
        ValueError: For more than one weight-averaging callback (their checkpoint entries would collide), or
            Lightning's ``StochasticWeightAveraging`` beside a fine-tuning policy.
    """
    from lt_finetune.policy import FinetunePolicy

    averaging = [c for c in callbacks if isinstance(c, (WeightAveraging, StochasticWeightAveraging))]
    if len(averaging) > 1:
        raise ValueError(
            f"A fit can average its weights once; found {', '.join(type(c).__name__ for c in averaging)}. Their "
            "averaged weights would overwrite each other in the checkpoint: keep one."
        )
    policies = [type(c).__name__ for c in callbacks if isinstance(c, FinetunePolicy)]
    if policies and any(isinstance(c, StochasticWeightAveraging) for c in averaging):
        raise ValueError(
            f"Lightning's StochasticWeightAveraging cannot run beside {', '.join(policies)}: its SWALR overwrites "
            "the learning rates of every param group (dropping the layer-wise factors and the zeros of frozen "
            "groups) and it re-estimates the BatchNorm statistics of frozen layers. Average with "
            "lt_finetune.callbacks.EMA, which leaves the learning rates to the scheduler and frozen layers alone."
        )


class _Averaging:
    """What EMA adds to Lightning's WeightAveraging (kept first in the MRO)."""

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    @property
    def state_key(self) -> str:
        return Callback._generate_state_key(self, **self.config())  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _PER_FIT_ATTRS}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_weight_averaging(trainer.callbacks)  # type: ignore[attr-defined]
        # The averaged copy is a deepcopy of the model: leave lt_finetune's bookkeeping (θ₀, loss terms bound to
        # callbacks) out of it, so the snapshot is not held twice and the callbacks are not copied.
        held = {name: pl_module.__dict__.pop(name) for name in _MODULE_ATTRS if name in pl_module.__dict__}
        try:
            super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        finally:
            pl_module.__dict__.update(held)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)  # type: ignore[misc]
        save_snapshots(pl_module, checkpoint)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)  # type: ignore[misc]
        load_snapshots(pl_module, checkpoint)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)  # type: ignore[misc]
        detach_lightning_logging(self)


class _EMAUpdate:
    """``decay * average + (1 - decay) * value``: a callable object, so that the callback pickles."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def __call__(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        return self.decay * averaged + (1 - self.decay) * current


class EMA(_Averaging, WeightAveraging):
    """Exponential moving average of the weights: ``avg = decay * avg + (1 - decay) * w`` after optimizer steps.

    Lightning's ``EMAWeightAveraging``, with arguments that pickle and print: validation runs on the
    averaged weights, checkpoints hold them as ``state_dict`` (the training weights under
    ``current_model_state``, restored on resume) and the model ends the fit with them. BatchNorm running statistics
    are averaged too (``use_buffers``).

    Args:
        decay: EMA decay in ``[0, 1)``; the average covers roughly the last ``1 / (1 - decay)`` updates.
        update_every_n_steps: Update the average every this many optimizer steps.
        update_starting_at_step: First optimizer step (0-based) to update at; ``None``: from the first.
        device: Where the averaged copy lives (``"cpu"`` saves accelerator memory); ``None``: the model's device.
        use_buffers: Average the buffers (BatchNorm statistics) too.

    Example::

        >>> from lt_finetune.callbacks import EMA
        >>> EMA(decay=0.99)
        EMA(decay=0.99, update_every_n_steps=1, update_starting_at_step=None, device=None, use_buffers=True)
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        self.decay = check_float("decay", decay, 0.0, 1.0, high_open=True)
        self.device_name = device if device is None else str(device)
        self.use_buffers = check_bool("use_buffers", use_buffers)
        self.update_every_n_steps = check_int("update_every_n_steps", update_every_n_steps, 1)
        self.update_starting_at_step = check_optional_int("update_starting_at_step", update_starting_at_step, 0)
        super().__init__(device=self.device_name, use_buffers=self.use_buffers, avg_fn=_EMAUpdate(self.decay))

    @override
    def config(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "update_every_n_steps": self.update_every_n_steps,
            "update_starting_at_step": self.update_starting_at_step,
            "device": self.device_name,
            "use_buffers": self.use_buffers,
        }

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        # The step rule of Lightning's EMAWeightAveraging. Its epoch-end updates are left out: a checkpoint saved
        # at the last step of an epoch precedes them, so a run resumed from it would miss one.
        if step_idx is None:
            return False
        started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
        return started and step_idx % self.update_every_n_steps == 0
