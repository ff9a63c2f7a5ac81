"""Weight-space ensembles: WiSE-FT (Wortsman et al., CVPR 2022) and model soups (Wortsman et al., ICML 2022).

Pure functions on state dicts, plus loading and saving Lightning checkpoints; ``lt-finetune soup`` runs them on a
config's datamodule (:mod:`lt_finetune.soup_command`).

- :func:`interpolate`: ``θ(alpha) = (1 - alpha)·θ₀ + alpha·θ``, tensor by tensor; :func:`wise_ft` sweeps ``alpha``.
- :func:`uniform_soup`: the mean of several fine-tuned state dicts (one run's checkpoints, or several runs' from
  the same pretrained start).
- :func:`greedy_soup`: add the checkpoints, best first, keeping each only if the validation score does not drop.

θ₀ for WiSE-FT comes from :func:`pretrained_state`: the checkpoint's pretrained snapshot for the backbone
(``lt_finetune.snapshot``) and the fine-tuned values for everything else (a new head has no pretrained value; give
a linear-probe checkpoint as θ₀ to interpolate the head too). Integer tensors (BatchNorm's
``num_batches_tracked``) are taken from the fine-tuned side, never averaged.

Example::

    >>> import torch
    >>> a, b = {"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([2.0, 4.0])}
    >>> interpolate(a, b, 0.25)["w"]
    tensor([0.5000, 2.5000])
    >>> uniform_soup([a, b])["w"]
    tensor([1., 3.])
    >>> score = lambda sd: -float((sd["w"] - 4.0).abs().mean())  # b scores better; the mean of a and b worse
    >>> soup, chosen, individual = greedy_soup([a, b], score)
    >>> chosen, individual
    ([1], [-3.0, -1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lt_finetune._version import VERSION_KEY
from lt_finetune.inference import CHECKPOINT_KEY as INFERENCE_KEY
from lt_finetune.lora import CHECKPOINT_KEY as LORA_KEY
from lt_finetune.snapshot import CHECKPOINT_KEY

__all__ = [
    "SweepPoint",
    "greedy_soup",
    "interpolate",
    "load_state",
    "plot_sweep",
    "pretrained_state",
    "save_state",
    "uniform_soup",
    "wise_ft",
]

StateDict = Mapping[str, Tensor]
Evaluate = Callable[[dict[str, Tensor]], float]


def _check_keys(states: Sequence[StateDict]) -> None:
    if not states:
        raise ValueError("Expected at least one state dict, got none.")
    keys = set(states[0])
    for i, state in enumerate(states[1:], 1):
        if set(state) != keys:
            diff = sorted(keys ^ set(state))
            raise ValueError(
                f"State dict {i} has other tensors than state dict 0 (e.g. {diff[:3]}): weight averaging needs "
                "models of one architecture, fine-tuned from one pretrained start."
            )


def interpolate(theta0: StateDict, theta: StateDict, alpha: float) -> dict[str, Tensor]:
    """``(1 - alpha) * theta0 + alpha * theta`` for floating tensors; others (and keys ``theta0`` lacks) from ``theta``.

    Raises:
        ValueError: For a shape mismatch.
    """
    out: dict[str, Tensor] = {}
    for name, value in theta.items():
        start = theta0.get(name)
        if start is None or not value.is_floating_point():
            out[name] = value.clone()
            continue
        if start.shape != value.shape:
            raise ValueError(f"Tensor {name!r} has shape {list(start.shape)} in θ₀ and {list(value.shape)} in θ.")
        out[name] = torch.lerp(start.to(value), value, float(alpha))
    return out


def uniform_soup(states: Sequence[StateDict]) -> dict[str, Tensor]:
    """The mean of ``states``, tensor by tensor (integer tensors from the first).

    Raises:
        ValueError: For no states, or states with different tensors.
    """
    _check_keys(states)
    out: dict[str, Tensor] = {}
    for name, first in states[0].items():
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        total = torch.zeros_like(first, dtype=torch.float64)
        for state in states:
            total += state[name].to(first.device, torch.float64)
        out[name] = (total / len(states)).to(first.dtype)
    return out


def greedy_soup(
    states: Sequence[StateDict], evaluate: Evaluate, scores: Sequence[float] | None = None
) -> tuple[dict[str, Tensor], list[int], list[float]]:
    """Greedy soup: rank ``states`` by ``evaluate`` (higher is better), then add each to the soup if the soup's
    score does not drop.

    Args:
        states: Fine-tuned state dicts of one architecture.
        evaluate: Score of a state dict on held-out (validation) data, never on test data.
        scores: Their individual scores, if already known.

    Returns:
        The soup, the indices of the states in it (in the order added) and the individual scores.
    """
    _check_keys(states)
    individual = list(scores) if scores is not None else [evaluate(dict(s)) for s in states]
    order = sorted(range(len(states)), key=lambda i: -individual[i])
    chosen = [order[0]]
    best = individual[order[0]]
    soup = dict(states[order[0]])
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in [*chosen, i]])
        score = evaluate(candidate)
        if score >= best:
            chosen.append(i)
            best, soup = score, candidate
    return {k: v.clone() for k, v in soup.items()}, chosen, individual


@dataclass(frozen=True)
class SweepPoint:
    """One point of a WiSE-FT sweep."""

    alpha: float
    score: float


def wise_ft(
    theta0: StateDict, theta: StateDict, alphas: Sequence[float], evaluate: Evaluate
) -> tuple[dict[str, Tensor], list[SweepPoint]]:
    """Evaluate ``interpolate(theta0, theta, alpha)`` for every ``alpha``; returns the best state and the curve.

    Ties go to the larger ``alpha`` (closer to the fine-tuned model).

    Raises:
        ValueError: For no ``alphas`` or one outside ``[0, 1]``.
    """
    if not alphas:
        raise ValueError("Expected at least one alpha, got none.")
    for a in alphas:
        if not 0.0 <= float(a) <= 1.0:
            raise ValueError(f"Expected every alpha in [0.0, 1.0], got {a}.")
    curve = [SweepPoint(float(a), float(evaluate(interpolate(theta0, theta, float(a))))) for a in alphas]
    best = max(curve, key=lambda p: (p.score, p.alpha))
    return interpolate(theta0, theta, best.alpha), curve


def pretrained_state(checkpoint: Mapping[str, Any], backbone: str = "backbone") -> dict[str, Tensor]:
    """θ₀ of a fine-tuned checkpoint: its pretrained snapshot of ``backbone``, the fine-tuned values elsewhere.

    Raises:
        ValueError: If the checkpoint holds no snapshot of ``backbone``.
    """
    snapshots = checkpoint.get(CHECKPOINT_KEY) or {}
    if backbone not in snapshots:
        raise ValueError(
            f"The checkpoint has no pretrained snapshot of {backbone!r} (it has {sorted(snapshots)}): it was not "
            "written by a fit with TransferModule or an lt_finetune callback. Pass θ₀ as a checkpoint instead "
            "(--theta0 on the command line)."
        )
    state = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
    for name, value in snapshots[backbone].items():
        key = f"{backbone}.{name}"
        if key not in state:
            raise ValueError(f"The snapshot's tensor {key!r} is not in the checkpoint's state_dict.")
        state[key] = value.to(state[key])
    return state


def load_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model weights of a Lightning checkpoint (the averaged ones for an EMA fit) and the whole checkpoint."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' (keys {sorted(checkpoint)}).")
    return dict(checkpoint["state_dict"]), checkpoint


def save_state(template: Mapping[str, Any], state: StateDict, path: str | Path, **extra: Any) -> None:
    """Save ``state`` as a checkpoint ``load_from_checkpoint`` reads, with ``template``'s hyper-parameters and
    snapshot; training state (optimizer, loops, callbacks) is left out."""
    keep = (
        "hyper_parameters",
        "hparams_name",
        "pytorch-lightning_version",
        CHECKPOINT_KEY,
        INFERENCE_KEY,
        LORA_KEY,
        VERSION_KEY,
        "datamodule_hyper_parameters",
    )
    checkpoint = {k: template[k] for k in keep if k in template}
    checkpoint["state_dict"] = dict(state)
    checkpoint["lt_finetune_soup"] = extra
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)


def plot_sweep(curve: Sequence[SweepPoint], path: str | Path, metric: str = "val/acc", title: str = "WiSE-FT") -> None:
    """Plot a WiSE-FT curve (score against alpha) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p.alpha for p in curve], [p.score for p in curve], marker="o")
    best = max(curve, key=lambda p: (p.score, p.alpha))
    ax.axvline(best.alpha, color="grey", linestyle=":", label=f"best alpha = {best.alpha:g}")
    ax.set_xlabel("alpha (0: pretrained θ₀, 1: fine-tuned θ)")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.legend(loc="best")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
