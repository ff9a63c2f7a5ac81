"""Section 3: step time under 2-process CPU DDP, our unfreezing mechanism vs plain DDP.

lt_finetune freezes before DDP wraps the model, so DDP registers only what is trainable then; parameters unfrozen
later get their gradients averaged by lt_finetune, one ``all_reduce`` per step in ``on_before_optimizer_step``.
"ours" is ``FreezeBackbone(unfreeze_at_step=1)`` (the backbone unfrozen after DDP wrapped the model); "plain" is the
same TransferModule with every parameter trainable from the start, so DDP's own bucketed all-reduce handles all.
Both are interleaved inside one DDP launch (:mod:`benchmarks.worker`), and steps are timed after unfreezing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Settings, median


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Launch the worker (rank 0 re-launches the script for rank 1) and summarise its step times."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "benchmarks.worker", "ddp-overhead", str(out)]
        cmd += ["--repeats", str(settings.ddp_repeats), "--warmup", str(settings.ddp_warmup)]
        cmd += ["--steps", str(settings.ddp_steps)]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            raise RuntimeError(f"DDP run failed: {' '.join(cmd)}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
        data: dict[str, Any] = json.loads(out.read_text())
    data["median_step_time"] = {k: median(median(r) for r in v) for k, v in data["raw_step_times"].items()}
    data["protocol"] = {
        "processes": 2,
        "backend": "gloo",
        "batch_size_per_process": 64,
        "warmup_steps_after_unfreezing": settings.ddp_warmup,
        "timed_steps": settings.ddp_steps,
        "repeats": settings.ddp_repeats,
    }
    ratio = data["median_step_time"]["ours"] / data["median_step_time"]["plain"]
    log(f"  DDP ours/plain step time: {ratio:.3f}")
    return data
