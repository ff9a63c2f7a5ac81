"""BSS: the term added to the loss, its effect on the smallest singular values, clear errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tinymodels import TermsModule, tiny_data, trainer

from lt_finetune.callbacks import BSS
from lt_finetune.loss_terms import StepOutputs
from lt_finetune.regularizers import bss_penalty


def test_term_is_weight_times_the_penalty() -> None:
    features = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    out = StepOutputs(features=features, logits=torch.zeros(8, 3))
    assert torch.allclose(BSS(weight=0.5, k=2).term(out), 0.5 * bss_penalty(features, 2))


def _smallest_singular(model: TermsModule) -> float:
    x = tiny_data(64).dataset.tensors[0]
    model.eval()
    with torch.no_grad():
        return float(torch.linalg.svdvals(model.backbone(x))[-4:].pow(2).sum())


def test_fit_shrinks_the_smallest_singular_values(tmp_path: Any) -> None:
    values = {}
    for weight in (0.0, 1.0):
        model = TermsModule(optimizer="adamw", lr=0.02)
        trainer(tmp_path / str(weight), [BSS(weight=weight, k=4)]).fit(model)
        values[weight] = _smallest_singular(model)
    assert values[1.0] < 0.5 * values[0.0]


def test_batch_smaller_than_k_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"Expected `k` in \[1, min\(batch, dim\)\] = \[1, 16\].*smaller k"):
        trainer(tmp_path, [BSS(k=17)]).fit(TermsModule())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="Expected `k` to be an int >= 1, got 0"):
        BSS(k=0)
