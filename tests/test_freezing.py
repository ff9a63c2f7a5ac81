"""lt_finetune.freezing without a Trainer: requires_grad and the three BatchNorm policies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lt_finetune.freezing import BN_MODES, batchnorm_layers, freeze, set_bn_mode, unfreeze


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def test_freeze_and_unfreeze_count_what_changed() -> None:
    model = _model()
    total = sum(p.numel() for p in model.parameters())
    assert freeze(model.parameters()) == total
    assert freeze(model.parameters()) == 0  # already frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert unfreeze(model[0].parameters()) == sum(p.numel() for p in model[0].parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True] + [False] * 6


def test_batchnorm_layers_of_a_parameter_subset() -> None:
    model = _model()
    assert batchnorm_layers(model) == [model[1], model[4]]
    assert batchnorm_layers(model, {id(p) for p in model[4].parameters()}) == [model[4]]


@pytest.mark.parametrize("mode", BN_MODES)
def test_bn_modes(mode: str) -> None:
    model = _model().train()
    layer = model[1]
    before = layer.running_mean.clone()
    set_bn_mode([layer], mode)
    model[:2](torch.randn(4, 3, 8, 8))
    moved = not torch.equal(before, layer.running_mean)
    # eval: frozen statistics; batch_stats: batch statistics without updates; train: ordinary updates.
    assert (layer.training, moved) == {"eval": (False, False), "batch_stats": (True, False), "train": (True, True)}[
        mode
    ]
    set_bn_mode([layer], None, training=True)
    assert layer.training and layer.track_running_stats


def test_eval_mode_layer_computes_the_pretrained_function() -> None:
    layer = nn.BatchNorm1d(3)
    layer.running_mean.fill_(1.0)
    layer.running_var.fill_(4.0)
    set_bn_mode([layer], "eval")
    x = torch.randn(5, 3)
    assert torch.allclose(layer(x), (x - 1.0) / torch.sqrt(torch.tensor(4.0) + layer.eps))
