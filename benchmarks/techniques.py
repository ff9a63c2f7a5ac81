"""Section 7: the fine-tuning techniques in and out of distribution, MNIST-5k (train) to UCI digits (test only).

Protocol: ImageNet MobileNetV2 fine-tuned on ``per_class`` labelled MNIST-5k digits per class (the seed draws
them from the 3,500-image training split of :class:`~lt_finetune.data.MNIST5kDataModule`), 64 px, grayscale to 3
channels, ImageNet mean/std, no flips, batch 64, the recipes' AdamW + per-step warm-up + cosine. Scored after the
fit on three splits no training step sees: MNIST validation (500 images, drawn with the seed: the only split any
choice is made on), MNIST test (1,000 images, fixed: in distribution) and all 1,797 UCI digits (out of
distribution: other writers, 8x8 counts upscaled; no digits image is used for training or for any choice).

Hyper-parameters follow a rule fixed before any test run: learning rates from ``lr_table.json`` (chosen on an
Animal-MNIST validation split), the papers' defaults for L2-SP and BSS, EMA and LP-FT lengths as fractions of the
run (``recipes.py``). Post-hoc rows cost no training: WiSE-FT of the full fine-tuning run (``alpha`` chosen on MNIST
validation from 0, 0.1, ..., 1, θ₀ the pretrained snapshot for the backbone) and uniform / greedy soups of the
last three epochs' weights of that run (greedy scored on MNIST validation). fastai's ``fine_tune`` is an anchor
when fastai is installed (``make bench-setup``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Subset

from benchmarks.common import Settings, make_trainer, scratch_dir, weights_path
from benchmarks.recipes import RECIPES, build, load_hparams
from lt_finetune.data._common import stratified_split
from lt_finetune.snapshot import pretrained_snapshot
from lt_finetune.soups import greedy_soup, pretrained_state, uniform_soup, wise_ft

NUM_CLASSES = 10
IMAGE_SIZE = 64
BATCH = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Trained recipes of the section, in table order (those not installed are skipped and listed).
TRAINED = ("full", "lpft", "l2sp", "bss", "ema", "backbone_finetuning", "finetuning_scheduler")
ALPHAS = [round(0.1 * i, 1) for i in range(11)]
SOUP_EPOCHS = 3


def fastai_available() -> bool:
    """Whether fastai (the `fine_tune` anchor) is installed."""
    import importlib.util

    return importlib.util.find_spec("fastai") is not None


def splits(seed: int, per_class: int) -> dict[str, Any]:
    """The training subset and the three scoring splits."""
    from lt_finetune.data import MNIST5kDataModule, UCIDigitsDataModule

    common = {"image_size": IMAGE_SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "batch_size": BATCH}
    source = MNIST5kDataModule(seed=seed, **common)
    source.setup("fit")
    train = source.train_dataset
    targets = torch.as_tensor(train.targets)  # type: ignore[union-attr]
    (chosen,) = stratified_split(targets, NUM_CLASSES, [per_class], seed)
    target = UCIDigitsDataModule(**common)
    target.setup("fit")
    digits = ConcatDataset([target.train_dataset, target.val_dataset, target.test_dataset])  # type: ignore[list-item]
    source.train_dataset = Subset(train, chosen.tolist())  # type: ignore[arg-type]
    return {
        "datamodule": source,
        "val": source.val_dataloader(),
        "id": source.test_dataloader(),
        "ood": DataLoader(digits, batch_size=256),
        "train_tensors": _tensors(source.train_dataset),
    }


def _tensors(dataset: Any) -> tuple[Tensor, Tensor]:
    xs, ys = zip(*(dataset[i][:2] for i in range(len(dataset))))
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def score(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy, in eval mode (train/eval flags restored)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            x, y = batch[0], batch[1]
            correct += int((model(x).argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return correct / max(total, 1)


class LastEpochs(Callback):
    """Keeps the weights at the end of the last ``k`` epochs (the soup's ingredients)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.states: list[dict[str, Tensor]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None and trainer.current_epoch >= trainer.max_epochs - self.k:
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _scores(model: torch.nn.Module, data: dict[str, Any]) -> dict[str, float]:
    return {"val": score(model, data["val"]), "id": score(model, data["id"]), "ood": score(model, data["ood"])}


def run_trained(name: str, data: dict[str, Any], settings: Settings, seed: int, epochs: int) -> dict[str, Any]:
    """Fit one registered recipe; scores, plus the post-hoc rows (WiSE-FT, soups) for full fine-tuning."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    dm = data["datamodule"]
    steps = len(dm.train_dataloader())
    root = scratch_dir()
    model, callbacks = build(name, load_hparams(), weights_path(), NUM_CLASSES, root, epochs, steps)
    pretrained_snapshot(model)  # θ₀, pinned before training
    keep = LastEpochs(SOUP_EPOCHS) if name == "full" else None
    trainer = make_trainer(root, [*callbacks, *([keep] if keep else [])], max_epochs=epochs)
    trainer.fit(model, datamodule=dm)
    rows = [{"recipe": name, **_scores(model, data), "wall_s": time.perf_counter() - start}]
    if keep is not None:
        rows += _post_hoc(model, keep.states, data)
    return {"rows": rows}


def _post_hoc(model: Any, states: Sequence[dict[str, Tensor]], data: dict[str, Any]) -> list[dict[str, Any]]:
    start = time.perf_counter()
    final = {k: v.clone() for k, v in model.state_dict().items()}

    def on_val(state: dict[str, Tensor]) -> float:
        model.load_state_dict(state)
        return score(model, data["val"])

    rows = []
    theta0 = pretrained_state({"state_dict": final, **_snapshot_entry(model)})
    best, curve = wise_ft(theta0, final, ALPHAS, on_val)
    model.load_state_dict(best)
    alpha = max(curve, key=lambda p: (p.score, p.alpha)).alpha
    rows.append(
        {"recipe": "wise_ft", "alpha": alpha, "curve": [[p.alpha, p.score] for p in curve], **_scores(model, data)}
    )
    model.load_state_dict(uniform_soup(states))
    rows.append({"recipe": "uniform_soup", **_scores(model, data)})
    soup, chosen, _ = greedy_soup(states, on_val)
    model.load_state_dict(soup)
    rows.append({"recipe": "greedy_soup", "chosen": chosen, **_scores(model, data)})
    model.load_state_dict(final)
    for row in rows:
        row["wall_s"] = (time.perf_counter() - start) / len(rows)
    return rows


def _snapshot_entry(model: Any) -> dict[str, Any]:
    from lt_finetune.snapshot import CHECKPOINT_KEY

    return {CHECKPOINT_KEY: {"backbone": pretrained_snapshot(model).state_dict()}}


def run_fastai(data: dict[str, Any], seed: int, epochs: int) -> dict[str, Any]:
    """fastai's documented `fine_tune(epochs - 1, freeze_epochs=1)` with base_lr 2e-3 on the same images and net."""
    start = time.perf_counter()
    model = fit_fastai(data["train_tensors"], _tensors(data["val"].dataset), seed, epochs)
    return {"rows": [{"recipe": "fastai", **_scores(model, data), "wall_s": time.perf_counter() - start}]}


def fit_fastai(
    train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], seed: int, epochs: int, num_classes: int = NUM_CLASSES
) -> torch.nn.Module:
    """ImageNet MobileNetV2 with a new head, fitted by fastai's `fine_tune(epochs - 1, freeze_epochs=1)` (base_lr
    2e-3, its documented defaults) on the given normalised image tensors; returns the fitted network."""
    import fastai.callback.all  # noqa: F401  (patches Learner with fine_tune, no_bar, no_logging)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader as FastaiLoader
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed
    from torch.utils.data import TensorDataset
    from torchvision.models import mobilenet_v2

    set_seed(seed, reproducible=True)
    net = mobilenet_v2()
    net.load_state_dict(torch.load(weights_path(), map_location="cpu"))
    net.classifier[-1] = torch.nn.Linear(net.last_channel, num_classes)
    train_dl = FastaiLoader(TensorDataset(*train), bs=BATCH, shuffle=True, drop_last=False)
    val_dl = FastaiLoader(TensorDataset(*val), bs=256)
    dls = DataLoaders(train_dl, val_dl, device=torch.device("cpu"))
    learn = Learner(dls, net, loss_func=CrossEntropyLossFlat(), metrics=accuracy, splitter=_fastai_splitter, wd=0.01)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(epochs - 1, base_lr=2e-3, freeze_epochs=1)
    return learn.model


def _fastai_splitter(model: Any) -> list[list[Any]]:
    # Body (features) and head, as fastai's vision_learner splits a cut model: freeze() then trains the head only.
    return [list(model.features.parameters()), list(model.classifier.parameters())]


def run(settings: Settings, log: Any = print) -> dict[str, Any]:
    """Every recipe of the section for every seed."""
    per_class = int(settings.extra.get("techniques_per_class", 100 if settings.mode != "smoke" else 5))
    epochs = int(settings.extra.get("techniques_epochs", 5 if settings.mode != "smoke" else 2))
    names = [n for n in TRAINED if n in RECIPES and RECIPES[n].available()]
    skipped = {n: "optional dependency not installed" for n in TRAINED if n not in names}
    with_fastai = fastai_available()
    if not with_fastai:
        skipped["fastai"] = "fastai not installed (`make bench-setup`)"
    runs: list[dict[str, Any]] = []
    for seed in settings.seeds:
        data = splits(seed, per_class)
        for name in [*names, *(["fastai"] if with_fastai else [])]:
            try:
                if name == "fastai":
                    result = run_fastai(data, seed, epochs)
                else:
                    result = run_trained(name, data, settings, seed, epochs)
            except Exception as error:  # an anchor that breaks is reported, not fatal for the section
                skipped[name] = f"failed: {type(error).__name__}: {str(error)[:200]}"
                log(f"  seed {seed} {name}: FAILED {type(error).__name__}: {error}")
                continue
            for row in result["rows"]:
                runs.append({"seed": seed, **row})
                log(
                    f"  seed {seed} {row['recipe']:<22} val {row['val']:.3f}  MNIST test {row['id']:.3f}  "
                    f"digits (OOD) {row['ood']:.3f} ({row['wall_s']:.0f} s)"
                )
    labels = {
        n: {"label": RECIPES[n].label, "family": RECIPES[n].family, "description": RECIPES[n].description}
        for n in names
    }
    labels |= {
        "wise_ft": {
            "label": "WiSE-FT of full FT",
            "family": "lt_finetune",
            "description": "θ(alpha) = (1-alpha)·θ₀ + alpha·θ, alpha chosen on MNIST validation",
        },
        "uniform_soup": {
            "label": "Uniform soup (last 3 epochs of full FT)",
            "family": "lt_finetune",
            "description": "mean of the weights at the end of the last 3 epochs",
        },
        "greedy_soup": {
            "label": "Greedy soup (last 3 epochs of full FT)",
            "family": "lt_finetune",
            "description": "ingredients added best first while MNIST validation does not drop",
        },
        "fastai": {
            "label": "fastai fine_tune",
            "family": "anchor",
            "description": "fine_tune(epochs-1, freeze_epochs=1), base_lr 2e-3 (documented defaults)",
        },
    }
    return {
        "recipes": labels,
        "skipped": skipped,
        "runs": runs,
        "hparams": {k: v for k, v in load_hparams().items() if k in {RECIPES[n].hparams for n in names}},
        "protocol": {
            "per_class": per_class,
            "epochs": epochs,
            "seeds": list(settings.seeds),
            "image_size": IMAGE_SIZE,
            "batch_size": BATCH,
            "alphas": ALPHAS,
            "soup_epochs": SOUP_EPOCHS,
        },
    }
