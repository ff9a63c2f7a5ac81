"""``lt-finetune advise``: measure the evidence on a config's training data, print the reasoning, write a fit config.

Usage::

    lt-finetune advise --config fit.yaml --output advised.yaml
    lt-finetune advise --data AnimalMNISTDataModule --data.train_per_class 10 \\
        --model.backbone torchvision/mobilenet_v2 --model.pretrained weights/mnv2.pth --output advised.yaml
    lt-finetune fit --config advised.yaml

The model, data and trainer sections are read as for ``fit``: the backbone is ``model.backbone`` with the weights
``model.pretrained``, the evidence is measured on the datamodule's training split (:func:`~lt_finetune.advise.
measure_evidence`), the rule is :func:`~lt_finetune.advise.advise`, and the written config keeps the data section,
the backbone and its weights, ``trainer.max_epochs`` (5 when unset) and the trainer's accelerator, devices,
precision and default_root_dir; the reasoning is at its top, as comments.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lt_finetune.advise import advise, advised_config, format_evidence, measure_evidence

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["advise_parser", "run_advise"]


def advise_parser(cli: LightningCLI, **kwargs: Any) -> LightningArgumentParser:
    """The ``advise`` parser: everything ``fit`` reads (``model.backbone``/``pretrained`` and data are used)."""
    from jsonargparse.typing import PositiveInt

    parser = cli.init_parser(**kwargs)
    cli._add_arguments(parser)
    parser.add_argument("--output", type=str, default="advised.yaml", help="The fit config to write.")
    parser.add_argument(
        "--max_samples", type=PositiveInt | None, default=1000, help="Training images the probe is measured on."
    )
    parser.add_argument("--folds", type=PositiveInt, default=5, help="Cross-validation folds of the linear probe.")
    parser.add_argument("--device", type=str, default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda:0'.")
    return parser


def run_advise(cli: LightningCLI) -> dict[str, Any]:
    """Run ``advise`` on the parsed CLI: print the evidence and the reasoning, write ``--output``; returns them."""
    import yaml

    from lt_finetune.rank_command import resolve_device

    options = cli.config["advise"]
    model_options = _as_dict(options.model)
    backbone, pretrained = model_options.get("backbone"), model_options.get("pretrained", False)
    if not isinstance(backbone, str):
        cli._subcommand_parsers["advise"].error("advise needs `model.backbone` to be a timm or torchvision name")
    weights: bool | str = pretrained if isinstance(pretrained, bool) else str(pretrained)
    datamodule = cli.datamodule
    evidence, source_classes = measure_evidence(
        datamodule,
        backbone,
        weights,
        max_samples=options.max_samples,
        folds=options.folds,
        device=resolve_device(options.device),
    )
    advice = advise(evidence)
    groups = len(cli.model.layer_groups()) if hasattr(cli.model, "layer_groups") else 1
    train_size = len(datamodule.train_dataset) if getattr(datamodule, "train_dataset", None) is not None else 1
    steps = max(1, math.ceil(train_size / int(getattr(datamodule, "batch_size", 64))))
    trainer_options = _as_dict(options.trainer)
    seed = options.get("seed_everything")
    data = _as_dict(options.data)
    normalization = _backbone_normalization(backbone, weights, datamodule)
    if normalization is not None and isinstance(data.get("init_args"), dict):
        data["init_args"] = {**data["init_args"], "mean": list(normalization[0]), "std": list(normalization[1])}
        print(f"{backbone}'s weights expect mean {normalization[0]}, std {normalization[1]}: set in the data section")
    config = advised_config(
        advice,
        backbone=backbone,
        pretrained=weights,
        data=data,
        groups=groups,
        steps_per_epoch=steps,
        epochs=trainer_options.get("max_epochs"),
        model=model_options,
        trainer=trainer_options,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
    )
    facts = format_evidence(evidence, backbone, groups, source_classes)
    print("Evidence:")
    print("\n".join(f"  {line}" for line in facts))
    print("Rule (first match wins; thresholds and their sources: lt_finetune.advise.Thresholds, docs/selection.md):")
    print("\n".join(f"  {line}" for line in advice.reasons))
    print(f"Recommended: {advice.description}")
    header = ["Written by `lt-finetune advise`.", *facts, *advice.reasons, f"Recommended: {advice.description}"]
    output = Path(options.output)
    output.write_text("".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False))
    print(f"Config written to {output}; run it with: lt-finetune fit --config {output}")
    return {"evidence": evidence, "advice": advice, "config": config}


def _backbone_normalization(
    backbone: str, weights: bool | str, datamodule: Any
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The backbone's ``(mean, std)`` where the datamodule normalises otherwise (``None``: nothing to change)."""
    from lt_finetune.ranking import Candidate, candidate_normalization, datamodule_normalization

    wanted = candidate_normalization(Candidate(backbone, weights, backbone))
    have = datamodule_normalization(datamodule)
    if wanted is None or have is None or wanted == have:
        return None
    return wanted


def _as_dict(section: Any) -> dict[str, Any]:
    if section is None:
        return {}
    return dict(section.as_dict()) if hasattr(section, "as_dict") else dict(section)
