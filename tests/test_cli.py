"""The `lt-finetune` command: fit from YAML in a subprocess, callbacks built from YAML, groups, preview, errors."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lt_finetune.callbacks import __all__ as CALLBACKS
from lt_finetune.cli import main
from lt_finetune.data import ANIMAL_MNIST_CLASSES

ROOT = Path(__file__).parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_fit.yaml"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "lt_finetune.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


def test_fit_then_test_from_yaml_in_a_subprocess(tmp_path: Path, animal_mnist: None) -> None:
    root = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_checkpointing", "true"]
    fit = _run("fit", "--config", str(TINY), *root, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    output = fit.stdout + fit.stderr
    assert "unfroze layer3.1, layer4.0, layer4.1" in output
    assert "Best checkpoint" in output or "checkpoints" in output
    ckpts = sorted(tmp_path.rglob("*.ckpt"))
    assert ckpts, output[-2000:]
    test = _run("test", "--config", str(TINY), "--ckpt_path", str(ckpts[-1]), cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc" in test.stdout + test.stderr
    assert re.search(r"^class +precision +recall +support\n(\w+ +[\d.]+ +[\d.]+ +2\n){10}", test.stdout, re.MULTILINE)
    predict = _run(
        "predict", "--config", str(TINY), "--ckpt_path", str(ckpts[-1]), *root[:2], "--trainer.logger", "true",
        cwd=tmp_path,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert not (tmp_path / "lightning_logs").exists()  # predict logs nothing: no empty version_N folder
    with open(tmp_path / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert f"written to {tmp_path / 'predictions.csv'}" in predict.stdout
    assert len(rows) == 20 and {r["target"] for r in rows} == set(ANIMAL_MNIST_CLASSES)  # the test split, 2 a class
    assert [r["path"] for r in rows] == [str(i) for i in range(20)]  # in-memory images: their indices
    assert all(r["label"] in ANIMAL_MNIST_CLASSES and 0.1 <= float(r["probability"]) <= 1 for r in rows)


@pytest.mark.parametrize("name", CALLBACKS)
def test_every_callback_builds_from_yaml_through_the_cli(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with open(TINY) as f:
        config = yaml.safe_load(f)
    chosen = []
    for example in [TINY, *sorted(TINY.parent.glob("*.yaml"))]:  # tiny_fit.yaml first, then the example configs
        listed = (yaml.safe_load(example.read_text()).get("trainer") or {}).get("callbacks") or []
        chosen = chosen or [c for c in listed if str(c.get("class_path", "")).endswith("." + name)]
    assert chosen, f"{name} is missing from the example configs: every exported callback must be configured in one"
    config["trainer"]["callbacks"] = chosen
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (callback,) = printed["trainer"]["callbacks"]
    assert callback["class_path"] == f"lt_finetune.callbacks.{name}"
    for key, value in (chosen[0].get("init_args") or {}).items():
        if isinstance(value, dict):  # YAML mapping keys come back as strings; the callback converts them
            value = {str(k): v for k, v in value.items()}
        assert callback["init_args"][key] == value


def _help(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_subcommand(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([flag], capsys)
    listed = re.findall(r"^ {4}(\w+) +\S", out, flags=re.MULTILINE)  # "    name   description", one per subcommand
    assert listed == ["fit", "validate", "test", "predict", "groups", "preview", "export", "soup", "rank", "advise"]
    assert re.search(r"^ +groups +Print the layer groups of a backbone", out, flags=re.MULTILINE)
    assert re.search(r"^ +preview +Compute and plot the fine-tuning plan", out, flags=re.MULTILINE)


def test_groups_and_preview_have_their_own_help(capsys: pytest.CaptureFixture[str]) -> None:
    groups = _help(["groups", "--help"], capsys)
    assert "groups [--model.backbone BACKBONE] [--config CONFIG]" in " ".join(groups.split())
    assert "--trainer" not in groups  # groups needs only a name, not a fit config
    preview = _help(["preview", "--help"], capsys)
    for option in ("--output", "--steps_per_epoch", "--config", "--trainer.max_epochs", "--model.backbone", "--data"):
        assert re.search(rf"^ +(-\w [A-Z_]+, )?{option} ", preview, flags=re.MULTILINE), option


def test_groups_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1" in out and "9 groups" in out
    assert main(["groups", "--model.backbone", "torchvision/resnet18"]) == 0
    assert "5 groups" in capsys.readouterr().out  # the classifier is not part of the backbone
    assert main(["groups", "--config", str(TINY)]) == 0  # the config's model.backbone: resnet18
    assert "Layer groups of resnet18" in capsys.readouterr().out


def test_groups_without_a_name_says_how_to_give_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["groups"])
    assert exit_info.value.code == 2
    assert "name a backbone: `lt-finetune groups resnet18`" in capsys.readouterr().err


def test_preview_with_steps_per_epoch_needs_no_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    assert main(["preview", "--config", str(TINY), "--steps_per_epoch", "3", "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert "6 steps (3 per epoch)" in out and png.exists()


def test_preview_command(tmp_path: Path, animal_mnist: None, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    assert main(["preview", "--config", str(TINY), "--output", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 per epoch" in out and png.exists()
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(("stem", "layer4.1", "layer1.0"))
    }
    assert rows["stem"] == rows["layer1.0"] == ["-", "-", "-"]  # steps 0, 2 (epoch 1) and 3 (last)
    assert rows["layer4.1"][0] == "-" and "-" not in rows["layer4.1"][1:]


def test_bad_argument_is_reported_before_training(tmp_path: Path) -> None:
    result = _run(
        "fit", "--config", str(TINY), "--trainer.callbacks+=lt_finetune.callbacks.LayerwiseLR",
        "--trainer.callbacks.decay=1.5", "--trainer.default_root_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Expected `decay` to be in (0.0, 1.0], got 1.5." in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("class_path", "init_args"),
    [("extending.ThawAfterSteps", {"steps": 3, "head_factor": 4.0}), ("extending.FeatureNormPenalty", {"weight": 0.5})],
    ids=["example_policy", "example_loss_term"],
)
def test_callbacks_written_against_public_names_build_from_yaml(
    tmp_path: Path, class_path: str, init_args: dict[str, float], capsys: pytest.CaptureFixture[str]
) -> None:
    with open(TINY) as f:
        config = yaml.safe_load(f)
    config["trainer"]["callbacks"] = [{"class_path": class_path, "init_args": init_args}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    (callback,) = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callback["class_path"] == class_path
    assert {k: callback["init_args"][k] for k in init_args} == init_args


def test_fit_help_lists_the_datamodules_and_short_names_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = " ".join(_help(["fit", "--help"], capsys).split())
    assert re.search(r"known subclasses:.*lt_finetune\.data\.AnimalMNISTDataModule", out)
    assert re.search(r"known subclasses:.*lt_finetune\.data\.ImageFolderDataModule", out)
    printed = _help(
        ["fit", "--data", "ImageFolderDataModule", "--data.train_dir", str(tmp_path), "--print_config"], capsys
    )
    data = yaml.safe_load(printed)["data"]
    assert data["class_path"] == "lt_finetune.data.ImageFolderDataModule"
    assert data["init_args"]["train_dir"] == str(tmp_path) and data["init_args"]["predict_dir"] is None


def test_export_subcommand_writes_the_model_and_its_class_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lt_finetune import TransferModule

    model = TransferModule("resnet18", num_classes=3, input_size=(3, 32, 32)).eval()
    ckpt = tmp_path / "best.ckpt"
    hparams = dict(model.hparams)
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6"}, ckpt
    )
    assert main(["export", "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert f"Exported torchscript model to {tmp_path / 'best.pt'}" in out and "best.pt.json" in out
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "best.pt"))(x), model(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(ckpt), "--format", "tflite"])
    assert "torchscript" in capsys.readouterr().err


def test_messages_print_above_the_progress_bar_not_on_its_line(tmp_path: Path, animal_mnist: None) -> None:
    fit = _run(
        "fit", "--config", str(TINY), "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
        "true", cwd=tmp_path,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    (line,) = [line for line in fit.stdout.splitlines() if "unfroze" in line]
    # tqdm.write clears the bar ("\r", blanks, "\r") and prints the message on a line of its own
    assert line.split("\r")[-1].startswith("lt_finetune: epoch 1, step 2: unfroze"), repr(line)
    assert "unfroze" not in fit.stderr


def test_config_paths_resolve_beside_the_config_from_any_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, animal_mnist: None, mobilenet_v2_weights: Path
) -> None:
    from lt_finetune.cli import _cli

    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "weights.pth").symlink_to(mobilenet_v2_weights)
    (folder / "fit.yaml").write_text(
        "model:\n  backbone: torchvision/mobilenet_v2\n  pretrained: weights.pth\n"
        "data:\n  class_path: AnimalMNISTDataModule\n  init_args: {image_size: 32, train_per_class: 2}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli = _cli(["--config", str(folder / "fit.yaml"), "--trainer.logger", "false"], run=False)
    assert cli.model.hparams.pretrained == str(folder / "weights.pth")
    (elsewhere / "weights.pth").write_bytes(b"")  # one in the working directory is read first, as Lightning does
    with pytest.raises(ValueError, match=r"weights\.pth. could not be read"):
        _cli(["--config", str(folder / "fit.yaml"), "--trainer.logger", "false"], run=False)
