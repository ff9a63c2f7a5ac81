"""``lt-finetune rank``: score candidate backbones on the training data before fine-tuning any of them.

Usage::

    lt-finetune rank --data config/data.yaml --candidates resnet18 torchvision/mobilenet_v2=weights/mnv2.pth
    lt-finetune rank --config fit.yaml --candidates efficientnet_lite0=lite0.pth torchvision/mobilenet_v2=random \\
        --max_samples 2000 --output rank.json

The data section is read as for ``fit`` (``--config``, ``--data ...``). Each candidate is
``NAME[=WEIGHTS][,mean=M,std=S]`` (:func:`lt_finetune.ranking.parse_candidate`): a timm name or ``torchvision/<name>``,
then ``=`` and a local weights file of the full model (classifier included), ``random``, or ``pretrained`` (the default:
the library's download or cache), then, for a file trained with another normalisation than the name's registered
weights, its mean and std. Every name is checked before the first forward pass. Each candidate makes one pass, without
gradients, over at most ``--max_samples`` training images (stratified), read with the datamodule's evaluation
preprocessing (no flips, no random crops), and gets LogME, H-score, LEEP and NCE (:mod:`lt_finetune.select`); the table
says how long each took and which candidate the rule of :func:`lt_finetune.ranking.recommend` picks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jsonargparse.typing import PositiveInt

from lt_finetune.ranking import (
    CandidateScores,
    Recommendation,
    datamodule_normalization,
    format_table,
    parse_candidate,
    rank_candidates,
    recommend,
    training_sample,
)

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["print_recommendation", "rank_parser", "resolve_device", "run_rank", "score_notes"]


def rank_parser(cli: LightningCLI, **kwargs: Any) -> LightningArgumentParser:
    """The ``rank`` parser: everything ``fit`` reads (only the data section is used) and the ranking's options."""
    parser = cli.init_parser(**kwargs)
    cli._add_arguments(parser)
    parser.add_argument(
        "--candidates",
        nargs="+",
        type=str,
        required=True,
        help="Backbones as NAME[=WEIGHTS][,mean=M,std=S]: a weights file of the full model, 'random' or "
        "'pretrained' (default); mean/std (one value, or per channel joined by '/') for a file trained with a "
        "normalisation other than the name's registered weights.",
    )
    parser.add_argument(
        "--max_samples", type=PositiveInt | None, default=1000, help="Training images scored (stratified); None: all."
    )
    parser.add_argument("--device", type=str, default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda:0'.")
    parser.add_argument("--output", type=str | None, default=None, help="JSON file for the table and the pick.")
    return parser


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_rank(cli: LightningCLI) -> dict[str, Any]:
    """Run ``rank`` on the parsed CLI: print the table and the pick, write ``--output``; returns both (for tests)."""
    options = cli.config["rank"]
    parser = cli._subcommand_parsers["rank"]
    try:
        candidates = [parse_candidate(spec) for spec in options.candidates]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    labels_seen = [c.label for c in candidates]
    if len(set(labels_seen)) != len(labels_seen):
        parser.error(f"every candidate must be given once; got {labels_seen}")
    datamodule = cli.datamodule
    dataset, labels, num_classes = training_sample(datamodule, options.max_samples, seed=0)
    print(
        f"Scoring {len(candidates)} candidates on {len(labels)} training images of {type(datamodule).__name__} "
        f"({num_classes} classes), read with its evaluation preprocessing (no augmentation)."
    )
    rows = rank_candidates(
        candidates,
        dataset,
        labels,
        batch_size=int(getattr(datamodule, "batch_size", 64)),
        device=resolve_device(options.device),
        num_workers=int(getattr(datamodule, "num_workers", 0)),
        normalization=datamodule_normalization(datamodule),
    )
    pick = recommend(rows)
    print(format_table(rows, pick))
    for note in score_notes(rows, len(labels)):
        print(note)
    print_recommendation(pick)
    result: dict[str, Any] = {"rows": [r.to_dict() for r in rows], "best": pick.best, "rule": pick.rule}
    result |= {"mean_ranks": pick.mean_ranks, "samples": len(labels), "num_classes": num_classes}
    if options.output:
        Path(options.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"Table written to {options.output}")
    return result


def score_notes(rows: list[CandidateScores], samples: int) -> list[str]:
    """What to keep in mind when reading the table: n/a scores, and fewer images than features."""
    notes = []
    missing = [r.label for r in rows if r.leep is None]
    if missing:
        notes.append(f"LEEP, NCE n/a for {missing}: no source classifier (random weights or a features-only model).")
    narrow = [r.label for r in rows if samples <= r.dim]
    if narrow:
        notes.append(
            f"{samples} images <= feature width for {narrow}: the scores still rank (LogME exactly, H-score with "
            "Ledoit-Wolf shrinkage) but are noisier; --max_samples above the feature width steadies them."
        )
    return notes


def print_recommendation(pick: Recommendation) -> None:
    """Print the rule and the winner (shared by scripts that rank from Python)."""
    print(f"Rule: {pick.rule}.")
    print(f"Recommended backbone: {pick.best}")
