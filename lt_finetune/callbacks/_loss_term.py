"""The shared base of the callbacks that add a loss term (L2SP, BSS): registration, checks, repr and state key."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lt_finetune.loss_terms import StepOutputs
from lt_finetune.policy import LIGHTNING_LOGGING_ATTRS, detach_lightning_logging
from lt_finetune.snapshot import load_snapshots, save_snapshots

_PER_FIT_ATTRS = ("_module", *LIGHTNING_LOGGING_ATTRS)


class LossTermCallback(pl.Callback):
    """Registers :meth:`term` as the loss term :attr:`term_name` for the fit and checks that the step applies it.

    Subclasses set :attr:`term_name`, implement :meth:`term` and :meth:`config` (the constructor arguments).
    """

    term_name = "term"

    def __init__(self) -> None:
        self._module: pl.LightningModule | None = None
        self._calls_at_start = 0
        self._checked = False

    def config(self) -> dict[str, Any]:
        """The constructor arguments, by name: they give ``repr`` and ``state_key``."""
        return {}

    def term(self, outputs: StepOutputs) -> Tensor:
        """The loss term of one training step."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.config())

    def __getstate__(self) -> dict[str, Any]:
        # The model of a running fit (and Lightning's `log`/`log_dict`, bound to it) is not part of the callback.
        return {k: v for k, v in self.__dict__.items() if k not in _PER_FIT_ATTRS} | {"_module": None}

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checks and bookkeeping of ``setup``, before the term is registered (override to add some)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        owner = type(self).__name__
        if not callable(getattr(pl_module, "add_loss_term", None)):
            raise ValueError(
                f"{owner} adds a loss term, and {type(pl_module).__name__} does not take loss terms. Use "
                "TransferModule, or mix lt_finetune.loss_terms.LossTermsMixin into your module and return "
                "self.apply_loss_terms(loss, StepOutputs(...)) from training_step (docs/extending.md)."
            )
        self.attach(trainer, pl_module)
        self._module = pl_module
        pl_module.add_loss_term(self.term_name, self.term)  # type: ignore[operator]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._calls_at_start = int(getattr(pl_module, "loss_term_calls", 0))
        self._checked = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._checked:
            return
        self._checked = True
        if int(getattr(pl_module, "loss_term_calls", 0)) == self._calls_at_start:
            raise ValueError(
                f"{type(self).__name__}'s loss term was never applied: {type(pl_module).__name__}.training_step "
                "does not call apply_loss_terms. Return self.apply_loss_terms(loss, StepOutputs(...)) from it."
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_snapshots(pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        load_snapshots(pl_module, checkpoint)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._end_fit(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit(pl_module)

    def _end_fit(self, pl_module: pl.LightningModule) -> None:
        remove = getattr(pl_module, "remove_loss_term", None)
        terms = getattr(pl_module, "loss_terms", {})
        if callable(remove) and terms.get(self.term_name) == self.term:
            remove(self.term_name)
        self._module = None
        detach_lightning_logging(self)
