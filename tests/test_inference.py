"""From a checkpoint to answers: class names in checkpoints, predict_images, the predictions CSV, export, reports."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from image_folders import write_animal_folders
from PIL import Image

from lt_finetune import TransferModule
from lt_finetune.data import ImageFolderDataModule
from lt_finetune.export import export_model
from lt_finetune.inference import CHECKPOINT_KEY, PredictionWriter, load_rgb
from lt_finetune.report import per_class_metrics, plot_confusion_matrix


def _trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,
    }
    return pl.Trainer(**{**settings, **kwargs})


def _dm(folders: dict[str, Path], **kwargs: Any) -> ImageFolderDataModule:
    kwargs = {"val_dir": str(folders["val"]), "image_size": 32, "batch_size": 8, "crop_pct": 0.9, **kwargs}
    return ImageFolderDataModule(str(folders["train"]), **kwargs)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, animal_mnist: None) -> dict[str, Any]:
    """A resnet18 fitted one epoch on 3 Animal-MNIST classes, saved to a checkpoint."""
    root = tmp_path_factory.mktemp("fitted")
    folders = write_animal_folders(root / "images")
    dm = _dm(folders, interpolation="bicubic")
    model = TransferModule("resnet18", num_classes=dm.num_classes, lr=3e-3)
    trainer = _trainer(root)
    trainer.fit(model, dm)
    ckpt = root / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return {"root": root, "folders": folders, "dm": dm, "model": model, "ckpt": ckpt}


def test_checkpoint_keeps_class_names_task_and_preprocessing(fitted: dict[str, Any]) -> None:
    saved = torch.load(fitted["ckpt"], weights_only=True)[CHECKPOINT_KEY]
    assert saved["classes"] == ["bear", "bird", "cat"] and saved["task"] == "multiclass"
    assert saved["preprocessing"] == {
        "input_size": (3, 32, 32),
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "interpolation": "bicubic",
        "crop_pct": 0.9,
    }
    loaded = TransferModule.load_from_checkpoint(fitted["ckpt"])
    assert loaded.classes == ["bear", "bird", "cat"]


def test_predict_images_from_the_checkpoint_alone_matches_the_datamodule_eval_path(fitted: dict[str, Any]) -> None:
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    files = sorted(str(p) for p in fitted["folders"]["new"].rglob("*.*"))
    answers = model.predict_images(fitted["folders"]["new"], top_k=2)  # a folder, searched recursively
    assert [a.path for a in answers] == files and len(files) == 12
    assert {a.label for a in answers} <= {"bear", "bird", "cat"}
    # Same preprocessing as the datamodule's eval transform (the training path): same probabilities.
    transform = fitted["dm"].eval_transform
    x = torch.stack([transform(load_rgb(f)) for f in files])
    model.eval()
    with torch.no_grad():
        expected = model(x).softmax(-1)
    got = torch.tensor([[dict(a.top_k)[a.label] for a in answers]]).squeeze(0)
    torch.testing.assert_close(got, expected.max(-1).values)
    assert [a.label for a in answers] == [model.classes[i] for i in expected.argmax(-1).tolist()]
    assert all(a.top_k[0][1] >= a.top_k[1][1] and a.probability == a.top_k[0][1] for a in answers)


def test_predict_images_converts_grayscale_and_rgba_as_training_does(fitted: dict[str, Any]) -> None:
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    png = next(fitted["folders"]["new"].rglob("*.png"))
    gray = Image.open(png)
    assert gray.mode == "L"
    rgba = gray.convert("RGBA")
    model.train()
    by_path, by_gray, by_rgba = model.predict_images([png, gray, rgba])
    assert by_path.label == by_gray.label == by_rgba.label
    assert by_path.probability == pytest.approx(by_gray.probability) == pytest.approx(by_rgba.probability)
    assert by_gray.path is None and model.training  # evaluated in eval mode, the caller's mode restored


def test_predict_writes_csv_for_an_unlabelled_folder(fitted: dict[str, Any], tmp_path: Path) -> None:
    dm = _dm(fitted["folders"], predict_dir=str(fitted["folders"]["new"]), interpolation="bicubic")
    writer = PredictionWriter("out/predictions.csv", top_k=3)
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    _trainer(tmp_path, callbacks=[writer]).predict(model, dm)
    assert writer.written == str(tmp_path / "out" / "predictions.csv")
    with open(writer.written) as f:
        rows = list(csv.DictReader(f))
    files = sorted(str(p) for p in fitted["folders"]["new"].rglob("*.*"))
    assert [r["path"] for r in rows] == files
    assert "target" not in rows[0] and list(rows[0])[-2:] == ["top3", "top3_probability"]
    python = {a.path: a for a in model.predict_images(files)}
    for row in rows:
        assert row["label"] == row["top1"] == python[row["path"]].label
        assert float(row["probability"]) == pytest.approx(python[row["path"]].probability, abs=1e-4)  # batches differ


def test_predict_on_a_labelled_split_names_the_true_class(fitted: dict[str, Any], tmp_path: Path) -> None:
    dm = _dm(fitted["folders"], test_dir=str(fitted["folders"]["val"]), interpolation="bicubic")
    writer = PredictionWriter(str(tmp_path / "p.csv"))
    _trainer(tmp_path, callbacks=[writer]).predict(TransferModule.load_from_checkpoint(fitted["ckpt"]), dm)
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(Path(r["path"]).parent.name, r["target"]) for r in rows] == [(r["target"], r["target"]) for r in rows]
    assert len(rows) == 9 and list(rows[0])[:3] == ["path", "target", "label"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact: passes PIL's verify(), fails when decoded


def test_corrupt_pixel_data_names_the_file_or_is_skipped(fitted: dict[str, Any], tmp_path: Path) -> None:
    folders = write_animal_folders(tmp_path / "images", classes=2, train=4, val=2, new=2, size=64)
    bad = sorted((folders["train"] / "bear").glob("*.jpg"))[0]
    _truncate(bad)
    dm = _dm(folders, batch_size=100)
    dm.setup("fit")  # the header check passes
    with pytest.raises(OSError, match=rf"cannot read image file '{bad}'.*on_bad_image='skip'"):
        next(iter(dm.train_dataloader()))
    dm = _dm(folders, batch_size=100, on_bad_image="skip")
    dm.setup("fit")
    with pytest.warns(UserWarning, match=rf"skipped an unreadable image.*'{bad}'"):
        images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 7


def test_skipped_file_in_predict_keeps_every_row_on_its_image(fitted: dict[str, Any], tmp_path: Path) -> None:
    folders = write_animal_folders(tmp_path / "images", classes=3, train=2, val=1, new=4, size=64)
    files = sorted(str(p) for p in folders["new"].rglob("*.*"))
    bad = next(f for f in files if f.endswith(".jpg"))
    _truncate(Path(bad))
    dm = _dm(
        fitted["folders"], predict_dir=str(folders["new"]), on_bad_image="skip", batch_size=5, interpolation="bicubic"
    )
    writer = PredictionWriter(str(tmp_path / "p.csv"))
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    with pytest.warns(UserWarning, match="skipped an unreadable image"):
        _trainer(tmp_path, callbacks=[writer]).predict(model, dm)
    with open(tmp_path / "p.csv") as f:
        rows = list(csv.DictReader(f))
    good = [f for f in files if f != bad]
    assert [r["path"] for r in rows] == good
    expected = {a.path: a.label for a in model.predict_images(good)}
    assert all(r["label"] == expected[r["path"]] for r in rows)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_num_classes_that_do_not_fit_the_datamodule_fail_before_training(
    fitted: dict[str, Any], tmp_path: Path, num_classes: int
) -> None:
    model = TransferModule("resnet18", num_classes=num_classes)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(
        ValueError,
        match=rf"num_classes={num_classes}.*3 classes of ImageFolderDataModule.*"
        r"'bear', 'bird', 'cat'.*pass num_classes=3",
    ):
        _trainer(tmp_path).fit(model, _dm(fitted["folders"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_torchscript_export_matches_eager(fitted: dict[str, Any], tmp_path: Path) -> None:
    model = TransferModule.load_from_checkpoint(fitted["ckpt"]).eval()
    path, sidecar = export_model(model, tmp_path / "m.pt", "torchscript")
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(path))(x), model(x), atol=1e-5, rtol=1e-4)
    meta = json.loads(sidecar.read_text())
    assert meta["classes"] == ["bear", "bird", "cat"] and meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert model.to_torchscript() is not None  # traces by default: scripting timm models fails


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None,
    reason='needs `pip install "lt_finetune[onnx]"` (onnx and onnxruntime)',
)
def test_onnx_export_matches_eager_with_a_dynamic_batch(fitted: dict[str, Any], tmp_path: Path) -> None:
    import onnxruntime

    model = TransferModule.load_from_checkpoint(fitted["ckpt"]).eval()
    path, _ = export_model(model, tmp_path / "m.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32)
    (logits,) = session.run(["logits"], {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_test_run_keeps_the_confusion_matrix_and_the_report_reads_it(fitted: dict[str, Any], tmp_path: Path) -> None:
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    dm = _dm(fitted["folders"], test_dir=str(fitted["folders"]["val"]), interpolation="bicubic")
    (results,) = _trainer(tmp_path).test(model, dm)
    confusion = model.test_confusion_matrix
    assert confusion is not None and confusion.sum() == 9 and confusion.sum(1).tolist() == [3, 3, 3]
    assert results["test/acc"] == pytest.approx(confusion.diagonal().sum().item() / 9)
    recall = per_class_metrics(confusion)["recall"]
    assert recall.mean().item() == pytest.approx(confusion.diagonal().sum().item() / 9)  # balanced classes
    png = plot_confusion_matrix(confusion, model.classes, tmp_path / "cm.png")
    assert Image.open(png).size[0] > 100


def test_predict_with_other_preprocessing_than_training_warns(fitted: dict[str, Any], tmp_path: Path) -> None:
    dm = _dm(fitted["folders"], predict_dir=str(fitted["folders"]["new"]), image_size=48)
    model = TransferModule.load_from_checkpoint(fitted["ckpt"])
    trainer = _trainer(tmp_path, callbacks=[PredictionWriter(str(tmp_path / "p.csv"))])
    with pytest.warns(
        UserWarning,
        match=r"input_size: \(3, 32, 32\) in the checkpoint, \(3, 48, 48\) now.*"
        r"interpolation: 'bicubic' in the checkpoint, 'bilinear' now",
    ):
        trainer.predict(model, dm, ckpt_path=fitted["ckpt"])


@pytest.mark.ddp
def test_prediction_writer_under_ddp_writes_one_row_per_image_like_one_process(
    tmp_path: Path, animal_mnist: None
) -> None:
    import os
    import subprocess
    import sys

    folders = write_animal_folders(tmp_path / "images", classes=3, train=2, val=1, new=3)  # 9 new: ranks get 5 + 5
    script = Path(__file__).parent / "scripts" / "ddp_predict.py"
    rows = {}
    for mode in ("ddp", "single"):
        out = tmp_path / f"{mode}.csv"
        result = subprocess.run(
            [sys.executable, str(script), str(folders["train"].parent), str(out), mode],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        with open(out) as f:
            rows[mode] = list(csv.DictReader(f))
    assert len(rows["ddp"]) == 9 and len({r["path"] for r in rows["ddp"]}) == 9  # the padded repeat is dropped
    assert [(r["path"], r["label"]) for r in rows["ddp"]] == [(r["path"], r["label"]) for r in rows["single"]]
    for a, b in zip(rows["ddp"], rows["single"]):
        assert abs(float(a["probability"]) - float(b["probability"])) < 1e-5
