"""LoRA through peft: default targets per family, patterns, merging, training only adapters and head, composing with
the other policies, exact resume, loading and exporting checkpoints, DDP replicas, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import timm
import torch
import torchvision
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ForeignModule, LRRecorder, ResumableLoader, flat_params, trainer
from torch import nn
from torch.utils.data import TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, LayerwiseLR, LoRA
from lt_finetune.cli import main
from lt_finetune.lora import (
    LoraLayout,
    default_lora_targets,
    has_lora,
    inject_lora,
    lora_param_count,
    lora_parameters,
    merge_lora,
    resolve_lora_targets,
)

pytest.importorskip("peft")

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "examples" / "configs" / "animal_mnist_lora.yaml"
DDP_SCRIPT = Path(__file__).parents[1] / "scripts" / "ddp_lora.py"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _mobilenet() -> nn.Module:
    model = torchvision.models.mobilenet_v2(num_classes=3)
    model.classifier = nn.Identity()
    return model


def _timm_vit() -> nn.Module:
    return timm.create_model("test_vit", num_classes=0)


def _torchvision_vit() -> nn.Module:  # nn.MultiheadAttention inside
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    model.heads = nn.Identity()  # torchvision zero-initialises the classifier
    return model


MODELS = {"mlp": (_mlp, (8,)), "mobilenet": (_mobilenet, (3, 32, 32)), "timm_vit": (_timm_vit, (3, 160, 160))}
MODELS["torchvision_vit"] = (_torchvision_vit, (3, 32, 32))


# -- pure helpers --------------------------------------------------------------------------------------------------


def test_default_targets_follow_the_architecture_family() -> None:
    assert default_lora_targets(_mlp()) == ("linear", ["0", "2"])
    family, targets = default_lora_targets(_mobilenet())
    assert family == "conv" and len(targets) == 34 and "features.0.0" not in targets  # not the 3-channel stem
    convs = dict(_mobilenet().named_modules())
    assert all(convs[t].groups == 1 for t in targets)  # no depthwise convolution: peft cannot merge them
    family, targets = default_lora_targets(_timm_vit())
    assert family == "attention" and targets[:2] == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]
    assert not any("mlp" in t or "patch_embed" in t for t in targets)
    family, targets = default_lora_targets(_torchvision_vit())
    assert family == "attention"  # the attention modules, never their out_proj (MultiheadAttention reads its weight)
    assert targets == ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]


@pytest.mark.parametrize("name", list(MODELS))
def test_adapters_start_at_zero_train_alone_and_merge_back(name: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    plain_names = [n for n, _ in model.named_parameters()]
    x = torch.randn(2, *shape)
    before = model(x)
    targets = default_lora_targets(model)[1]
    added = inject_lora(model, LoraLayout(tuple(targets), r=4, alpha=8.0, dropout=0.0), seed=0)
    assert added == lora_param_count(model, targets, 4)  # the count `lt-finetune groups` prints, without peft
    adapters = {n for n, _ in lora_parameters(model)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapters
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B = 0: the pretrained function
    with torch.no_grad():
        for _, p in lora_parameters(model):
            p.normal_(0, 0.1)
    adapted = model(x)
    scale = adapted.abs().max()  # a randomly initialised MobileNetV2 answers around 1e-9
    assert (adapted - before).abs().max() > 1e-2 * scale
    assert merge_lora(model) == len(targets) and not has_lora(model)
    assert sorted(n for n, _ in model.named_parameters()) == sorted(plain_names)  # plain layers back, as exported
    assert (model(x) - adapted).abs().max() <= 1e-5 * scale


def test_target_patterns_and_what_they_cannot_match() -> None:
    vit = _timm_vit()
    assert resolve_lora_targets(vit, ["qkv"]) == [f"blocks.{i}.attn.qkv" for i in range(6)]  # peft's suffix rule
    assert resolve_lora_targets(vit, [r"blocks\.[01]\.mlp\.fc\d"]) == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    with pytest.raises(ValueError, match=r"pattern 'attn\.q' matched no layer .*Available: \['patch_embed\.proj', "):
        resolve_lora_targets(vit, ["qkv", "attn.q"])
    # A depthwise convolution of MobileNetV2: found, but not wrappable.
    with pytest.raises(ValueError, match=r"it matches \['features\.2\.conv\.1\.0'\], which LoRA cannot wrap"):
        resolve_lora_targets(_mobilenet(), ["features.2.conv.1.0"])


def test_seeded_adapters_repeat_and_leave_the_global_random_stream_alone() -> None:
    layout = LoraLayout(("0", "2"), r=2, alpha=4.0, dropout=0.0)
    a, b = _mlp(), _mlp()
    torch.manual_seed(123)
    inject_lora(a, layout, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    inject_lora(b, layout, seed=7)
    assert torch.equal(torch.rand(3), after)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)  # as if nothing had been drawn
    assert all(torch.equal(pa, pb) for (_, pa), (_, pb) in zip(lora_parameters(a), lora_parameters(b)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"r": 0}, ValueError, r"Expected `r` to be an int >= 1, got 0"),
        ({"alpha": 0.0}, ValueError, r"Expected `alpha` to be in \(0.0, inf\), got 0.0"),
        ({"dropout": 1.0}, ValueError, r"Expected `dropout` to be in \[0.0, 1.0\), got 1.0"),
        ({"target_modules": "qkv"}, TypeError, r"Expected `target_modules` to be a list of names or patterns"),
    ],
)
def test_constructor_arguments_are_checked(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LoRA(**kwargs)


def test_without_peft_the_error_says_how_to_install_it(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import lt_finetune.lora

    real = importlib.util.find_spec
    monkeypatch.setattr(
        lt_finetune.lora.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r'LoRA needs Hugging Face `peft`: pip install "lt_finetune\[peft\]"'):
        trainer(tmp_path, [LoRA()]).fit(ForeignModule())


# -- in a fit (tiny foreign module) --------------------------------------------------------------------------------

ADAPTED = ("0", "3", "5")  # ForeignModule's backbone: Linear 0, BatchNorm 1, Linear 3, Linear 5


def test_only_the_adapters_and_the_head_train(tmp_path: Any) -> None:
    model = ForeignModule()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    recorder = LRRecorder()
    trainer(tmp_path, [LoRA(r=2), recorder], max_epochs=1).fit(model)
    adapters = {f"backbone.{n}" for n, _ in lora_parameters(model.backbone)}
    assert len(adapters) == 2 * len(ADAPTED)
    assert all(t == adapters | {"head.weight", "head.bias"} for t in recorder.trainable)
    for n, p in model.named_parameters():
        if n in start:  # the pretrained weights (renamed `base_layer` where wrapped, so compared by value below)
            assert not torch.equal(p, start[n]) if n.startswith("head") else torch.equal(p, start[n]), n
    for name in ADAPTED:
        layer = model.backbone.get_submodule(name)
        assert torch.equal(layer.base_layer.weight, start[f"backbone.{name}.weight"])
        assert layer.lora_B["default"].weight.abs().max() > 0  # trained away from its zero start


def test_adapters_share_their_layer_groups_learning_rate(tmp_path: Any) -> None:
    model, recorder = ForeignModule(), LRRecorder()
    trainer(tmp_path, [LoRA(r=2), LayerwiseLR(decay=0.5), recorder], max_epochs=1).fit(model)
    expected = {"0": 0.1 * 0.5**4, "1": 0.1 * 0.5**3, "3": 0.1 * 0.5**2, "5": 0.1 * 0.5, "head": 0.1}
    assert recorder.lrs[0] == pytest.approx(expected)
    groups = {id(p): g["layer_group"] for g in model.trainer.optimizers[0].param_groups for p in g["params"]}
    for name in ADAPTED:
        adapter = model.backbone.get_submodule(name).lora_A["default"].weight
        assert groups[id(adapter)] == name


def test_unfreezing_a_group_trains_its_adapters_never_its_weights(tmp_path: Any) -> None:
    model, recorder = ForeignModule(), LRRecorder()
    base = [p.detach().clone() for n, p in model.backbone.named_parameters()]
    trainer(tmp_path, [LoRA(r=2), FreezeBackbone(unfreeze_at_step=3), recorder], max_epochs=2).fit(model)
    adapters = {f"backbone.{n}" for n, _ in lora_parameters(model.backbone)}
    assert recorder.trainable[:3] == [{"head.weight", "head.bias"}] * 3
    assert all(t == adapters | {"head.weight", "head.bias"} for t in recorder.trainable[3:])
    plain = [p for n, p in model.backbone.named_parameters() if f"backbone.{n}" not in adapters]
    assert all(torch.equal(a, b) for a, b in zip(plain, base))


def test_lora_comes_first_and_alone(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"comes after LayerwiseLR in the Trainer's callbacks; list LoRA first"):
        trainer(tmp_path, [LayerwiseLR(decay=0.5), LoRA()]).fit(ForeignModule())
    with pytest.raises(ValueError, match=r"One LoRA callback per fit"):
        trainer(tmp_path, [LoRA(r=2), LoRA(r=4)]).fit(ForeignModule())


def test_a_target_that_would_change_the_layer_groups_is_refused_and_undone(tmp_path: Any) -> None:
    model = TransferModule("torchvision/resnet18", num_classes=3, input_size=(3, 32, 32))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(ValueError, match=r"changes the layer groups of the backbone \(\['stem'\] would no longer"):
        trainer(tmp_path, [LoRA(target_modules=["conv1"])]).fit(model, train_dataloaders=_images())
    assert not has_lora(model.backbone) and [n for n, _ in model.named_parameters()] == names
    assert all(p.requires_grad for p in model.parameters())


# -- TransferModule: resume, load, export --------------------------------------------------------------------------


def _images(n: int = 32, seed: int = 0) -> ResumableLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
    return ResumableLoader(data, batch_size=8, shuffle=False)


class _Transfer(TransferModule):
    """TransferModule with its schedule sized up front: ``trainer.estimated_stepping_batches`` (what
    ``configure_optimizers`` asks otherwise) loads the train loader before Lightning restores its mid-epoch
    position, so a mid-epoch resume would restart the epoch's batches whatever LoRA does."""

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = self.build_optimizer(total_steps=8)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _transfer() -> TransferModule:
    pl.seed_everything(0, verbose=False)
    return _Transfer("test_resnet", num_classes=3, input_size=(3, 32, 32), lr=0.01, weight_decay=0.01)


def _lora_callbacks(r: int = 2) -> list[pl.Callback]:
    # No adapter dropout: Lightning does not restore the random state on resume, so dropout masks would differ.
    return [LoRA(r=r, alpha=4.0), LayerwiseLR(decay=0.7)]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-epoch fit (8 steps) of a tiny timm ResNet with LoRA and LayerwiseLR; checkpoints every 2."""
    root = tmp_path_factory.mktemp("lora_run")
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    model = _transfer()
    fit = trainer(root, [*_lora_callbacks(), ckpt], max_epochs=2, enable_checkpointing=True)
    fit.fit(model, train_dataloaders=_images())
    return {"model": model, "ckpt": root / "ckpt", "root": root}


@pytest.mark.parametrize("stop", ["step=2", "step=4"], ids=["mid_epoch", "epoch_boundary"])
def test_resume_gives_the_uninterrupted_parameters(lora_run: dict[str, Any], tmp_path: Any, stop: str) -> None:
    resumed = _transfer()
    trainer(tmp_path, _lora_callbacks(), max_epochs=2).fit(
        resumed, train_dataloaders=_images(), ckpt_path=lora_run["ckpt"] / f"{stop}.ckpt"
    )
    full = lora_run["model"]
    assert [n for n, _ in resumed.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert (flat_params(resumed) - flat_params(full)).abs().max().item() == 0.0


def test_resuming_with_other_adapters_is_refused(lora_run: dict[str, Any], tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"checkpoint's LoRA adapters \(r=2, .*\) differ from .*\(r=4, "):
        trainer(tmp_path, _lora_callbacks(r=4), max_epochs=2).fit(
            _transfer(), train_dataloaders=_images(), ckpt_path=lora_run["ckpt"] / "step=4.ckpt"
        )


def test_load_from_checkpoint_recreates_the_adapters_and_export_merges_them(
    lora_run: dict[str, Any], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = lora_run["ckpt"] / "step=8.ckpt"
    loaded = TransferModule.load_from_checkpoint(ckpt).eval()
    trained = lora_run["model"].eval()
    assert has_lora(loaded.backbone) and torch.equal(flat_params(loaded), flat_params(trained))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = trained(x)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert main(["export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "m.pt")]) == 0
    assert "Merged the LoRA adapters of 14 layers into their weights" in capsys.readouterr().out
    exported = torch.jit.load(str(tmp_path / "m.pt"))
    assert not any("lora" in n for n, _ in exported.named_parameters())
    torch.testing.assert_close(exported(x), expected, rtol=1e-4, atol=1e-5)


def test_groups_command_prints_the_default_targets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups", "test_vit"]) == 0
    out = capsys.readouterr().out
    assert "LoRA default targets (attention: the projections of the attention blocks): 12 layers" in out
    assert "18.4K adapter parameters at r=8" in out


def test_imagenet_mobilenet_v2_trains_its_adapters(tmp_path: Any, mobilenet_v2_weights: Path) -> None:
    model = TransferModule("torchvision/mobilenet_v2", num_classes=3, pretrained=str(mobilenet_v2_weights))
    pretrained = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    trainer(tmp_path, [LoRA()], max_epochs=1, limit_train_batches=2).fit(model, train_dataloaders=_images(16))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 148_224 + 1280 * 3 + 3  # 34 pointwise convolutions at r=8, and the head
    for name, p in model.backbone.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in pretrained:
            assert torch.equal(p, pretrained[plain]), name


# -- DDP and the example config ------------------------------------------------------------------------------------


@pytest.mark.ddp
def test_replicas_stay_identical_under_ddp(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["steps"] == r1["steps"] == 12
    assert torch.equal(r0["params"], r1["params"])
    assert r0["base_moved"] == 0.0 and r1["base_moved"] == 0.0
    assert r0["adapters_moved"] > 0.0  # every adapter trained, those unfrozen after DDP wrapped the model included


def test_example_config_builds(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == "lt_finetune.callbacks.LoRA"  # first: the other policies see the adapters
    assert callbacks[0]["init_args"]["r"] == 8


def test_example_config_fits(tmp_path: Path, animal_mnist: None, mobilenet_v2_weights: Path) -> None:
    from lt_finetune.cli import _cli

    cli = _cli(
        ["fit", "--config", str(CONFIG), "--trainer.fast_dev_run", "true", "--trainer.default_root_dir", str(tmp_path)]
    )
    assert cli.trainer.global_step == 1 and has_lora(cli.model.backbone)
