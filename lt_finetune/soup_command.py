"""``lt-finetune soup``: uniform and greedy soups and a WiSE-FT sweep of checkpoints, scored on validation data.

Usage::

    lt-finetune soup run1/best.ckpt run2/best.ckpt run3/best.ckpt --config cfg.yaml
    lt-finetune soup best.ckpt --config cfg.yaml --method wise_ft --alphas "[0, 0.25, 0.5, 0.75, 1]"

The model, data and trainer sections are read as for ``fit`` (``--config``, ``--data ...``): the checkpoints'
weights are loaded into the config's model and scored with ``trainer.validate`` on the datamodule's validation
split (``--metric``, higher is better), never on its test split. ``--method all`` (the default) scores every
checkpoint, the uniform soup, the greedy soup and a WiSE-FT sweep from the pretrained snapshot θ₀ to the best of
those; the best state is saved to ``--output`` (``TransferModule.load_from_checkpoint`` reads it) and the sweep is
plotted to ``--plot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor
from torch.nn import Module

from lt_finetune.extras import EXTRA_MODULES
from lt_finetune.lora import restore_lora
from lt_finetune.slim import restore_slim_checkpoint
from lt_finetune.soups import (
    SweepPoint,
    greedy_soup,
    load_state,
    plot_sweep,
    pretrained_state,
    save_state,
    uniform_soup,
    wise_ft,
)

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["DEFAULT_ALPHAS", "load_checkpoints", "run_soup", "soup_parser"]

DEFAULT_ALPHAS = [round(0.1 * i, 1) for i in range(11)]
Method = Literal["all", "uniform", "greedy", "wise_ft"]


def soup_parser(cli: LightningCLI, **kwargs: Any) -> LightningArgumentParser:
    """The ``soup`` parser: everything ``fit`` reads, the checkpoints and the soup's options."""
    parser = cli.init_parser(**kwargs)
    cli._add_arguments(parser)
    parser.add_argument("checkpoints", nargs="+", type=str, help="Checkpoints of one architecture and start.")
    parser.add_argument("--method", type=Method, default="all", help="all, uniform, greedy or wise_ft.")
    parser.add_argument("--alphas", type=list[float], default=DEFAULT_ALPHAS, help="WiSE-FT mixing weights alpha.")
    parser.add_argument(
        "--theta0", type=str | None, default=None, help="θ₀ checkpoint (e.g. a linear probe); default: the snapshot."
    )
    parser.add_argument("--metric", type=str, default="val/acc", help="Validation metric to maximise.")
    parser.add_argument("--output", type=str, default="soup.ckpt", help="Where the best state is saved.")
    parser.add_argument("--plot", type=str, default="wise_ft.png", help="PNG of the WiSE-FT sweep.")
    return parser


def _model_state(state: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    # Extra modules (a domain discriminator) are training-only: a model built from the config has none.
    return {k: v for k, v in state.items() if k in model_keys or not k.startswith(EXTRA_MODULES + ".")}


def load_checkpoints(model: Module, paths: Sequence[str]) -> list[tuple[dict[str, Tensor], dict[str, Any]]]:
    """The model weights and the whole checkpoint of each path, complete: what a slim checkpoint
    (:class:`~lt_finetune.callbacks.SlimCheckpoint`) left out is filled back in, from ``model``'s own weights or the
    weights file the checkpoint names, digests checked. ``model`` gets the LoRA adapters their weights need.

    Raises:
        ValueError: If a path is not a Lightning checkpoint, or a slim one's pretrained tensors cannot be matched.
        FileNotFoundError: If a slim checkpoint's weights file is gone and ``model`` does not hold those tensors.
    """
    loaded = []
    for path in paths:
        _, checkpoint = load_state(path)
        restore_slim_checkpoint(model, checkpoint)  # before anything reads the weights, as load_from_checkpoint does
        restore_lora(model, checkpoint)  # adds the adapters once; refuses a checkpoint of another layout
        loaded.append((dict(checkpoint["state_dict"]), checkpoint))
    return loaded


def run_soup(cli: LightningCLI) -> dict[str, Any]:
    """Run ``soup`` on the parsed CLI; prints a table and returns the scores (used by tests)."""
    options = cli.config["soup"]
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    metric = options.metric
    loaded = load_checkpoints(model, options.checkpoints)
    keys = set(model.state_dict())

    def evaluate(state: dict[str, Tensor]) -> float:
        model.load_state_dict(state)
        results = trainer.validate(model, datamodule=datamodule, verbose=False)
        if not results or metric not in results[0]:
            raise ValueError(f"Validation logged no {metric!r}; it logged {sorted(results[0]) if results else []}.")
        return float(results[0][metric])

    states = [_model_state(state, keys) for state, _ in loaded]
    rows: list[tuple[str, float]] = []
    individual = [evaluate(s) for s in states]
    rows += [(f"checkpoint {path}", score) for path, score in zip(options.checkpoints, individual)]
    candidates: list[tuple[str, dict[str, Tensor], float]] = [
        (f"checkpoint {p}", s, score) for p, s, score in zip(options.checkpoints, states, individual)
    ]
    method = options.method
    if method in ("all", "uniform") and len(states) > 1:
        soup = uniform_soup(states)
        score = evaluate(soup)
        rows.append((f"uniform soup of {len(states)}", score))
        candidates.append(("uniform soup", soup, score))
    if method in ("all", "greedy") and len(states) > 1:
        soup, chosen, _ = greedy_soup(states, evaluate, individual)
        score = evaluate(soup)
        rows.append((f"greedy soup of {len(chosen)} (checkpoints {chosen})", score))
        candidates.append(("greedy soup", soup, score))
    curve: list[SweepPoint] = []
    if method in ("all", "wise_ft"):
        label, theta, _ = max(candidates, key=lambda c: c[2])
        if options.theta0:
            theta0 = _model_state(load_checkpoints(model, [options.theta0])[0][0], keys)
        else:
            theta0 = _model_state(pretrained_state({**loaded[0][1], "state_dict": theta}), keys)
        best_state, curve = wise_ft(theta0, theta, options.alphas, evaluate)
        best = max(curve, key=lambda p: (p.score, p.alpha))
        rows += [(f"WiSE-FT alpha={p.alpha:g} of {label}", p.score) for p in curve]
        candidates.append((f"WiSE-FT alpha={best.alpha:g} of {label}", best_state, best.score))
        plot_sweep(curve, options.plot, metric=metric, title=f"WiSE-FT of {label}")
        print(f"WiSE-FT curve written to {options.plot}")
    winner, state, score = max(candidates, key=lambda c: c[2])
    save_state(loaded[0][1], state, options.output, method=winner, metric=metric, score=score)
    width = max(len(r[0]) for r in rows)
    print(f"{'state':<{width}}  {metric}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:.4f}")
    print(f"Best: {winner} ({metric}={score:.4f}), saved to {options.output}")
    model.load_state_dict(state)
    return {"rows": rows, "best": winner, "score": score, "curve": [(p.alpha, p.score) for p in curve]}
