"""Sections 1 and 2: step time of lt_finetune's callbacks against the same trainable set frozen by hand, and how
much of freezing's speed-up each approach keeps.

Every configuration trains the same ImageNet MobileNetV2 on the same Animal-MNIST batches (64 px, batch 64, seed
0). One repeat of a configuration is a short ``fit``: the first steps are warm-up, the next ones are timed
start to start (:class:`~benchmarks.common.StepTimer`). Configurations are interleaved (A B C ... A B C ...),
and each is summarised by the median over repeats of its per-repeat median step time.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl

from benchmarks.common import Settings, StepTimer, make_trainer, median, scratch_dir, weights_path
from benchmarks.configs import CONFIGS
from lt_finetune.data.animal_mnist import AnimalMNISTDataModule

#: Section 1: (label, lt_finetune configuration, the same trainable set in plain Lightning).
OVERHEAD_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("Backbone frozen (linear probe)", "ours_frozen", "hand_frozen"),
    ("Top 10 of 19 groups trainable (GradualUnfreeze stage)", "ours_partial", "hand_partial"),
    ("Everything trainable, after FreezeBackbone unfroze it", "ours_full", "plain_full"),
    ("Everything trainable, LayerwiseLR(decay=0.8)", "ours_layerwise", "plain_full"),
)
#: Section 2: (label, frozen configuration, full configuration).
SPEEDUP_ROWS: tuple[tuple[str, str, str], ...] = (
    ("By hand (plain Lightning, BatchNorm in eval)", "hand_frozen", "plain_full"),
    ("lt_finetune FreezeBackbone", "ours_frozen", "ours_full"),
    ("Lightning BackboneFinetuning (frozen phase)", "bf_frozen", "plain_full"),
    ("finetuning-scheduler (phase 0)", "fts_phase0", "plain_full"),
)


def needed_configs(sections: set[int]) -> list[str]:
    """Configurations the requested sections need, in a fixed interleaving order."""
    names: list[str] = []
    rows = [pair[1:] for pair in OVERHEAD_PAIRS] if 1 in sections else []
    rows += [row[1:] for row in SPEEDUP_ROWS] if 2 in sections else []
    for row in rows:
        for name in row:
            if name not in names and CONFIGS[name].available():
                names.append(name)
    return names


def time_config(name: str, datamodule: pl.LightningDataModule, warmup: int, steps: int, weights: str) -> list[float]:
    """One repeat: build the configuration, fit ``warmup + steps`` steps, return the timed steps' durations."""
    config = CONFIGS[name]
    pl.seed_everything(0, verbose=False)
    root = scratch_dir()
    model, callbacks = config.build(weights, root)
    timer = StepTimer()
    skip = warmup + config.warmup_extra
    trainer = make_trainer(root, [timer, *callbacks], max_epochs=1, limit_train_batches=skip + steps + 1)
    trainer.fit(model, datamodule=datamodule)
    times = timer.step_times(skip)
    if len(times) != steps:
        raise RuntimeError(f"{name}: expected {steps} timed steps, got {len(times)}")
    return times


def run(settings: Settings, sections: set[int], log: Any = print) -> dict[str, Any]:
    """Time every needed configuration, interleaved; returns raw step times and the per-config summaries."""
    names = needed_configs(sections)
    weights = weights_path()
    per_class = max(200, (settings.timing_warmup + settings.timing_steps + 2) * 64 // 10 + 1)
    datamodule = AnimalMNISTDataModule(train_per_class=per_class, val_per_class=1, test_per_class=200, seed=0)
    datamodule.setup("fit")
    raw: dict[str, list[list[float]]] = {name: [] for name in names}
    for repeat in range(settings.timing_repeats):
        start = time.perf_counter()
        for name in names:
            raw[name].append(time_config(name, datamodule, settings.timing_warmup, settings.timing_steps, weights))
        log(f"  timing round {repeat + 1}/{settings.timing_repeats}: {time.perf_counter() - start:.0f} s")
    summary = {name: median(median(r) for r in repeats) for name, repeats in raw.items()}
    return {
        "configs": {name: CONFIGS[name].label for name in names},
        "raw_step_times": raw,
        "median_step_time": summary,
        "overhead_pairs": [p for p in OVERHEAD_PAIRS if p[1] in raw and p[2] in raw] if 1 in sections else [],
        "speedup_rows": [r for r in SPEEDUP_ROWS if r[1] in raw and r[2] in raw] if 2 in sections else [],
        "protocol": {
            "image_size": 64,
            "batch_size": 64,
            "warmup_steps": settings.timing_warmup,
            "timed_steps": settings.timing_steps,
            "repeats": settings.timing_repeats,
        },
    }
