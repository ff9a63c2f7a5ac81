"""The pretrained snapshot θ₀: a backbone's weights before fine-tuning, for L2-SP, WiSE-FT and other techniques.

:func:`pretrained_snapshot` takes it once per backbone, when first asked for (call it right after building the
model, or let the callback that needs it call it at the start of its first fit), and keeps it on the CPU: no
second copy on the accelerator unless :meth:`PretrainedSnapshot.to` is asked for one (then it is cached). It is
saved in checkpoints by ``TransferModule`` and by every lt_finetune callback, and a resumed fit gets the saved
snapshot back, so the pretrained start survives resuming (the weights at resume time are not θ₀).

Example::

    >>> from torch import nn
    >>> model = nn.Module()
    >>> model.backbone = nn.Linear(2, 2)
    >>> snapshot = pretrained_snapshot(model)
    >>> with torch.no_grad():
    ...     _ = model.backbone.weight.add_(1.0)
    >>> torch.allclose(model.backbone.weight - snapshot["weight"], torch.ones(2, 2))
    True
    >>> pretrained_snapshot(model) is snapshot  # taken once
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CHECKPOINT_KEY", "PretrainedSnapshot", "load_snapshots", "pretrained_snapshot", "save_snapshots"]

#: Key of the snapshots in a checkpoint: ``{backbone path: {parameter name: tensor}}``.
CHECKPOINT_KEY = "lt_finetune_pretrained_snapshots"
_ATTR = "_lt_finetune_snapshots"


class PretrainedSnapshot(Mapping[str, Tensor]):
    """Read-only copy of a module's parameters, by name relative to that module, on the CPU.

    Args:
        tensors: Parameter name -> tensor; copied, detached, to the CPU.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self._tensors = {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}
        self._on: dict[torch.device, dict[str, Tensor]] = {}

    @classmethod
    def capture(cls, module: nn.Module) -> PretrainedSnapshot:
        """Snapshot ``module``'s parameters now."""
        return cls(dict(module.named_parameters()))

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def to(self, device: torch.device | str) -> dict[str, Tensor]:
        """The snapshot on ``device`` (one cached copy per device; the CPU tensors themselves for the CPU)."""
        device = torch.device(device)
        if device.type == "cpu":
            return dict(self._tensors)
        if device not in self._on:
            self._on[device] = {name: t.to(device) for name, t in self._tensors.items()}
        return self._on[device]

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors, for a checkpoint."""
        return dict(self._tensors)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the tensors (and drop device copies)."""
        self._tensors = {name: t.detach().to("cpu", copy=True) for name, t in state.items()}
        self._on = {}

    def __repr__(self) -> str:
        count = sum(t.numel() for t in self._tensors.values())
        return f"PretrainedSnapshot({len(self)} tensors, {count} values)"


def pretrained_snapshot(pl_module: nn.Module, backbone: str = "backbone") -> PretrainedSnapshot:
    """The snapshot of ``pl_module``'s sub-module ``backbone``, taken now if this is the first request.

    Raises:
        AttributeError: If ``pl_module`` has no sub-module at ``backbone``.
    """
    snapshots: dict[str, PretrainedSnapshot] = pl_module.__dict__.setdefault(_ATTR, {})
    if backbone not in snapshots:
        module = pl_module.get_submodule(backbone)
        snapshots[backbone] = PretrainedSnapshot.capture(module)
    return snapshots[backbone]


def save_snapshots(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Put ``pl_module``'s snapshots into ``checkpoint`` (from ``on_save_checkpoint``); idempotent."""
    snapshots: dict[str, PretrainedSnapshot] = pl_module.__dict__.get(_ATTR, {})
    if snapshots:
        checkpoint[CHECKPOINT_KEY] = {path: s.state_dict() for path, s in snapshots.items()}


def load_snapshots(pl_module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Restore snapshots saved in ``checkpoint`` onto ``pl_module`` (from ``on_load_checkpoint``); idempotent."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if not saved:
        return
    snapshots: dict[str, PretrainedSnapshot] = pl_module.__dict__.setdefault(_ATTR, {})
    for path, tensors in saved.items():
        if path in snapshots:
            snapshots[path].load_state_dict(tensors)
        else:
            snapshots[path] = PretrainedSnapshot(tensors)
