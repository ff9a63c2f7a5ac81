"""Under 2-process CPU DDP (gloo): L2SP, BSS and EMA beside LPFT and GradualUnfreeze keep the replicas and their
averages identical, and θ₀ is the pretrained start on every rank, also after resuming."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_regularizers.py"


def _run(out: Path, *flags: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *flags], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.ddp
def test_regularizers_and_ema_under_ddp_with_resume(tmp_path: Path) -> None:
    _run(tmp_path)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["steps"] == r1["steps"] == 12
    assert torch.equal(r0["params"], r1["params"])  # the averages (EMA) are identical on both ranks
    assert r0["theta0_exact"] and r1["theta0_exact"]
    assert 0.0 < r0["distance"] == r1["distance"]
    _run(tmp_path, "--resume", str(tmp_path / "ckpt" / "step=8.ckpt"))
    s0, s1 = torch.load(tmp_path / "rank0_resumed.pt"), torch.load(tmp_path / "rank1_resumed.pt")
    assert s0["theta0_exact"] and s1["theta0_exact"]  # restored from the checkpoint, not the perturbed weights
    assert torch.equal(s0["params"], s1["params"])
    assert torch.allclose(
        s0["params"], r0["params"], atol=1e-6
    )  # resumed at an epoch boundary: ends where the uninterrupted run did
