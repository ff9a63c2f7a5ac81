"""SlimCheckpoint: checkpoints that leave out the frozen pretrained weights and name where to find them."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lt_finetune.policy import LIGHTNING_LOGGING_ATTRS, detach_lightning_logging
from lt_finetune.slim import PretrainedSource, attach_plan, detach_plan, plan_slim, pretrained_source

__all__ = ["SlimCheckpoint"]


class SlimCheckpoint(pl.Callback):
    """Save only what the fit changed: the pretrained tensors that stay as loaded are referred to, not stored.

    At fit start (after a resumed fit has restored its weights) the backbone is compared with its pretrained
    source, re-created from ``TransferModule``'s ``backbone`` name and ``pretrained`` weights file. Every checkpoint
    of the fit (``ModelCheckpoint``, ``trainer.save_checkpoint`` during the fit, ``save_weights_only`` ones too)
    then leaves out each backbone tensor that is not trainable and still bit-equal to its source tensor, and the
    copies of them in the pretrained snapshot; it keeps every parameter with ``requires_grad``, every buffer that
    moved (BatchNorm statistics in training mode), adapters (LoRA), the head, the optimizer, schedulers and loops.
    It records the source and a digest of every tensor left out (``lt_finetune.slim``).

    ``TransferModule.load_from_checkpoint`` and ``trainer.fit(model, ckpt_path=...)`` fill the tensors back in
    before the weights load: from the model itself when it was built with the same ``pretrained`` file (as when
    resuming), else from the recorded source, re-created. The digests must match: weights other than the ones the
    checkpoint was trained from are refused with an error, and a missing weights file says which file to pass.

    Off by default: a slim checkpoint is not self-contained, it needs the pretrained weights at load time. Other
    LightningModules, and ``TransferModule`` with a module backbone or random initialisation (no source to refer
    to), get full checkpoints (logged once). It takes no arguments; the pretrained part is ``TransferModule``'s
    ``backbone``.

    Raises:
        FileNotFoundError: At fit start, if the pretrained weights file is gone (slim checkpoints could not be
            loaded).

    Example::

        >>> from lt_finetune.callbacks import SlimCheckpoint
        >>> SlimCheckpoint()
        SlimCheckpoint()
    """

    backbone = "backbone"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in LIGHTNING_LOGGING_ATTRS}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = self._source(pl_module)
        if source is None:
            return
        start = time.perf_counter()
        try:
            reference = source.load()
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"SlimCheckpoint refers checkpoints to {source.describe()}, but {err}: they could not be loaded. "
                "Restore the file, or remove SlimCheckpoint to write full checkpoints."
            ) from err
        plan = plan_slim(pl_module, source, self.backbone, reference)
        attach_plan(pl_module, plan)
        size = sum(reference[src].numel() * reference[src].element_size() for src, _ in plan.pristine.values())
        total = len(pl_module.get_submodule(self.backbone).state_dict())
        rank_zero_info(
            f"SlimCheckpoint: {len(plan.pristine)} of {total} backbone tensors ({size / 2**20:.1f} MB) hold the "
            f"pretrained values of {source.describe()}; checkpoints leave them out while they stay frozen and "
            f"unchanged (compared in {time.perf_counter() - start:.1f} s)."
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            detach_plan(pl_module)
            detach_lightning_logging(self)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        detach_plan(pl_module)
        detach_lightning_logging(self)

    def _source(self, pl_module: pl.LightningModule) -> PretrainedSource | None:
        from lt_finetune.module import TransferModule

        if not isinstance(pl_module, TransferModule):
            rank_zero_info(
                f"SlimCheckpoint: {type(pl_module).__name__} is not a TransferModule, which restores slim checkpoints; "
                "checkpoints stay full."
            )
            return None
        source = pretrained_source(pl_module)
        if source is None:
            rank_zero_info(
                "SlimCheckpoint: the backbone has no pretrained source to refer to (a module backbone, or "
                "pretrained=False); checkpoints stay full."
            )
        return source
