"""Loss terms: extra losses that callbacks add to the training loss from the step's features and logits.

A loss term is any callable ``term(outputs: StepOutputs) -> Tensor`` (a scalar). A callback registers it with
``pl_module.add_loss_term(name, term)`` in ``setup`` and removes it in ``teardown``; the module computes the
features once per step, calls every term, adds them to the task loss (one backward pass) and logs each as
``train/loss_<name>`` (the task loss alone as ``train/loss_task``, the sum as ``train/loss``). Terms run inside
the step's autocast region: a term that needs full precision (statistics, matrix decompositions) casts its inputs
with ``.float()`` itself.

``TransferModule`` does all this. A LightningModule of your own gets it from :class:`LossTermsMixin`: build a
:class:`StepOutputs` in ``training_step`` and return ``self.apply_loss_terms(loss, outputs)``.

Batches: :func:`split_batch` reads ``(x, y, *rest)`` tuples and the dicts of Lightning's ``CombinedLoader``:
``{"source": (x, y, ...), "<stream>": x or (x, ...)}``, where ``"source"`` is labelled and every other key is an
unlabelled stream (a target domain), whose labels, if any, are not used for training.

Example::

    >>> import torch
    >>> from torch import nn
    >>> class Module(LossTermsMixin, nn.Module):
    ...     pass
    >>> module = Module()
    >>> module.add_loss_term("logit_norm", lambda out: 0.1 * out.logits.pow(2).mean())
    >>> logits = torch.ones(4, 3)
    >>> outputs = StepOutputs(features=torch.zeros(4, 2), logits=logits, target=torch.zeros(4).long())
    >>> module.apply_loss_terms(torch.tensor(1.0), outputs)
    tensor(1.1000)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["LossTerm", "LossTermsMixin", "StepOutputs", "StreamOutputs", "split_batch"]


@dataclass
class StreamOutputs:
    """Features and logits of an unlabelled stream of the batch (a target domain)."""

    inputs: Tensor
    features: Tensor
    logits: Tensor
    labels: Tensor | None = None  # present in the data, never used for training


@dataclass
class StepOutputs:
    """What a training step computed, handed to every loss term.

    Attributes:
        features: Pooled features of the labelled inputs ``[B, D]``.
        logits: Logits of the labelled inputs ``[B, C]``.
        target: Targets of the labelled inputs (class indices, or soft targets after Mixup/CutMix).
        inputs: The labelled inputs.
        streams: Unlabelled streams by name (``"target"`` for domain adaptation), computed in the same forward pass.
        batch: The batch as the loader gave it.
        stage: ``"train"``.
    """

    features: Tensor
    logits: Tensor
    target: Tensor | None = None
    inputs: Tensor | None = None
    streams: dict[str, StreamOutputs] = field(default_factory=dict)
    batch: Any = None
    stage: str = "train"


LossTerm = Callable[[StepOutputs], Tensor]


class LossTermsMixin:
    """Registered loss terms for a LightningModule (or any ``nn.Module``): add, remove, apply and log them."""

    def add_loss_term(self, name: str, term: LossTerm) -> None:
        """Register ``term`` under ``name`` (logged as ``train/loss_<name>``).

        Raises:
            ValueError: If ``name`` is empty, not a string, or already registered.
            TypeError: If ``term`` is not callable.
        """
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Expected `name` to be a non-empty string without '/', got {name!r}.")
        if not callable(term):
            raise TypeError(f"Expected `term` to be callable (StepOutputs -> Tensor), got {type(term).__name__}.")
        terms = self._terms()
        if name in terms:
            raise ValueError(
                f"A loss term named {name!r} is registered already on {type(self).__name__}; give the second one "
                "another name, or remove the first with remove_loss_term()."
            )
        terms[name] = term

    def remove_loss_term(self, name: str) -> LossTerm | None:
        """Unregister the term ``name``; returns it (``None`` if there was none)."""
        return self._terms().pop(name, None)

    @property
    def loss_terms(self) -> dict[str, LossTerm]:
        """The registered terms by name, in registration order (a copy)."""
        return dict(self._terms())

    @property
    def loss_term_calls(self) -> int:
        """How many times :meth:`apply_loss_terms` has run (callbacks use it to check that a step calls it)."""
        return int(self.__dict__.get("_lt_finetune_loss_term_calls", 0))

    def apply_loss_terms(self, loss: Tensor, outputs: StepOutputs) -> Tensor:
        """``loss`` plus every registered term of ``outputs``; logs each term when running under a Trainer."""
        self.__dict__["_lt_finetune_loss_term_calls"] = self.loss_term_calls + 1
        terms = self._terms()
        if not terms:
            return loss
        values = {name: term(outputs) for name, term in terms.items()}
        total = loss
        for name, value in values.items():
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"Loss term {name!r} returned {type(value).__name__}"
                    f"{'' if not isinstance(value, Tensor) else ' of shape ' + str(list(value.shape))}; "
                    "a loss term returns a scalar tensor."
                )
            total = total + value.reshape(())
        log = getattr(self, "log", None)
        if callable(log) and getattr(self, "_trainer", None) is not None:
            batch_size = len(outputs.logits)
            stage = outputs.stage
            log(f"{stage}/loss_task", loss.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
            for name, value in values.items():
                log(f"{stage}/loss_{name}", value.detach(), on_step=False, on_epoch=True, batch_size=batch_size)
        return total

    def _terms(self) -> dict[str, LossTerm]:
        terms: dict[str, LossTerm] = self.__dict__.setdefault("_lt_finetune_loss_terms", {})
        return terms


def split_batch(batch: Any) -> tuple[Tensor, Any, dict[str, tuple[Tensor, Tensor | None]]]:
    """``(inputs, target, streams)`` of a batch; ``streams`` maps unlabelled stream names to ``(inputs, labels)``.

    Accepts ``(x, y, *rest)`` tuples and lists, and dicts ``{"source": (x, y, ...), "<stream>": x or (x, ...)}``.

    Raises:
        ValueError: For a dict without ``"source"``, or a batch that is neither a sequence of at least two items
            nor such a dict.

    Example::

        >>> import torch
        >>> x, y, streams = split_batch({"source": (torch.zeros(2, 3), torch.ones(2)), "target": [torch.zeros(5, 3)]})
        >>> x.shape, y.shape, {k: v[0].shape for k, v in streams.items()}
        (torch.Size([2, 3]), torch.Size([2]), {'target': torch.Size([5, 3])})
    """
    if isinstance(batch, Mapping):
        if "source" not in batch:
            raise ValueError(
                f"Expected a dict batch to have the labelled stream under 'source', got keys {sorted(batch)}: "
                "name the labelled loader 'source' in the CombinedLoader, e.g. "
                "CombinedLoader({'source': labelled, 'target': unlabelled}, 'max_size_cycle')."
            )
        x, y, _ = split_batch(batch["source"])
        streams: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, value in batch.items():
            if name == "source":
                continue
            if isinstance(value, Tensor):
                streams[name] = (value, None)
            elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
                labels = value[1] if len(value) > 1 and isinstance(value[1], Tensor) else None
                streams[name] = (value[0], labels)
            else:
                raise ValueError(
                    f"Expected the batch's stream {name!r} to be a tensor or a tuple starting with one, "
                    f"got {type(value).__name__}."
                )
        return x, y, streams
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1], {}
    raise ValueError(
        f"Expected a batch `(inputs, targets, ...)` or a dict with a 'source' stream, got {type(batch).__name__}"
        f"{' of length ' + str(len(batch)) if isinstance(batch, (list, tuple)) else ''}."
    )
