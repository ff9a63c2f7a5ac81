"""SlimCheckpoint: checkpoints leave out the frozen pretrained tensors; resuming and loading rebuild the model bit for
bit from the weights file, and other weights are refused."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ResumableLoader, trainer
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import L2SP, CachedProbe, FreezeBackbone, SlimCheckpoint
from lt_finetune.slim import SLIM_KEY, PretrainedSource, pretrained_source
from lt_finetune.snapshot import CHECKPOINT_KEY as SNAPSHOT_KEY
from lt_finetune.snapshot import pretrained_snapshot

BACKBONE = "test_efficientnet"  # timm's tiny test model: 99K parameters, BatchNorm layers


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pretrained' weights file for the tiny backbone."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "pretrained.pth"
    torch.save(timm.create_model(BACKBONE, num_classes=0).state_dict(), path)
    return path


def _model(weights: Path) -> TransferModule:
    torch.manual_seed(0)
    return TransferModule(BACKBONE, num_classes=3, pretrained=str(weights), input_size=(3, 32, 32), lr=1e-2)


def _loader() -> ResumableLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(48, 3, 32, 32, generator=g), torch.randint(0, 3, (48,), generator=g))
    return ResumableLoader(data, batch_size=16, shuffle=False)  # 3 batches an epoch, resumable mid-epoch


def _fit(
    root: Path, model: TransferModule, callbacks: list[pl.Callback], ckpt_path: Path | None = None, epochs: int = 3
) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    fit = trainer(root, callbacks, max_epochs=epochs, enable_checkpointing=True)
    fit.fit(model, _loader(), ckpt_path=ckpt_path)
    return fit


def _every(root: Path, steps: int = 2) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=root, every_n_train_steps=steps, save_top_k=-1, filename="{step}")


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _optimizer_state(fit: pl.Trainer) -> list[Tensor]:
    state = fit.optimizers[0].state
    return [v for group in fit.optimizers[0].param_groups for p in group["params"] for v in state[p].values()]


@pytest.mark.parametrize(
    ("stop", "cached"),
    [("step=3", False), ("step=4", True)],
    ids=["epoch_end", "mid_epoch_cached"],
)
def test_resuming_a_slim_checkpoint_is_bit_identical(tmp_path: Path, weights: Path, stop: str, cached: bool) -> None:
    # Mid-epoch, TransferModule's loader position is not restored (Lightning sets the loader up for
    # `estimated_stepping_batches` before it reads the checkpoint); CachedProbe serves the batches not done yet.
    def callbacks() -> list[pl.Callback]:
        return [FreezeBackbone(), SlimCheckpoint(), *([CachedProbe()] if cached else [])]

    full_model = _model(weights)
    step = int(stop.split("=")[1])
    full = _fit(tmp_path / "full", full_model, [*callbacks(), _every(tmp_path / "ckpt", step)], epochs=2)
    saved = torch.load(tmp_path / "ckpt" / f"{stop}.ckpt", weights_only=False)
    assert not any(k.startswith("backbone.") for k in saved["state_dict"])  # all frozen, all left out
    resumed_model = _model(weights)
    resumed = _fit(tmp_path / "resumed", resumed_model, callbacks(), tmp_path / "ckpt" / f"{stop}.ckpt", epochs=2)
    assert _same_state(resumed_model, full_model)
    for a, b in zip(_optimizer_state(resumed), _optimizer_state(full), strict=True):
        assert torch.equal(a, b)


def test_load_from_checkpoint_rebuilds_the_model_and_the_file_is_much_smaller(tmp_path: Path, weights: Path) -> None:
    model = _model(weights)
    _fit(tmp_path / "slim", model, [FreezeBackbone(), SlimCheckpoint(), _every(tmp_path / "slim_ckpt", 9)])
    plain = _model(weights)
    _fit(tmp_path / "plain", plain, [FreezeBackbone(), _every(tmp_path / "plain_ckpt", 9)])
    slim_file, plain_file = tmp_path / "slim_ckpt" / "step=9.ckpt", tmp_path / "plain_ckpt" / "step=9.ckpt"
    assert slim_file.stat().st_size * 5 < plain_file.stat().st_size
    loaded = TransferModule.load_from_checkpoint(slim_file)  # pretrained=False: the backbone comes from the record
    assert _same_state(loaded, model) and _same_state(loaded, plain)
    record = torch.load(slim_file, weights_only=False)[SLIM_KEY]
    assert record["source"] == PretrainedSource(BACKBONE, str(weights), (3, 32, 32)).as_dict()
    assert len(record["dropped"]["state_dict"]) == len(model.backbone.state_dict())
    assert pretrained_source(loaded) == PretrainedSource.from_dict(record["source"])  # remembered for the next fit


def test_other_weights_are_refused_and_a_missing_file_named(tmp_path: Path, weights: Path) -> None:
    copy = tmp_path / "copy.pth"
    shutil.copy(weights, copy)
    _fit(tmp_path / "fit", _model(copy), [FreezeBackbone(), SlimCheckpoint(), _every(tmp_path / "ckpt", 3)], epochs=1)
    path = tmp_path / "ckpt" / "step=3.ckpt"
    torch.manual_seed(7)
    other = timm.create_model(BACKBONE, num_classes=0).state_dict()
    torch.save(other, copy)
    with pytest.raises(ValueError, match=r"differ from the digests saved .*not the weights the checkpoint was trained"):
        TransferModule.load_from_checkpoint(path)
    copy.unlink()
    with pytest.raises(FileNotFoundError, match=r"copy\.pth' does not exist .*Pass the same weights file"):
        TransferModule.load_from_checkpoint(path)
    # The file moved: pass its new place; the model's own weights match the digests.
    loaded = TransferModule.load_from_checkpoint(path, pretrained=str(weights))
    assert torch.equal(loaded.backbone.conv_stem.weight, _model(weights).backbone.conv_stem.weight)


def test_what_changes_is_kept(tmp_path: Path, weights: Path) -> None:
    # BatchNorm trains with bn_mode="train": its parameters and statistics are kept, the convolutions left out.
    model = _model(weights)
    _fit(
        tmp_path / "a",
        model,
        [FreezeBackbone(bn_mode="train"), SlimCheckpoint(), _every(tmp_path / "a_ckpt", 3)],
        epochs=1,
    )
    state = torch.load(tmp_path / "a_ckpt" / "step=3.ckpt", weights_only=False)["state_dict"]
    kept = {k for k in state if k.startswith("backbone.")}
    batchnorms = {f"backbone.{n}" for n, m in model.backbone.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kept and all(k.rsplit(".", 1)[0] in batchnorms for k in kept)
    assert "backbone.conv_stem.weight" not in state and "head.1.weight" in state
    # Unfrozen after the first epoch: from then on everything trains and is kept.
    _fit(
        tmp_path / "b",
        _model(weights),
        [FreezeBackbone(unfreeze_at_epoch=1), SlimCheckpoint(), _every(tmp_path / "b_ckpt", 3)],
        epochs=2,
    )
    first = torch.load(tmp_path / "b_ckpt" / "step=3.ckpt", weights_only=False)["state_dict"]
    second = torch.load(tmp_path / "b_ckpt" / "step=6.ckpt", weights_only=False)
    assert not any(k.startswith("backbone.") for k in first)
    assert set(second["state_dict"]) == set(model.state_dict())
    assert SLIM_KEY not in second  # nothing left out, nothing recorded


def test_the_pretrained_snapshot_is_left_out_and_restored(tmp_path: Path, weights: Path) -> None:
    model = _model(weights)
    _fit(
        tmp_path / "a",
        model,
        [FreezeBackbone(), L2SP(alpha=0.1, beta=0.0), SlimCheckpoint(), _every(tmp_path / "ckpt", 3)],
        epochs=1,
    )
    saved = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    assert saved[SNAPSHOT_KEY]["backbone"] == {}
    loaded = TransferModule.load_from_checkpoint(tmp_path / "ckpt" / "step=3.ckpt")
    snapshot, original = pretrained_snapshot(loaded), pretrained_snapshot(model)
    assert snapshot.keys() == original.keys() and all(torch.equal(snapshot[k], original[k]) for k in snapshot)


def test_models_without_a_named_source_keep_full_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model = TransferModule(backbone, num_classes=3, input_size=(3, 32, 32))  # type: ignore[arg-type]
    assert pretrained_source(model) is None
    _fit(tmp_path, model, [FreezeBackbone(), SlimCheckpoint(), _every(tmp_path / "ckpt", 3)], epochs=1)
    saved = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    assert SLIM_KEY not in saved and "backbone.0.weight" in saved["state_dict"]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")
def test_lora_adapters_are_kept_and_the_base_weights_left_out(tmp_path: Path, weights: Path) -> None:
    from lt_finetune.callbacks import LoRA

    model = _model(weights)
    _fit(tmp_path, model, [LoRA(r=2), SlimCheckpoint(), _every(tmp_path / "ckpt", 3)], epochs=1)
    saved = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)
    backbone = {k for k in saved["state_dict"] if k.startswith("backbone.")}
    assert backbone and all("lora_" in k or "running_" in k or "num_batches" in k for k in backbone)
    assert any(k.endswith("base_layer.weight") for k in saved[SLIM_KEY]["dropped"]["state_dict"])
    loaded = TransferModule.load_from_checkpoint(tmp_path / "ckpt" / "step=3.ckpt")
    assert _same_state(loaded, model)


def test_example_config_builds(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from lt_finetune.cli import main

    config = Path(__file__).parents[2] / "examples" / "configs" / "animal_mnist_slim_checkpoint.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed: dict[str, Any] = yaml.safe_load(capsys.readouterr().out)
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert "SlimCheckpoint" in names and "ModelCheckpoint" in names


def test_soup_loading_fills_in_what_a_slim_checkpoint_left_out(tmp_path: Path, weights: Path) -> None:
    from lt_finetune.soup_command import load_checkpoints
    from lt_finetune.soups import pretrained_state, uniform_soup

    model = _model(weights)
    callbacks = [FreezeBackbone(), L2SP(alpha=0.1, beta=0.0), SlimCheckpoint(), _every(tmp_path / "ckpt", 3)]
    _fit(tmp_path / "fit", model, callbacks, epochs=2)  # L2-SP keeps a snapshot, which the slim file leaves out
    paths = [str(tmp_path / "ckpt" / f"step={s}.ckpt") for s in (3, 6)]
    slim = torch.load(paths[0], weights_only=False)["state_dict"]
    assert len(slim) < len(model.state_dict())  # the frozen backbone was left out of the file
    config_model = _model(weights)  # what `lt-finetune soup` builds from the config
    (first, checkpoint), (last, _) = load_checkpoints(config_model, paths)
    assert set(first) == set(model.state_dict()) == set(last)
    config_model.load_state_dict(last)  # strict: nothing missing
    assert _same_state(config_model, model)  # the last checkpoint is the fitted model, backbone included
    config_model.load_state_dict(uniform_soup([first, last]))  # a soup of slim checkpoints loads as well
    assert _same_state(config_model.backbone, _model(weights).backbone)  # frozen: the pretrained weights
    theta0 = pretrained_state({**checkpoint, "state_dict": first})  # WiSE-FT's θ₀ from the restored snapshot
    assert torch.equal(theta0["backbone.conv_stem.weight"], _model(weights).backbone.conv_stem.weight)
