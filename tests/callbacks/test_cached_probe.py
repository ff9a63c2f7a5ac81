"""CachedProbe: epochs on cached features train the head exactly as uncached frozen epochs do, skip the backbone,
drop the cache when the backbone unfreezes, rebuild it on resume, and refuse what a cache cannot replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ForeignModule, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lt_finetune import TransferModule
from lt_finetune.callbacks import LPFT, CachedProbe, FreezeBackbone
from lt_finetune.data._common import EpochShuffleSampler
from lt_finetune.feature_cache import CachedBatches, compute_features, input_randomness, stochastic_layers

N, BATCH, SIZE = 96, 16, 12  # 6 training batches an epoch


def _model(drop_rate: float = 0.0, backbone: nn.Module | None = None) -> TransferModule:
    torch.manual_seed(0)
    backbone = backbone or nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16), nn.ReLU()
    )
    return TransferModule(backbone, num_classes=3, input_size=(3, SIZE, SIZE), drop_rate=drop_rate, lr=1e-2)  # type: ignore[arg-type]


def _images(n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, 3, (n,), generator=g))


class _Flipping(Dataset[tuple[Tensor, Tensor]]):
    """Flips at random, and says so the way lt_finetune's datamodules do (``hflip``)."""

    hflip = True

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.data[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


class _Noisy(_Flipping):
    """Random, without saying so: only reading an item twice shows it."""

    hflip = False

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.data[i]
        return x + 0.01 * torch.randn(x.shape), y


class _Watch(pl.Callback):
    """Counts the backbone's forward passes and records what the training loop iterates in each epoch."""

    def __init__(self) -> None:
        self.calls = 0
        self.loaders: list[str] = []

    def setup(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.handle = pl_module.backbone.register_forward_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.calls += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.loaders.append(type(trainer.train_dataloader).__name__)

    def teardown(self, trainer: pl.Trainer, pl_module: Any, stage: str) -> None:
        self.handle.remove()


def _fit(
    tmp: Path,
    callbacks: list[pl.Callback],
    model: pl.LightningModule | None = None,
    train: Any = None,
    val: bool = True,
    epochs: int = 3,
    ckpt_path: Path | None = None,
    **kwargs: Any,
) -> tuple[pl.LightningModule, _Watch, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = model or _model()
    watch = _Watch()
    train = train if train is not None else DataLoader(_images(), batch_size=BATCH, shuffle=True)
    loaders = {"val_dataloaders": DataLoader(_images(32, seed=1), batch_size=BATCH)} if val else {}
    fit = trainer(tmp, [*callbacks, watch], max_epochs=epochs, **kwargs)
    fit.fit(model, train, **loaders, ckpt_path=ckpt_path)
    return model, watch, fit


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def test_the_head_trains_as_without_the_cache_and_the_backbone_runs_once(tmp_path: Path) -> None:
    # shuffle=True and head dropout: the same order and the same masks need the same random draws.
    plain, plain_watch, plain_fit = _fit(tmp_path / "a", [FreezeBackbone()], _model(drop_rate=0.3))
    cached, watch, cached_fit = _fit(tmp_path / "b", [FreezeBackbone(), CachedProbe()], _model(drop_rate=0.3))
    torch.testing.assert_close(cached.head[1].weight, plain.head[1].weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached.head[1].bias, plain.head[1].bias, rtol=0, atol=1e-6)
    for key in ("train/loss_epoch", "val/loss", "val/acc"):
        assert cached_fit.callback_metrics[key].item() == pytest.approx(
            plain_fit.callback_metrics[key].item(), abs=1e-6
        )
    # 2 sanity batches; uncached: 6 training + 2 validation batches an epoch; cached: each split computed once.
    assert plain_watch.calls == 2 + 3 * (6 + 2)
    assert watch.calls == 2 + 6 + 2
    assert watch.loaders == ["CachedBatches"] * 3
    assert torch.equal(_flat(cached.backbone), _flat(plain.backbone))


@pytest.mark.parametrize(
    "policy", [lambda: FreezeBackbone(unfreeze_at_epoch=2), lambda: LPFT(probe_epochs=1, finetune_lr_factor=0.5)]
)
def test_the_cache_is_dropped_when_the_backbone_unfreezes(tmp_path: Path, policy: Any) -> None:
    plain, _, _ = _fit(tmp_path / "a", [policy()], val=False)
    cached, watch, _ = _fit(tmp_path / "b", [policy(), CachedProbe()], val=False)
    probe_epochs = 2 if isinstance(policy(), FreezeBackbone) else 1
    assert watch.loaders == ["CachedBatches"] * probe_epochs + ["DataLoader"] * (3 - probe_epochs)
    torch.testing.assert_close(_flat(cached), _flat(plain), rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop", ["step=9", "step=12"], ids=["mid_epoch", "epoch_end"])
def test_resume_rebuilds_the_cache_and_continues_exactly(tmp_path: Path, stop: str) -> None:
    def loader() -> DataLoader[Any]:
        return DataLoader(_images(), batch_size=BATCH, sampler=EpochShuffleSampler(N, 3))

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full, _, _ = _fit(
        tmp_path / "full", [FreezeBackbone(), CachedProbe(), ckpt], train=loader(), val=False, enable_checkpointing=True
    )
    probe = CachedProbe()
    resumed, watch, _ = _fit(
        tmp_path / "resumed",
        [FreezeBackbone(), probe],
        train=loader(),
        val=False,
        ckpt_path=tmp_path / "ckpt" / f"{stop}.ckpt",
    )
    assert torch.equal(_flat(resumed), _flat(full))
    assert watch.calls == 6  # the cache was computed again, once
    saved = torch.load(tmp_path / "ckpt" / f"{stop}.ckpt", weights_only=False)
    assert saved["callbacks"].get(probe.state_key, {}) == {}  # the features are never saved
    assert max(_sizes(saved)) < N * 16


def _sizes(value: Any) -> list[int]:
    if isinstance(value, Tensor):
        return [value.numel()]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _sizes(v)] or [0]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _sizes(v)] or [0]
    return [0]


def test_random_augmentation_falls_back_with_a_warning_or_caches_views(tmp_path: Path) -> None:
    flipping = DataLoader(_Flipping(_images()), batch_size=BATCH, shuffle=True)
    with pytest.warns(UserWarning, match=r"training inputs are random \(_Flipping flips images at random.*views=N"):
        _, watch, _ = _fit(tmp_path / "a", [FreezeBackbone(), CachedProbe()], train=flipping, val=False, epochs=2)
    assert watch.loaders == ["DataLoader", "DataLoader"] and watch.calls == 2 * 6
    with pytest.raises(ValueError, match=r"training inputs are random.*\(strict=True\)"):
        _fit(tmp_path / "b", [FreezeBackbone(), CachedProbe(strict=True)], train=flipping, val=False, epochs=1)
    probe = CachedProbe(views=2)
    _, watch, _ = _fit(tmp_path / "c", [FreezeBackbone(), probe, _KeepStore(probe)], train=flipping, val=False)
    assert watch.loaders == ["CachedBatches"] * 3 and watch.calls == 2 * 6  # two passes, one per view
    views = probe.kept
    assert views.shape[0] == 2 and not torch.equal(views[0], views[1])


class _KeepStore(pl.Callback):
    def __init__(self, probe: CachedProbe) -> None:
        self.probe = probe

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert self.probe._train is not None
        self.probe.kept = self.probe._train.store.features  # type: ignore[attr-defined]


def test_the_memory_bound_is_checked_before_computing(tmp_path: Path) -> None:
    # 96 items x 16 features x 4 bytes + 96 targets x 8 bytes = 6912 bytes.
    with pytest.warns(UserWarning, match=r"would take 6\.8 KiB, over max_cache_bytes=6000"):
        _, watch, _ = _fit(tmp_path / "a", [FreezeBackbone(), CachedProbe(max_cache_bytes=6000)], val=False, epochs=2)
    assert watch.loaders == ["DataLoader", "DataLoader"] and watch.calls == 1 + 2 * 6  # the estimate's one batch
    _, watch, _ = _fit(tmp_path / "b", [FreezeBackbone(), CachedProbe(max_cache_bytes=6912)], val=False, epochs=2)
    assert watch.loaders == ["CachedBatches", "CachedBatches"]
    with pytest.raises(ValueError, match="max_cache_bytes=6000"):
        _fit(tmp_path / "c", [FreezeBackbone(), CachedProbe(max_cache_bytes=6000, strict=True)], val=False, epochs=1)


def test_what_a_cache_cannot_replay_trains_uncached(tmp_path: Path) -> None:
    dropout = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 16, 3), nn.ReLU())
    with pytest.warns(UserWarning, match=r"backbone layers \['2'\] are random in training mode"):
        _fit(tmp_path / "a", [FreezeBackbone(), CachedProbe()], _model(backbone=dropout), val=False, epochs=1)
    foreign = ForeignModule()
    with pytest.warns(UserWarning, match="ForeignModule is not a TransferModule"):
        trainer(tmp_path / "b", [FreezeBackbone(), CachedProbe()], max_epochs=1).fit(foreign)
    # A trainable backbone is not a problem: nothing to cache, nothing said beyond a log line.
    _, watch, _ = _fit(tmp_path / "c", [CachedProbe()], val=False, epochs=1)
    assert watch.loaders == ["DataLoader"]


def test_a_backbone_frozen_by_hand_is_cached(tmp_path: Path) -> None:
    def frozen() -> TransferModule:
        model = _model()
        model.backbone.requires_grad_(False)
        model.backbone.eval()  # Lightning restores these flags after validation; no policy re-applies them
        return model

    plain, _, _ = _fit(tmp_path / "a", [], frozen())
    cached, watch, _ = _fit(tmp_path / "b", [CachedProbe()], frozen())
    assert watch.loaders == ["CachedBatches"] * 3
    torch.testing.assert_close(_flat(cached), _flat(plain), rtol=0, atol=1e-6)


def test_input_randomness_reads_attributes_transforms_and_items() -> None:
    from torchvision import transforms as T

    data = _images(8)
    assert input_randomness(data) == []
    assert input_randomness(_Flipping(data)) == ["_Flipping flips images at random (hflip=True)"]
    assert input_randomness(_Noisy(data)) == ["_Noisy returned different values for item 0 on two reads"]
    state = torch.get_rng_state()
    input_randomness(_Noisy(data))
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws nothing from the training RNG

    class WithTransform(TensorDataset):
        transform = T.Compose([T.RandomHorizontalFlip(p=0.0), T.Compose([T.RandomResizedCrop(8)]), T.ColorJitter(0.4)])

    assert input_randomness(torch.utils.data.Subset(WithTransform(data.tensors[0]), [0, 1])) == [
        "WithTransform.transform has RandomResizedCrop",
        "WithTransform.transform has ColorJitter",
    ]

    class Mixing:
        mixup_enabled, mixup_alpha, cutmix_alpha = True, 0.8, 0.0

    assert input_randomness(data, Mixing()) == ["Mixing mixes training batches (mixup_alpha=0.8, cutmix_alpha=0.0)"]


def test_stochastic_layers() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.0), nn.Dropout(0.1))
    assert stochastic_layers(net) == ["1", "3"]
    net[1].eval()
    assert stochastic_layers(net) == ["3"]


def test_cached_batches_follow_the_loader_and_its_random_draws() -> None:
    data = _images(40)
    store = compute_features(data, lambda x: x.mean(dim=(1, 2, 3)).unsqueeze(1), batch_size=16, max_bytes=10**6)
    loader = DataLoader(data, batch_size=16, shuffle=True)
    torch.manual_seed(5)
    expected = [(x.mean(dim=(1, 2, 3)), y) for x, y in loader]
    after = torch.get_rng_state()
    torch.manual_seed(5)
    served = [(b.features.squeeze(1), b.target) for b in CachedBatches(loader, store)]
    assert torch.equal(torch.get_rng_state(), after)
    assert len(served) == len(expected) == 3
    for (fa, ya), (fb, yb) in zip(served, expected):
        torch.testing.assert_close(fa, fb)
        assert torch.equal(ya, yb)


def test_animal_mnist_flips_are_seen(animal_mnist: None) -> None:
    from lt_finetune.data import AnimalMNISTDataModule

    for hflip in (True, False):
        data = AnimalMNISTDataModule(image_size=8, train_per_class=2, val_per_class=1, test_per_class=1, hflip=hflip)
        data.setup("fit")
        reasons = input_randomness(data.train_dataloader().dataset, data)
        assert any("hflip=True" in r for r in reasons) == hflip
        assert input_randomness(data.val_dataloader().dataset) == []


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="`max_cache_bytes` to be an int >= 0, got -1"):
        CachedProbe(max_cache_bytes=-1)
    with pytest.raises(ValueError, match="`storage` to be one of"):
        CachedProbe(storage="disk")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`views` to be an int"):
        CachedProbe(views=1.5)  # type: ignore[arg-type]


def test_example_config_builds(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from lt_finetune.cli import main

    config = Path(__file__).parents[2] / "examples" / "configs" / "animal_mnist_cached_probe.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert "CachedProbe" in names and "FreezeBackbone" in names
    assert printed["data"]["init_args"]["hflip"] is False
