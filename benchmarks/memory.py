"""Section 4: peak memory of training with a frozen backbone vs full fine-tuning.

Each configuration runs in a fresh process (:mod:`benchmarks.worker`): after the model, data and Trainer are built,
the peak-RSS counter is reset (Linux ``/proc/self/clear_refs``), a few training steps run, and ``VmHWM`` is read.
Reported: the whole process' peak RSS, and the training increment (peak minus the RSS just before ``fit``). On a
GPU machine the CUDA peak would be recorded as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, Settings, median
from benchmarks.configs import CONFIGS

#: (configuration, what it stands for); ratios are taken against ``plain_full``.
MEMORY_CONFIGS: tuple[str, ...] = ("plain_full", "ours_frozen", "hand_frozen", "bf_frozen", "fts_phase0")


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Probe each configuration ``repeats`` times, interleaved, each in a fresh process."""
    names = [n for n in MEMORY_CONFIGS if CONFIGS[n].available()]
    repeats = 3 if settings.mode == "full" else 1
    probes: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for name in names:
                out = Path(tmp) / f"{name}.json"
                cmd = [sys.executable, "-m", "benchmarks.worker", "memory", str(out), "--config", name]
                cmd += ["--steps", str(settings.memory_steps)]
                result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if result.returncode != 0 or not out.is_file():
                    raise RuntimeError(f"memory probe failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
                probes[name].append(json.loads(out.read_text()))
    summary = {
        n: {
            "peak_rss": median(p["peak_rss"] for p in runs),
            "rss_before": median(p["rss_before"] for p in runs),
            "training_peak": median(p["peak_rss"] - p["rss_before"] for p in runs),
            "cuda_peak": runs[0]["cuda_peak"],
        }
        for n, runs in probes.items()
    }
    for n, s in summary.items():
        log(f"  {n:<12} peak RSS {s['peak_rss'] / 2**20:.0f} MiB, training +{s['training_peak'] / 2**20:.0f} MiB")
    return {
        "configs": {n: CONFIGS[n].label for n in names},
        "probes": probes,
        "summary": summary,
        "steps": settings.memory_steps,
        "repeats": repeats,
        "reference": "plain_full",
    }
