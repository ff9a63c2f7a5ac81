"""The README's main job reaches its promised accuracy (slow: about 3 minutes on 2 cores; `make test-slow`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lt_finetune.cli import _cli

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "examples" / "configs" / "animal_mnist_mobilenetv2.yaml"
WEIGHTS = ROOT / ".cache" / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.mark.slow
def test_demo_reaches_090_validation_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, animal_mnist: None
) -> None:
    if not WEIGHTS.exists():
        pytest.skip("run `make setup` first: it places the MobileNetV2 weights in .cache/weights/")
    monkeypatch.chdir(ROOT)
    cli = _cli(
        [
            "fit",
            "--config",
            str(DEMO),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.trainer.current_epoch == 3
    assert float(cli.trainer.callback_metrics["val/acc"]) >= 0.90
    assert Path(cli.trainer.checkpoint_callback.best_model_path).exists()  # type: ignore[union-attr]
