"""Freezing and unfreezing under ``torch.compile``: after each transition, losses and gradients match eager mode.

Upstream, parameters unfrozen after a graph was compiled could get no gradient (a graph traced with them frozen
was reused). The callbacks flip ``requires_grad`` between steps; here a compiled model is fitted through two
transitions and compared with the same fit in eager mode, step by step.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tinymodels import ForeignModule, trainer

from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze, LayerwiseLR


class Record(pl.Callback):
    """Per optimizer step: the loss, and the gradient of every parameter (``None`` where it has none)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.grads: list[dict[str, torch.Tensor | None]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.grads.append(
            {n: None if p.grad is None else p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        )


def _fit(tmp_path: Any, compile_backend: str | None) -> tuple[Record, ForeignModule]:
    model = ForeignModule(optimizer="adamw")
    record = Record()
    callbacks = [FreezeBackbone(unfreeze_at_step=3), GradualUnfreeze(every_n_steps=2), LayerwiseLR(decay=0.5), record]
    fitted: Any = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    trainer(tmp_path, callbacks, max_epochs=2).fit(fitted)  # 4 steps an epoch
    return record, model


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)], ids=["aot_eager", "inductor"]
)
def test_compiled_fit_matches_eager_through_freeze_and_unfreeze(tmp_path: Any, backend: str) -> None:
    torch._dynamo.reset()
    eager, eager_model = _fit(tmp_path / "eager", None)
    compiled, compiled_model = _fit(tmp_path / "compiled", backend)
    assert len(compiled.losses) == len(eager.losses) == 8
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4, abs=1e-5)
    with_grad = [sorted(n for n, g in step.items() if g is not None) for step in eager.grads]
    assert with_grad[0] == ["head.bias", "head.weight"]  # frozen at first: only the head
    assert len({tuple(names) for names in with_grad}) >= 3  # two transitions or more: more groups get gradients
    for step, (a, b) in enumerate(zip(eager.grads, compiled.grads)):
        assert [n for n, g in a.items() if g is not None] == [n for n, g in b.items() if g is not None], step
        for name, g in a.items():
            if g is not None:
                torch.testing.assert_close(b[name], g, rtol=1e-4, atol=1e-6, msg=f"step {step}, {name}")
    torch.testing.assert_close(
        torch.cat([p.reshape(-1) for p in compiled_model.parameters()]),
        torch.cat([p.reshape(-1) for p in eager_model.parameters()]),
        rtol=1e-4,
        atol=1e-6,
    )
