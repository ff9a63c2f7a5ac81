"""AdaBN (Li et al., 2016): BatchNorm statistics re-estimated on unlabelled target data, for evaluating on target.

The weights stay as trained; only the running means and variances change, to the target domain's. The context
manager restores the source statistics afterwards, so training (and source evaluation) is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["batchnorm_layers", "target_batchnorm"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _inputs(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(f"Expected target batches to be tensors or tuples starting with one, got {type(batch).__name__}.")


@contextmanager
def target_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[Tensor], Any] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[int]:
    """Within the block, the BatchNorm layers of ``model`` hold statistics of ``batches`` (the target domain).

    The statistics are plain averages of the batches' statistics (``momentum=None``), computed in one no-grad pass
    with only the BatchNorm layers in training mode (dropout stays off). On exit the previous statistics, momenta
    and modes are restored. Yields the number of batches used (0 when the model has no BatchNorm layer: nothing
    changes).

    Args:
        model: The model whose BatchNorm layers adapt.
        batches: Target batches: tensors or tuples whose first entry is the input.
        forward: What to run on each input (default ``model``): e.g. only the feature extractor.
        device: Where to move inputs (default: the device of the model's first parameter).

    Example::

        >>> net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(2)).eval()
        >>> with target_batchnorm(net, [torch.randn(8, 2) + 5]):
        ...     bool(net[1].running_mean.min() > 3)
        True
        >>> net[1].running_mean.tolist()
        [0.0, 0.0]
    """
    layers = batchnorm_layers(model)
    if not layers:
        yield 0
        return
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)  # type: ignore[union-attr]
        for m in layers
    ]
    modes = {m: m.training for m in model.modules()}
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else "cpu"
    run = forward or model
    used = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                run(_inputs(batch).to(device))
                used += 1
        for m in layers:
            m.eval()
        yield used
    finally:
        for m, (mean, var, count, momentum, _) in zip(layers, saved):
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
            m.num_batches_tracked.copy_(count)  # type: ignore[union-attr]
            m.momentum = momentum
        for module, training in modes.items():
            module.training = training
