"""LPFT: the probe freezes the backbone, the fine-tuning phase trains everything at a lower, warmed-up rate, on
top of the scheduler, and resumes mid-warm-up exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ForeignModule, LRRecorder, trainer
from torch.optim import lr_scheduler as S

from lt_finetune.callbacks import LPFT


def test_probe_then_warmed_up_lower_rate(tmp_path: Any) -> None:
    rec = LRRecorder()
    trainer(tmp_path, [LPFT(probe_steps=4, finetune_lr_factor=0.5, warmup_steps=2), rec]).fit(ForeignModule(lr=0.1))
    assert all(not any(n.startswith("backbone.") for n in t) for t in rec.trainable[:4])
    assert all(any(n.startswith("backbone.0.") for n in t) for t in rec.trainable[4:])
    heads = [lrs["head"] for lrs in rec.lrs]
    assert heads[:4] == [pytest.approx(0.1)] * 4
    assert heads[4:7] == [pytest.approx(0.025), pytest.approx(0.05), pytest.approx(0.05)]
    assert rec.lrs[5]["0"] == pytest.approx(0.05) and rec.lrs[3]["0"] == 0.0


def test_factor_multiplies_the_scheduler(tmp_path: Any) -> None:
    def cosine(opt: Any) -> S.LRScheduler:
        return S.CosineAnnealingLR(opt, T_max=12)

    plain, rec = LRRecorder(), LRRecorder()
    trainer(tmp_path / "a", [plain]).fit(ForeignModule(scheduler=cosine))
    trainer(tmp_path / "b", [LPFT(probe_epochs=1, finetune_lr_factor=0.2, warmup_steps=3), rec]).fit(
        ForeignModule(scheduler=cosine)
    )
    ramp = [0.2 / 3, 0.4 / 3, 0.2, 0.2]
    for step, factor in zip(range(4, 8), ramp):
        assert rec.lrs[step]["head"] == pytest.approx(plain.lrs[step]["0"] * factor)


def test_epoch_probe_resumes_mid_warmup(tmp_path: Any) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    full = LRRecorder()
    make = lambda: LPFT(probe_epochs=1, finetune_lr_factor=0.5, warmup_steps=4)  # noqa: E731
    trainer(tmp_path / "full", [make(), full, ckpt], enable_checkpointing=True).fit(ForeignModule())
    resumed = LRRecorder()
    trainer(tmp_path / "resumed", [make(), resumed]).fit(ForeignModule(), ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert resumed.lrs == full.lrs[6:]
    assert full.lrs[4]["head"] == pytest.approx(0.1 * 0.5 / 4)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="exactly one of `probe_epochs` and `probe_steps`"):
        LPFT(probe_epochs=2, probe_steps=5)
    with pytest.raises(ValueError, match=r"`finetune_lr_factor` to be in \(0.0, 1.0\]"):
        LPFT(finetune_lr_factor=0.0)


def test_example_config_builds_the_preset(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from lt_finetune.cli import main

    config = Path(__file__).parents[2] / "examples" / "configs" / "animal_mnist_lp_ft.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    (lpft,) = [c for c in callbacks if c["class_path"] == "lt_finetune.callbacks.LPFT"]
    assert lpft["init_args"]["finetune_lr_factor"] == 0.1 and lpft["init_args"]["warmup_steps"] == 30
