"""Draw the schedule previews of the documentation: ``docs/img/previews/<name>.png``.

Each plot is the plan ``lt-finetune preview`` draws (:func:`lt_finetune.preview.preview_schedule`): every layer
group's learning rate at every optimizer step, and which groups train when. Most are the plans of the tested example
configs in ``examples/configs/`` (their model, callbacks, epochs and steps per epoch); the backbone is built without
weights, since the plan does not depend on them. Run from the repository root after changing a callback or an
example::

    python docs/gen_previews.py            # all of them
    python docs/gen_previews.py lp_ft      # one

The PNGs are committed; ``tests/test_docs.py`` checks that every page's image exists.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img" / "previews"
CONFIGS = ROOT / "examples" / "configs"
#: The demo's data: 2,100 Animal-MNIST images in batches of 64.
DEMO_STEPS_PER_EPOCH = 33


@dataclass
class Preview:
    """One plot: the callbacks of an example config, or explicit ones on the demo's model and data."""

    config: str | None = None
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    epochs: int | None = None  # None: the config's max_epochs (4 without a config)


PREVIEWS: dict[str, Preview] = {
    "freeze_backbone": Preview(
        callbacks=[
            {
                "class_path": "lt_finetune.callbacks.FreezeBackbone",
                "init_args": {"unfreeze_at_epoch": 1, "warmup_steps": 30},
            }
        ]
    ),
    "gradual_unfreeze": Preview("animal_mnist_gradual.yaml"),
    "layerwise_lr": Preview("animal_mnist_mobilenetv2.yaml"),
    "lp_ft": Preview("animal_mnist_lp_ft.yaml"),
    "regularized": Preview("animal_mnist_regularized.yaml"),
    "full_cli": Preview("full_cli.yaml"),
    "lora": Preview("animal_mnist_lora.yaml"),
    "cached_probe": Preview("animal_mnist_cached_probe.yaml"),
    "slim_checkpoint": Preview("animal_mnist_slim_checkpoint.yaml"),
    # 10 of the config's 100 epochs: the same shape (5 % warm-up, cosine), without 100 epoch lines.
    "vit_layer_decay": Preview("vit_layer_decay.yaml", epochs=10),
}


def _instantiate(spec: dict[str, Any]) -> Any:
    module, _, name = spec["class_path"].rpartition(".")
    if not module:  # a short name, as LightningCLI accepts: only Lightning's own callbacks are written so here
        module = "lightning.pytorch.callbacks"
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def _settings(preview: Preview) -> tuple[dict[str, Any], list[Any], int, int]:
    """Model arguments, callbacks, epochs and steps per epoch of a preview."""
    from lt_finetune.policy import FinetunePolicy

    model: dict[str, Any] = {"backbone": "torchvision/mobilenet_v2", "lr": 0.001, "warmup_fraction": 0.05}
    specs, epochs, steps = preview.callbacks, preview.epochs or 4, DEMO_STEPS_PER_EPOCH
    if preview.config is not None:
        config = yaml.safe_load((CONFIGS / preview.config).read_text())
        model = {k: v for k, v in config["model"].items() if k in ("backbone", "lr", "warmup_fraction", "schedule")}
        if "optimizer" in config["model"]:
            model["lr"] = config["model"]["optimizer"]["init_args"]["lr"]
        specs = config["trainer"]["callbacks"]
        epochs = preview.epochs or config["trainer"]["max_epochs"]
        data = config["data"]["init_args"]
        steps = math.ceil(10 * data["train_per_class"] / data["batch_size"])  # Animal-MNIST has 10 classes
    callbacks = [_instantiate(s) for s in specs if s["class_path"].startswith("lt_finetune.callbacks.")]
    if not any(isinstance(c, FinetunePolicy) for c in callbacks):
        from lt_finetune.callbacks import LayerwiseLR

        # Loss-term callbacks change no learning rate: draw the module's own schedule, with a policy that does nothing.
        callbacks.append(LayerwiseLR(decay=1.0))
    return model, callbacks, epochs, steps


def _shrink(path: Path) -> None:
    """Keep the committed PNG small: a 128-colour palette is lossless enough for line plots."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def draw(name: str) -> Path:
    from lt_finetune import TransferModule
    from lt_finetune.preview import preview_schedule

    model_args, callbacks, epochs, steps = _settings(PREVIEWS[name])
    model = TransferModule(num_classes=10, pretrained=False, **model_args)
    plan = preview_schedule(model, callbacks, max_epochs=epochs, steps_per_epoch=steps)
    path = OUT / f"{name}.png"
    plan.plot(str(path))
    _shrink(path)
    return path


def draw_dann_ramp() -> Path:
    """DomainAdapt's own schedule: the gradient-reversal coefficient over the steps of its example config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lt_finetune.domain.reversal import dann_coefficient

    config = yaml.safe_load((CONFIGS / "domain_adapt_mnist_digits.yaml").read_text())
    epochs = config["trainer"]["max_epochs"]
    steps_per_epoch = math.ceil(3500 / config["data"]["init_args"]["source"]["init_args"]["batch_size"])
    total = epochs * steps_per_epoch
    steps = list(range(total))
    fig, axis = plt.subplots(figsize=(10, 3.2), constrained_layout=True)
    for gamma in (5.0, 10.0, 20.0):
        width = 2.0 if gamma == 10.0 else 1.0
        label = f"gamma={gamma:g}" + (" (default)" if gamma == 10.0 else "")
        axis.plot(steps, [dann_coefficient(s / total, gamma) for s in steps], lw=width, label=label)
    for epoch_start in range(steps_per_epoch, total, steps_per_epoch):
        axis.axvline(epoch_start - 0.5, color="grey", lw=0.5, ls=":")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("reversal coefficient")
    axis.set_title("DomainAdapt: gradient-reversal coefficient (DANN, CDAN), 3 epochs of 55 steps")
    axis.legend(loc="lower right", fontsize=8)
    path = OUT / "domain_adapt.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    _shrink(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    known = [*PREVIEWS, "domain_adapt"]
    parser.add_argument("names", nargs="*", help=f"some of {known}; default: all")
    names = parser.parse_args(argv).names or known
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"unknown previews {unknown}; known: {known}")
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = draw_dann_ramp() if name == "domain_adapt" else draw(name)
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
