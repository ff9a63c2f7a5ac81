"""Messages for the user, on rank zero, kept off the progress bar's line."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tqdm import tqdm


def info(message: str, trainer: pl.Trainer | None = None) -> None:
    """Log ``message`` once, on rank zero.

    While ``trainer``'s progress bar is drawn, the message is printed above the bar (``tqdm.write``, or Rich's
    console), as the bar's own ``print`` does; a plain log record would land on the bar's line and be overwritten.
    """
    if trainer is not None:
        if not trainer.is_global_zero:
            return
        bar = trainer.progress_bar_callback
        if _drawing(bar):
            bar.print(message)  # type: ignore[union-attr]
            return
    rank_zero_info(message)


def _drawing(bar: object) -> bool:
    if isinstance(bar, TQDMProgressBar):
        return bar.is_enabled and any(not getattr(live, "disable", True) for live in list(tqdm._instances))
    return isinstance(bar, RichProgressBar) and bar.is_enabled
