"""Under 2-process CPU DDP (gloo), unfreezing keeps the replicas identical and frozen parameters fixed, extra
trainable modules included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_fit.py"


def _run(out: Path, *flags: str) -> tuple[dict, dict]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *flags], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "expected to have finished reduction" not in (result.stdout + result.stderr).lower()
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


@pytest.mark.ddp
def test_replicas_stay_identical_after_unfreezing(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path)
    assert r0["steps"] == r1["steps"] == 12
    assert (r0["params"] - r1["params"]).abs().max().item() <= 1e-6
    assert r0["frozen_moved"] == 0.0 and r1["frozen_moved"] == 0.0
    assert r0["others_moved"] > 0.0  # everything else, unfrozen along the way, trained
    # The extra module added by a callback at setup is registered with DDP: trained, and identical on both ranks.
    assert "extra_modules.discriminator.weight" in r0["names"]
    assert r0["discriminator_moved"] > 0.0 and r0["discriminator_moved"] == r1["discriminator_moved"]
    # Averaged right after the backward, before a 16-bit grad scaler would unscale and look for inf/nan: every
    # rank then reaches the same skip-or-step verdict.
    assert r0["grad_difference_after_backward"] == 0.0


@pytest.mark.ddp
def test_replicas_stay_identical_with_gradient_accumulation(tmp_path: Path) -> None:
    r0, r1 = _run(tmp_path, "--accumulate")
    assert r0["steps"] == r1["steps"] == 12
    assert (r0["params"] - r1["params"]).abs().max().item() <= 1e-6
    assert r0["grad_difference_after_backward"] == 0.0 and r0["others_moved"] > 0.0


@pytest.mark.ddp
def test_without_the_gradient_averaging_replicas_drift(tmp_path: Path) -> None:
    """The check above can fail: parameters frozen when DDP wrapped the model are not averaged by DDP."""
    r0, r1 = _run(tmp_path, "--no-sync")
    assert (r0["params"] - r1["params"]).abs().max().item() > 1e-4
    assert r0["grad_difference_after_backward"] > 1e-6
