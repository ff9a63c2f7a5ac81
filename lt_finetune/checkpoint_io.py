"""AtomicCheckpointIO: checkpoints written beside their target and renamed into place, so a kill never truncates one.

Lightning 2.6's ``TorchCheckpointIO`` serialises the checkpoint in memory and writes it through an fsspec transaction
whose temporary file lives in the system temporary folder (``$TMPDIR``); committing moves it to the target with
``shutil.move``. On one filesystem that is an atomic rename. When the temporary folder is on another filesystem
(a ``tmpfs``, a container volume, a cluster's scratch space), the move copies the bytes into the target file itself,
and a run killed during the copy leaves a truncated ``last.ckpt`` where the previous good one was. Neither path
flushes the file to disk before renaming it.

:class:`AtomicCheckpointIO` always writes the temporary file in the target's own folder, flushes it to disk, and
replaces the target with ``os.replace``, which is atomic on one filesystem: at every instant the target is either
the complete previous checkpoint or the complete new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lt_finetune.validation import check_bool

__all__ = ["PARTIAL_SUFFIX", "AtomicCheckpointIO"]

#: Appended to a checkpoint's file name while it is written; a run killed mid-save leaves ``<name>.partial``.
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save checkpoints atomically: write ``<name>.partial`` beside the target, flush it, rename it over the target.

    A run killed at any moment of a save keeps the previous file at the target intact (``ModelCheckpoint``'s
    ``last.ckpt`` among them), so ``fit(ckpt_path="last")`` always finds a complete checkpoint. What a kill can leave
    is a ``<name>.partial`` file, which no checkpoint search matches and the next save to that name replaces.
    Loading and removing are Lightning's. Remote paths (``s3://`` and the like) are saved by Lightning as before.

    With ``ModelCheckpoint(save_last=True)`` the last checkpoint is a file written this way. Avoid
    ``save_last="link"`` where atomicity matters: Lightning deletes the old link before it creates the new one.

    Args:
        fsync: Flush each checkpoint, and the folder entry of its new name, to disk before the save returns, so that
            a machine that loses power also keeps a complete checkpoint. ``False`` still protects against a killed
            process (the operating system finishes writing what it was given), and saves faster.

    Raises:
        TypeError: If ``fsync`` is not a bool.

    Example::

        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False)  # doctest: +SKIP

    In a LightningCLI config::

        trainer:
          plugins:
            - class_path: lt_finetune.checkpoint_io.AtomicCheckpointIO
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = check_bool("fsync", fsync)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fsync={self.fsync})"

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (local paths), else as ``TorchCheckpointIO`` does.

        Raises:
            TypeError: If ``storage_options`` is given (as ``TorchCheckpointIO``).
        """
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as file:
            self._write(checkpoint, file)
            file.flush()
            if self.fsync:
                os.fsync(file.fileno())
        os.replace(partial, target)
        if self.fsync:
            _fsync_folder(target.parent)

    def _write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temporary ``file`` (as Lightning does, with ``torch.save``)."""
        torch.save(checkpoint, file)


def _fsync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (the rename) to disk, where the platform allows opening a folder."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are flushed with the file
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
