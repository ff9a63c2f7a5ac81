"""FreezeBackbone: what is frozen, what BatchNorm does, and that frozen layers get no backward pass."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tinymodels import ForeignModule, LRRecorder, trainer
from torch import nn

from lt_finetune import TransferModule
from lt_finetune.callbacks import FreezeBackbone, GradualUnfreeze


def _bn(model: ForeignModule) -> nn.BatchNorm1d:
    bn = model.backbone[1]
    assert isinstance(bn, nn.BatchNorm1d)
    return bn


class _BNProbe(pl.Callback):
    """Records the BatchNorm layer's mode at every step (after Lightning's model.train() and our hooks)."""

    def __init__(self) -> None:
        self.modes: list[tuple[bool, bool]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        bn = _bn(pl_module)
        self.modes.append((bn.training, bn.track_running_stats))


@pytest.mark.parametrize("bn_mode", ["eval", "train", "batch_stats"])
def test_frozen_backbone_and_batchnorm_policy(tmp_path: Any, bn_mode: str) -> None:
    model = ForeignModule(optimizer="adamw")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = _bn(model).running_mean.clone()
    probe = _BNProbe()
    trainer(tmp_path, [FreezeBackbone(bn_mode=bn_mode), probe], max_epochs=2).fit(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    bn_params = {"backbone.1.weight", "backbone.1.bias"}
    if bn_mode == "train":
        assert moved == {"head.weight", "head.bias"} | bn_params
        assert not torch.equal(_bn(model).running_mean, stats)
        assert set(probe.modes) == {(True, True)}
    else:
        assert moved == {"head.weight", "head.bias"}
        assert torch.equal(_bn(model).running_mean, stats)
        # Re-applied after every model.train() (validation-free epochs included).
        assert set(probe.modes) == ({(False, True)} if bn_mode == "eval" else {(True, False)})


def test_unfreeze_at_step_restores_batchnorm_and_trains_everything(tmp_path: Any) -> None:
    model = ForeignModule()
    recorder, probe = LRRecorder(), _BNProbe()
    trainer(tmp_path, [FreezeBackbone(unfreeze_at_step=5), recorder, probe], max_epochs=2).fit(model)
    everything = {n for n, _ in model.named_parameters()}
    assert recorder.trainable[4] == {"head.weight", "head.bias"}
    assert recorder.trainable[5] == everything
    assert probe.modes[4] == (False, True) and probe.modes[5] == (True, True)


def test_named_groups_only(tmp_path: Any) -> None:
    model = ForeignModule()
    recorder = LRRecorder()
    trainer(tmp_path, [FreezeBackbone(groups=["0", "[13]"]), recorder], max_epochs=1).fit(model)
    assert recorder.trainable[0] == {"backbone.5.weight", "backbone.5.bias", "head.weight", "head.bias"}


class _GradProbe(pl.Callback):
    """Registers forward hooks on the backbone's leaf modules during one training step; records which outputs
    are part of the autograd graph (an output that does not require grad gets no backward pass)."""

    def __init__(self) -> None:
        self.requires_grad: dict[str, bool] = {}
        self._handles: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx != 0 or self._handles:
            return
        for name, module in pl_module.backbone.named_modules():
            if next(module.children(), None) is None and any(True for _ in module.parameters()):
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self.requires_grad[name] = output.requires_grad

        return hook

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for handle in self._handles:
            handle.remove()


def _images(n: int = 8) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)
    )
    return torch.utils.data.DataLoader(data, batch_size=4)


@pytest.mark.parametrize(
    ("callback", "expect"),
    [
        (FreezeBackbone(), "none"),
        (FreezeBackbone(bn_mode="train"), "all"),
        (GradualUnfreeze(schedule={0: ["layer4.*"]}), "top"),
    ],
    ids=["frozen", "bn_train", "top_unfrozen"],
)
def test_frozen_input_side_gets_no_backward_pass(tmp_path: Any, callback: pl.Callback, expect: str) -> None:
    model = TransferModule("resnet18", num_classes=3, lr=1e-3)
    probe = _GradProbe()
    trainer(tmp_path, [callback, probe], max_epochs=1, limit_train_batches=1).fit(model, _images())
    assert len(probe.requires_grad) == len(
        [m for m in model.backbone.modules() if next(m.children(), None) is None and any(True for _ in m.parameters())]
    )
    in_graph = {name for name, flag in probe.requires_grad.items() if flag}
    if expect == "none":
        assert in_graph == set()
    elif expect == "all":
        # Trainable BatchNorm layers drag the backward pass through everything after the first convolution.
        assert in_graph == set(probe.requires_grad) - {"conv1"}
    else:
        assert in_graph and all(name.startswith("layer4.") for name in in_graph)
        assert "conv1" not in in_graph and not any(n.startswith("layer3.") for n in in_graph)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="at most one of `unfreeze_at_epoch` and `unfreeze_at_step`"):
        FreezeBackbone(unfreeze_at_epoch=1, unfreeze_at_step=10)
    with pytest.raises(ValueError, match="`unfreeze_at_epoch` to be an int >= 0, got -1"):
        FreezeBackbone(unfreeze_at_epoch=-1)
    with pytest.raises(TypeError, match="`unfreeze_at_epoch` to be an int, got True of type bool"):
        FreezeBackbone(unfreeze_at_epoch=True)
    with pytest.raises(ValueError, match="`bn_mode` to be one of"):
        FreezeBackbone(bn_mode="frozen")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`groups` to be a list of names or patterns, got 'layer1'"):
        FreezeBackbone(groups="layer1")
    with pytest.raises(ValueError, match="`groups` to be a non-empty list"):
        FreezeBackbone(groups=[])


def test_fit_time_errors_name_the_problem(tmp_path: Any) -> None:
    with pytest.raises(
        ValueError, match=r"pattern 'encoder\.\*' matched no layer group; available: \['0', '1', '3', '5'\]"
    ):
        trainer(tmp_path, [FreezeBackbone(groups=["encoder.*"])]).fit(ForeignModule())
    with pytest.raises(AttributeError, match=r"found no sub-module 'encoder'.*available: \['backbone', 'head'\]"):
        trainer(tmp_path, [FreezeBackbone(backbone="encoder")]).fit(ForeignModule())


def test_a_second_fit_starts_from_its_own_policy(tmp_path: Any) -> None:
    """What a first fit left frozen does not leak into a second fit with other callbacks."""
    model = ForeignModule()
    trainer(tmp_path, [FreezeBackbone()], max_epochs=1).fit(model)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    recorder = LRRecorder()
    trainer(tmp_path, [FreezeBackbone(groups=["0"]), recorder], max_epochs=1).fit(model)
    assert recorder.trainable[0] == {n for n, _ in model.named_parameters() if not n.startswith("backbone.0.")}
