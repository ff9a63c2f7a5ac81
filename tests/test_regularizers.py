"""The pure regularisers (L2-SP, BSS) and the head's parameters, without a Trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lt_finetune.extras import add_trainable_module
from lt_finetune.regularizers import bss_penalty, head_parameters, l2sp_penalty, squared_norm


def test_l2sp_penalty_is_the_squared_distance_to_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    w = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)}
    w0 = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g), "unused": torch.zeros(1)}
    expected = sum(float(((w[k] - w0[k]) ** 2).sum()) for k in w)
    assert float(l2sp_penalty(w, w0)) == pytest.approx(expected, rel=1e-6)
    assert float(l2sp_penalty(w0 | {}, w0)) == 0.0


def test_l2sp_penalty_names_a_missing_reference() -> None:
    with pytest.raises(KeyError, match="no tensor 'b'"):
        l2sp_penalty({"b": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="at least one parameter"):
        l2sp_penalty({}, {})


def test_l2sp_gradient_points_back_to_the_reference() -> None:
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    l2sp_penalty({"w": w}, {"w": torch.zeros(2)}).backward()
    assert torch.equal(w.grad, 2 * w.detach())


@pytest.mark.parametrize("k", [1, 2, 3])
def test_bss_penalty_is_the_k_smallest_squared_singular_values(k: int) -> None:
    features = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    singular = np.linalg.svd(features.numpy(), compute_uv=False)  # descending
    assert float(bss_penalty(features, k)) == pytest.approx(float((singular[-k:] ** 2).sum()), rel=1e-5)


def test_bss_penalty_refuses_k_beyond_the_rank() -> None:
    with pytest.raises(ValueError, match=r"Expected `k` in \[1, min\(batch, dim\)\] = \[1, 2\]"):
        bss_penalty(torch.randn(2, 8), k=3)
    with pytest.raises(ValueError, match=r"shape \[batch, dim\]"):
        bss_penalty(torch.randn(2, 3, 4), k=1)


def test_head_parameters_leave_out_the_backbone_and_extra_modules() -> None:
    model = nn.Module()
    model.backbone = nn.Linear(2, 2)
    model.head = nn.Linear(2, 3)
    add_trainable_module(model, "discriminator", nn.Linear(2, 1))
    assert sorted(head_parameters(model, "backbone")) == ["head.bias", "head.weight"]
    assert float(squared_norm([torch.ones(2, 2)])) == 4.0 and float(squared_norm([])) == 0.0
