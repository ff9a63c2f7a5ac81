"""layer_groups: every parameter exactly once, in forward order, with useful names, for timm, torchvision and custom."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from lt_finetune.groups import format_groups, layer_groups, match_groups


class Custom(nn.Module):
    """A hand-written model: a stem, a long stage of blocks, a neck, with a shared parameter and a direct one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(6)])
        self.neck = nn.Conv2d(8, 16, 1)
        self.neck_alias = self.neck  # shared module: its parameters must be counted once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.blocks(self.norm(self.conv(x * self.scale)))).mean((2, 3))


MODELS = {
    "timm/resnet18": lambda: timm.create_model("resnet18", num_classes=0),
    "timm/mobilenetv2_100": lambda: timm.create_model("mobilenetv2_100", num_classes=0),
    "timm/efficientnet_lite0": lambda: timm.create_model("efficientnet_lite0", num_classes=0),
    "timm/convnext_atto": lambda: timm.create_model("convnext_atto", num_classes=0),
    "timm/vit_tiny_patch16_224": lambda: timm.create_model("vit_tiny_patch16_224", num_classes=0),
    "torchvision/mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "torchvision/resnet18": lambda: torchvision.models.resnet18(),
    "custom": Custom,
}


def _forward_order(model: nn.Module) -> dict[int, int]:
    """id(param) -> position of its module's first call in a forward pass (root-owned parameters: 0)."""
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: object, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    size = 224 if "vit" in type(model).__name__.lower() or hasattr(model, "patch_embed") else 64
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    position = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            position.setdefault(id(p), order.get(name, 10**9))
    return position


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_parameter_once_in_forward_order(name: str) -> None:
    model = MODELS[name]()
    groups = layer_groups(model)
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in model.parameters())
    assert len({g.name for g in groups}) == len(groups) >= 3
    assert "head" not in {g.name for g in groups}
    position = _forward_order(model)
    starts = [min(position[id(p)] for p in g.params) for g in groups]
    assert starts == sorted(starts), [g.name for g in groups]


def test_names() -> None:
    assert [g.name for g in layer_groups(timm.create_model("resnet18", num_classes=0))] == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1",
    ]  # fmt: skip
    tv = [g.name for g in layer_groups(torchvision.models.mobilenet_v2())]
    assert tv[:3] == ["features.0", "features.1", "features.2"] and tv[-2:] == ["features.18", "classifier"]
    assert [g.name for g in layer_groups(torchvision.models.resnet18())] == [
        "stem", "layer1", "layer2", "layer3", "layer4", "fc",
    ]  # fmt: skip
    custom = [g.name for g in layer_groups(Custom())]
    assert custom == ["stem", *[f"blocks.{i}" for i in range(6)], "neck"]


def test_match_groups_and_table() -> None:
    names = ["stem", "blocks.0", "blocks.1", "blocks.10", "norm"]
    assert match_groups([r"blocks\.1.*", "norm"], names, argument="groups", owner="X") == [
        "blocks.1",
        "blocks.10",
        "norm",
    ]
    with pytest.raises(ValueError, match=r"X\(groups=\['encoder'\]\) pattern 'encoder' matched no layer group"):
        match_groups(["encoder"], names, argument="groups", owner="X")
    table = format_groups(layer_groups(torchvision.models.resnet18()))
    assert table.splitlines()[0].split() == ["#", "group", "params", "modules"]
    assert "layer4" in table and table.splitlines()[-1] == "6 groups, 11.7M parameters"


def test_no_parameters_is_an_error() -> None:
    with pytest.raises(ValueError, match="to have parameters"):
        layer_groups(nn.ReLU())
