"""Killed runs: SIGKILL mid-epoch, resume from ``last.ckpt``, same result; a kill during a save loses nothing.

The subprocess tests run ``tests/scripts/killable_fit.py``; the unit tests check :class:`AtomicCheckpointIO` alone.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import torch

from lt_finetune import TransferModule
from lt_finetune.checkpoint_io import PARTIAL_SUFFIX, AtomicCheckpointIO

SCRIPT = Path(__file__).parent / "scripts" / "killable_fit.py"
_spec = importlib.util.spec_from_file_location("killable_fit", SCRIPT)
assert _spec is not None and _spec.loader is not None
killable_fit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(killable_fit)


def _run(root: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(root), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _start_and_kill_when(root: Path, marker: str, *args: str) -> None:
    """Start the script in its own process group, SIGKILL the group (loader workers too) once ``marker`` exists."""
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(root), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (root / marker).exists():
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout is not None else ""
                pytest.fail(f"the fit ended (exit {process.returncode}) before {marker}:\n{output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {marker} after 240 s")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        if process.stdout is not None:
            process.stdout.close()
    assert process.returncode == -signal.SIGKILL


def _params(path: Path) -> torch.Tensor:
    model = TransferModule.load_from_checkpoint(path, backbone=killable_fit.tiny_backbone())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path: Path, animal_mnist: None) -> None:
    _run(tmp_path / "full")
    killed = tmp_path / "killed"
    # Killed during step 8, the third batch of epoch 1, after the checkpoint of step 6; loader workers on.
    _start_and_kill_when(killed, "hanging", "--hang-at", "7", "--workers", "2")
    last = killed / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 6
    assert not list(killed.glob(f"ckpt/*{PARTIAL_SUFFIX}"))
    _run(killed, "--resume", str(last), "--workers", "2")
    assert torch.equal(_params(tmp_path / "full" / "final.ckpt"), _params(killed / "final.ckpt"))


@pytest.mark.slow
def test_a_kill_during_a_save_keeps_the_previous_last_checkpoint(tmp_path: Path, animal_mnist: None) -> None:
    _start_and_kill_when(tmp_path, "saving", "--slow-last-save-at", "4")
    last, partial = tmp_path / "ckpt" / "last.ckpt", tmp_path / "ckpt" / f"last.ckpt{PARTIAL_SUFFIX}"
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the previous one, whole
    assert torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)["global_step"] == 4
    with pytest.raises((RuntimeError, OSError)):  # the interrupted save: truncated, beside the target
        torch.load(partial, weights_only=False)
    _run(tmp_path, "--resume", str(last))  # the run goes on from it; the next save replaces the partial file
    assert torch.load(last, weights_only=False)["global_step"] == 14 and not partial.exists()  # saved every 2 steps
    assert torch.load(tmp_path / "final.ckpt", weights_only=False)["global_step"] == 15


class _FailingHalfway(AtomicCheckpointIO):
    def _write(self, checkpoint: dict[str, Any], file: IO[bytes]) -> None:
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt


@pytest.mark.parametrize("fsync", [True, False])
def test_an_interrupted_save_leaves_the_target_whole(tmp_path: Path, fsync: bool) -> None:
    target = tmp_path / "sub" / "last.ckpt"
    AtomicCheckpointIO(fsync=fsync).save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(KeyboardInterrupt):
        _FailingHalfway(fsync=fsync).save_checkpoint({"step": 2}, target)
    assert AtomicCheckpointIO().load_checkpoint(target)["step"] == 1
    assert (tmp_path / "sub" / f"last.ckpt{PARTIAL_SUFFIX}").read_bytes() == b"half a checkpoint"
    AtomicCheckpointIO(fsync=fsync).save_checkpoint({"step": 3}, target)
    assert AtomicCheckpointIO().load_checkpoint(target)["step"] == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_arguments_are_checked_like_lightning() -> None:
    with pytest.raises(TypeError, match="fsync"):
        AtomicCheckpointIO(fsync="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options={"a": 1})
    assert repr(AtomicCheckpointIO(fsync=False)) == "AtomicCheckpointIO(fsync=False)"
