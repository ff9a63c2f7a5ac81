"""Tiny deterministic LightningModules and helpers shared by the Trainer-level tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lt_finetune.loss_terms import LossTermsMixin, StepOutputs

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def tiny_data(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class ForeignModule(pl.LightningModule):
    """A LightningModule written without lt_finetune in mind: one optimizer, one param group."""

    def __init__(
        self,
        scheduler: SchedulerFactory | None = None,
        interval: str = "step",
        lr: float = 0.1,
        optimizer: str = "sgd",
        only_trainable: bool = False,
        n: int = 64,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU()
        )
        self.head = nn.Linear(16, 3)
        self.scheduler = scheduler
        self.interval = interval
        self.lr = lr
        self.optimizer_name = optimizer
        self.only_trainable = only_trainable
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad] if self.only_trainable else self.parameters()
        if self.optimizer_name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01)
        else:
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-4)
        if self.scheduler is None:
            return opt
        sched = self.scheduler(opt)
        config = {"scheduler": sched, "interval": self.interval}
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "train_loss"
        return {"optimizer": opt, "lr_scheduler": config}

    def train_dataloader(self) -> DataLoader:
        return resumable_data(self.n)


class TermsModule(LossTermsMixin, ForeignModule):
    """A foreign module that opts in to loss terms through the documented mixin."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        features = self.backbone(x)
        logits = self.head(features)
        loss = nn.functional.cross_entropy(logits, y)
        loss = self.apply_loss_terms(loss, StepOutputs(features=features, logits=logits, target=y, inputs=x))
        self.log("train_loss", loss)
        return loss


class LRRecorder(pl.Callback):
    """Records, at every optimizer step, each layer group's applied lr and which parameters are trainable."""

    def __init__(self) -> None:
        self.lrs: list[dict[str, float]] = []
        self.trainable: list[set[str]] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.lrs.append(
            {g.get("layer_group", g.get("name", str(i))): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
        )
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(tmp_path: Any, callbacks: list[pl.Callback], max_epochs: int = 3, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("accelerator", "cpu")
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        devices=1,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


def flat_params(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


class ResumableLoader(DataLoader):
    """A DataLoader that remembers how many batches of the current epoch it served, so that Lightning can
    resume it mid-epoch (Lightning saves and restores any loader with ``state_dict``/``load_state_dict``).
    Plain DataLoaders restart the epoch from the first batch, which makes mid-epoch resume inexact whatever
    the callbacks do."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._served = 0
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                self._served += 1
                continue
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # A finished epoch resumes at the start of the next one.
        self._skip = state["served"] if state["served"] < len(self) else 0


def resumable_data(n: int = 64, batch_size: int = 16, seed: int = 0) -> ResumableLoader:
    loader = tiny_data(n, batch_size, seed)
    return ResumableLoader(loader.dataset, batch_size=batch_size, shuffle=False)


class DomainModule(TermsModule):
    """A foreign module trained on ``CombinedLoader`` batches: a labelled source and an unlabelled target stream,
    both through one forward pass, handed to the loss terms as ``StepOutputs.streams["target"]``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        from lt_finetune.loss_terms import StreamOutputs, split_batch

        x, y, streams = split_batch(batch)
        inputs = [x, *(s[0] for s in streams.values())]
        features_all = self.backbone(torch.cat(inputs))
        logits_all = self.head(features_all)
        features, *stream_features = features_all.split([len(t) for t in inputs])
        logits, *stream_logits = logits_all.split([len(t) for t in inputs])
        loss = nn.functional.cross_entropy(logits, y)
        outputs = StepOutputs(
            features=features,
            logits=logits,
            target=y,
            inputs=x,
            streams={
                name: StreamOutputs(inputs=s[0], features=f, logits=lg)
                for (name, s), f, lg in zip(streams.items(), stream_features, stream_logits)
            },
        )
        loss = self.apply_loss_terms(loss, outputs)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> Any:
        from lightning.pytorch.utilities import CombinedLoader

        return CombinedLoader({"source": resumable_data(self.n), "target": resumable_target(self.n)}, "max_size_cycle")


def resumable_target(n: int = 64, batch_size: int = 16, seed: int = 1) -> ResumableLoader:
    """Unlabelled, shifted inputs as long as :func:`resumable_data` (so resumed epochs line up)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 1.5 + 0.5
    return ResumableLoader(TensorDataset(x), batch_size=batch_size, shuffle=False)
