"""Rank candidate backbones for a labelled dataset before fine-tuning: one forward pass each, four scores.

Each candidate is a model name with its weights, written ``NAME[=WEIGHTS]`` (see :func:`parse_candidate`). It is
built as the full pretrained classifier, with its source head (e.g. ImageNet's 1,000 classes), so that one pass
over the images gives both the pooled features (for :func:`~lt_finetune.select.logme` and
:func:`~lt_finetune.select.h_score`) and the source-class probabilities (for :func:`~lt_finetune.select.leep` and
:func:`~lt_finetune.select.nce`). A candidate without a source head (random initialisation, a weights file
without the classifier, a plain ``nn.Module``) gets ``None`` ("n/a") for LEEP and NCE.

The recommendation rule (:func:`recommend`): rank the candidates on each score that every candidate has (1 =
highest score), average the ranks, and recommend the lowest mean rank; ties go to the higher LogME, the score
that the large comparisons of these scores found most often reliable. No single score wins on every task, which
is why the ranks of several are averaged rather than one score trusted.

Example::

    >>> parse_candidate("torchvision/mobilenet_v2=random")
    Candidate(name='torchvision/mobilenet_v2', weights=False, label='torchvision/mobilenet_v2=random')
    >>> rows = [CandidateScores("a", 3, 1.0, 2.0, -1.0, -0.5, 0.1), CandidateScores("b", 3, 0.5, 3.0, None, None, 0.1)]
    >>> recommend(rows).best, recommend(rows).scores
    ('a', ('logme', 'h_score'))
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import timm
import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from lt_finetune import backbones as _backbones
from lt_finetune.backbones import TORCHVISION_PREFIX, create_backbone
from lt_finetune.select import h_score, leep, logme, nce

__all__ = [
    "SCORES",
    "Candidate",
    "CandidateScores",
    "Recommendation",
    "SourceModel",
    "candidate_normalization",
    "datamodule_normalization",
    "extract",
    "format_table",
    "parse_candidate",
    "rank_candidates",
    "recommend",
    "renormalizer",
    "rows_from_dicts",
    "score_candidate",
    "source_model",
    "training_sample",
]

#: The scores, in table order: name in the results -> column title.
SCORES: dict[str, str] = {"logme": "LogME", "h_score": "H-score", "leep": "LEEP", "nce": "NCE"}
_RANDOM = "random"
_PRETRAINED = "pretrained"


@dataclass(frozen=True)
class Candidate:
    """A backbone to score: a timm or ``torchvision/`` name and its weights (as ``create_backbone`` takes them).

    ``mean`` and ``std`` are the normalisation the weights were trained with, for weights that differ from the
    name's registered ones (a converted file); ``None`` reads them from timm's or torchvision's registry (see
    :func:`candidate_normalization`).
    """

    name: str
    weights: bool | str
    label: str
    mean: tuple[float, ...] | None = field(default=None, repr=False)
    std: tuple[float, ...] | None = field(default=None, repr=False)


def parse_candidate(spec: str) -> Candidate:
    """Read ``NAME[=WEIGHTS][,mean=M,std=S]``: a model name, its weights and, optionally, their normalisation.

    ``NAME`` is a timm name (``resnet18``, ``efficientnet_lite0``) or ``torchvision/<name>``. ``WEIGHTS`` is a path
    to a state dict of the *full* model (with its classifier, so LEEP and NCE can use the source head; without it
    they are n/a), ``random`` for random initialisation, or ``pretrained`` (the default when ``=`` is left out) for
    the library's standard weights: timm's hub or torchvision's ``$TORCH_HOME`` cache, which needs the network or a
    cached file. ``mean`` and ``std`` (one value for every channel, or one per channel joined by ``/``) say how a
    weights file was trained when that differs from the name's registered weights; give both or neither.

    Raises:
        ValueError: If the name is empty or unknown to timm and torchvision (with close matches), or the
            normalisation options are malformed.
        FileNotFoundError: If ``WEIGHTS`` is neither a keyword nor an existing file.

    Example::

        >>> parse_candidate("resnet18")
        Candidate(name='resnet18', weights=True, label='resnet18')
        >>> c = parse_candidate("efficientnet_lite0=pretrained,mean=0.5,std=0.5")
        >>> c.mean, c.std
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> parse_candidate("resnet1")
        Traceback (most recent call last):
        ...
        ValueError: Unknown candidate 'resnet1': not a timm model name. Close matches: ...
    """
    if not isinstance(spec, str):
        raise TypeError(f"Expected a candidate to be a string NAME[=WEIGHTS], got {spec!r}.")
    head, *options = spec.strip().split(",")
    mean, std = _parse_normalization(options, spec)
    name, sep, weights = head.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"Expected a candidate NAME[=WEIGHTS] with a model name, got {spec!r}.")
    _check_name(name, spec)
    resolved: bool | str
    if not sep or weights == _PRETRAINED:
        resolved = True
    elif weights == _RANDOM:
        resolved = False
    elif os.path.isfile(weights):
        resolved = weights
    else:
        raise FileNotFoundError(
            f"Candidate {spec!r}: weights {weights!r} is not a file (from the working directory {os.getcwd()!r}). "
            f"After '=' give a weights file, {_RANDOM!r} or {_PRETRAINED!r}."
        )
    label = f"{name}={os.path.basename(resolved)}" if isinstance(resolved, str) else head.strip()
    return Candidate(name, resolved, label, mean, std)


def _parse_normalization(
    options: Sequence[str], spec: str
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``mean=M`` and ``std=S`` of a candidate spec (``M``: one float, or floats joined by ``/``)."""
    found: dict[str, tuple[float, ...]] = {}
    for option in options:
        key, sep, value = option.strip().partition("=")
        if not sep or key not in ("mean", "std") or key in found:
            raise ValueError(
                f"Candidate {spec!r}: unexpected {option!r} after the weights; only `,mean=M,std=S` may follow "
                "(each one value, or one per channel joined by '/', e.g. `,mean=0.5,std=0.5`)."
            )
        try:
            values = tuple(float(v) for v in value.split("/"))
        except ValueError:
            raise ValueError(f"Candidate {spec!r}: {key}={value!r} is not a number or numbers joined by '/'.") from None
        if len(values) == 1:
            values = values * 3
        if key == "std" and any(v <= 0 for v in values):
            raise ValueError(f"Candidate {spec!r}: std must be positive, got {value!r}.")
        found[key] = values
    if len(found) == 1:
        raise ValueError(f"Candidate {spec!r}: give both `mean=` and `std=`, or neither.")
    return found.get("mean"), found.get("std")


def _check_name(name: str, spec: str) -> None:
    if name.startswith(TORCHVISION_PREFIX):
        base, _, tag = name[len(TORCHVISION_PREFIX) :].partition(".")
        known = torchvision.models.list_models(module=torchvision.models)
        if base not in known:
            close = difflib.get_close_matches(base, known, n=5) or [k for k in known if base and base in k][:5]
            raise ValueError(
                f"Unknown candidate {spec!r}: {base!r} is not a torchvision classification model. Close matches: "
                f"{[TORCHVISION_PREFIX + c for c in close]}."
            )
        members = torchvision.models.get_model_weights(base).__members__
        if tag and tag not in members:
            raise ValueError(
                f"Unknown candidate {spec!r}: no weights {tag!r} for {base!r}; available: {list(members)}."
            )
        return
    base, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        hint = _backbones._timm_suggestions(base)
        raise ValueError(f"Unknown candidate {spec!r}: not a timm model name. {hint}")


class SourceModel(nn.Module):
    """A pretrained classifier seen as ``images -> (pooled features [B, D], source logits [B, Z] or None)``.

    Built by :func:`source_model`. The features are what :func:`~lt_finetune.backbones.create_backbone` returns for
    the same name and weights (the input of the last linear layer); the logits are the source head's output.

    Args:
        model: The full model (with its classifier when ``kind`` is ``"timm"`` or ``"torchvision"``), or a
            feature extractor when ``kind`` is ``"features"``.
        kind: ``"timm"``, ``"torchvision"`` or ``"features"`` (no source head).
        head: The last linear layer of a torchvision classifier, whose input is the feature vector.
    """

    def __init__(self, model: nn.Module, kind: str, head: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.kind = kind
        self.head = head
        self._captured: list[Tensor] = []

    @property
    def has_source_head(self) -> bool:
        """Whether the model predicts its pretraining classes (LEEP and NCE need that)."""
        return self.kind != "features"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images ``[B, C, H, W]`` to ``(features [B, D], source logits [B, Z] or None)``."""
        if self.kind == "timm":
            model: Any = self.model
            maps = model.forward_features(x)
            features = model.forward_head(maps, pre_logits=True)
            return features.flatten(1), model.forward_head(maps)
        if self.kind == "torchvision":
            assert self.head is not None
            self._captured.clear()
            handle = self.head.register_forward_hook(lambda _m, inputs, _out: self._captured.append(inputs[0]))
            try:
                logits = self.model(x)
            finally:
                handle.remove()
            return self._captured[-1].flatten(1), logits
        out = self.model(x)
        if out.ndim == 4:
            out = out.mean((2, 3))
        return out.flatten(1), None


def source_model(candidate: Candidate | str | nn.Module) -> SourceModel:
    """Build a candidate as features plus source head (see :class:`SourceModel`), in eval mode.

    With ``pretrained`` weights or a weights file that holds the classifier, the full model is built with as many
    outputs as the weights' classifier has; otherwise (random initialisation, a file without the classifier, a
    plain module) only the feature extractor of ``create_backbone``.

    Raises:
        ValueError: If the name is unknown or the file does not match the architecture.
        OSError: If ``pretrained`` weights can be neither downloaded nor found in the cache.
    """
    if isinstance(candidate, nn.Module):
        return SourceModel(candidate, "features").eval()
    if isinstance(candidate, str):
        candidate = parse_candidate(candidate)
    name, weights = candidate.name, candidate.weights
    if weights is False:
        return SourceModel(create_backbone(name, False)[0], "features").eval()
    assert weights is True or isinstance(weights, str)
    if name.startswith(TORCHVISION_PREFIX):
        built = _torchvision_source(name[len(TORCHVISION_PREFIX) :], weights)
    else:
        built = _timm_source(name, weights)
    if built is None:  # a weights file without the classifier: features only
        return SourceModel(create_backbone(name, weights)[0], "features").eval()
    return built.eval()


def _file_classes(path: str, prefix: str) -> int | None:
    state = _backbones._read_weights_file(path)
    weight = state.get(f"{prefix}.weight")
    return int(weight.shape[0]) if isinstance(weight, Tensor) and weight.ndim == 2 else None


def _timm_source(name: str, weights: Literal[True] | str) -> SourceModel | None:
    if weights is True:
        try:
            model = timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError) as err:
            raise _backbones._download_error(f"timm model {name!r}", name, err) from err
        return SourceModel(model, "timm") if getattr(model, "num_classes", 0) else None
    probe = timm.create_model(name, pretrained=False, num_classes=0)
    classifier = (getattr(probe, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    classes = next((c for c in (_file_classes(weights, p) for p in prefixes[:1]) if c), None)
    if classes is None:
        return None
    model = timm.create_model(name, pretrained=False, num_classes=classes)
    _backbones._load_weights_file(model, weights, (), f"timm model {name!r}")
    return SourceModel(model, "timm")


def _torchvision_source(spec: str, weights: Literal[True] | str) -> SourceModel | None:
    base, _, tag = spec.partition(".")
    kwargs: dict[str, Any] = {}
    aux = _backbones._TORCHVISION_AUX_HEADS.get(base, ())
    if aux:
        kwargs.update(aux_logits=False, transform_input=True)
    if weights is True:
        try:
            model = torchvision.models.get_model(base, weights=tag or "DEFAULT", **kwargs)
        except (OSError, RuntimeError) as err:
            raise _backbones._download_error(f"torchvision model {base!r}", TORCHVISION_PREFIX + spec, err) from err
    else:
        path = _classifier_path(torchvision.models.get_model(base, weights=None, **kwargs), base)
        classes = _file_classes(weights, path)
        if classes is None:
            return None
        model = torchvision.models.get_model(base, weights=None, num_classes=classes, **kwargs)
        _backbones._load_weights_file(model, weights, aux, f"torchvision model {base!r}")
    head = model.get_submodule(_classifier_path(model, base))
    return SourceModel(model, "torchvision", head)


def _classifier_path(model: nn.Module, name: str) -> str:
    for attr in _backbones._CLASSIFIER_ATTRS:
        classifier = getattr(model, attr, None)
        if isinstance(classifier, nn.Module):
            linears = [path for path, m in classifier.named_modules() if isinstance(m, nn.Linear)]
            if linears:
                return f"{attr}.{linears[-1]}" if linears[-1] else attr
    raise ValueError(f"Cannot find the nn.Linear classifier of torchvision model {name!r}.")


def candidate_normalization(candidate: Candidate) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The per-channel ``(mean, std)`` a candidate's pretrained weights expect, ``None`` for random weights.

    The candidate's own ``mean``/``std`` where given, else the registered preprocessing of the name: timm's
    ``pretrained_cfg`` or the transforms of the torchvision weights enum member. A weights file is assumed to
    have been trained like the name's registered weights unless the candidate says otherwise. Fine-tune a
    candidate with the normalisation (``mean=``/``std=`` of the datamodule) that it is scored with.

    Example::

        >>> candidate_normalization(parse_candidate("vit_tiny_patch16_224"))
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> candidate_normalization(Candidate("efficientnet_lite0", "lite0.pth", "Lite0", (0.5,) * 3, (0.5,) * 3))
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    if candidate.weights is False:
        return None
    if candidate.mean is not None and candidate.std is not None:
        return tuple(candidate.mean), tuple(candidate.std)
    if candidate.name.startswith(TORCHVISION_PREFIX):
        base, _, tag = candidate.name[len(TORCHVISION_PREFIX) :].partition(".")
        transforms = torchvision.models.get_model_weights(base)[tag or "DEFAULT"].transforms()
        return tuple(float(m) for m in transforms.mean), tuple(float(v) for v in transforms.std)
    cfg = timm.models.get_pretrained_cfg(candidate.name, allow_unregistered=True)
    if cfg is None:
        return None
    return tuple(float(m) for m in cfg.mean), tuple(float(v) for v in cfg.std)


def renormalizer(
    data: tuple[Sequence[float], Sequence[float]] | None,
    model: tuple[Sequence[float], Sequence[float]] | None,
) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` with ``x * scale + shift`` = images normalised with ``data`` re-normalised with ``model``."""
    if data is None or model is None:
        return None
    (data_mean, data_std), (model_mean, model_std) = data, model
    if tuple(data_mean) == tuple(model_mean) and tuple(data_std) == tuple(model_std):
        return None
    d_mean, d_std = torch.tensor(data_mean).view(1, -1, 1, 1), torch.tensor(data_std).view(1, -1, 1, 1)
    m_mean, m_std = torch.tensor(model_mean).view(1, -1, 1, 1), torch.tensor(model_std).view(1, -1, 1, 1)
    return d_std / m_std, (d_mean - m_mean) / m_std


def datamodule_normalization(datamodule: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The datamodule's ``(mean, std)`` (lt_finetune's image datamodules have both), ``None`` if it has none."""
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if mean is None or std is None:
        return None
    return tuple(float(m) for m in mean), tuple(float(v) for v in std)


# -- data --------------------------------------------------------------------------------------------------------


def training_sample(datamodule: Any, max_samples: int | None, seed: int = 0) -> tuple[Dataset[Any], Tensor, int]:
    """The datamodule's training images without augmentation, stratified down to ``max_samples``.

    Augmentation is turned off the way lt_finetune's datamodules define it: a dataset's ``hflip`` is set to
    ``False``, and a dataset with a ``transform`` gets the datamodule's ``eval_transform`` (resize and centre crop,
    as validation uses). The datamodule itself is left unchanged (the dataset is a shallow copy).

    Returns:
        ``(dataset, labels, num_classes)``: a ``Subset`` of at most ``max_samples`` items (every class keeps at
        least one, in proportion otherwise; drawn with ``seed``), their labels, and the number of classes.

    Raises:
        ValueError: If the datamodule has no training dataset with integer ``targets``.
    """
    setup = getattr(datamodule, "setup", None)
    if callable(setup):
        setup("fit")
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:
        raise ValueError(
            f"{type(datamodule).__name__} has no `train_dataset` after setup('fit'); rank and advise read the "
            "training images of lt_finetune's image datamodules (ImageFolderDataModule, AnimalMNISTDataModule, ...)."
        )
    dataset = _without_augmentation(dataset, datamodule)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(f"{type(dataset).__name__} has no `targets` (one class index per item) to rank against.")
    labels = torch.as_tensor(list(targets) if not isinstance(targets, Tensor) else targets, dtype=torch.long)
    num_classes = int(getattr(datamodule, "num_classes", 0) or int(labels.max()) + 1)
    index = _stratified(labels, num_classes, max_samples, seed)
    return Subset(dataset, index.tolist()), labels[index], num_classes


def _without_augmentation(dataset: Dataset[Any], datamodule: Any) -> Dataset[Any]:
    view: Any = copy.copy(dataset)
    if getattr(view, "hflip", False) is True:
        view.hflip = False
    eval_transform = getattr(datamodule, "eval_transform", None)
    if eval_transform is not None and hasattr(view, "transform"):
        view.transform = eval_transform
    return view


def _stratified(labels: Tensor, num_classes: int, max_samples: int | None, seed: int) -> Tensor:
    if max_samples is None or max_samples >= len(labels):
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels, minlength=num_classes)
    chosen = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c, as_tuple=True)[0]
        if len(members) == 0:
            continue
        take = max(1, int(max_samples * int(counts[c]) / len(labels)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.sort(torch.cat(chosen)).values


# -- one pass, four scores ---------------------------------------------------------------------------------------


@torch.inference_mode()
def extract(
    model: SourceModel,
    dataset: Dataset[Any],
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: str | None = None,
    renormalize: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Pooled features ``[N, D]`` and source probabilities ``[N, Z]`` (or ``None``) of every item, in one pass.

    Args:
        model: The candidate, from :func:`source_model`.
        dataset: ``(image, target, ...)`` items, e.g. from :func:`training_sample`.
        batch_size: Images per forward pass.
        device: Where the model runs.
        num_workers: Loader worker processes.
        progress: Description of a progress bar on stderr; ``None`` draws none.
        renormalize: ``(scale, shift)`` applied as ``x * scale + shift`` before the model, to serve images
            normalised one way to a model that expects another (see :func:`rank_candidates`).
    """
    from tqdm import tqdm

    model = model.to(device).eval()
    collate = getattr(dataset, "collate_fn", None) or getattr(getattr(dataset, "dataset", None), "collate_fn", None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    features, probs = [], []
    for batch in tqdm(loader, desc=progress, disable=progress is None, file=sys.stderr, unit="batch", leave=True):
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        if renormalize is not None:
            x = x * renormalize[0].to(device) + renormalize[1].to(device)
        f, logits = model(x)
        features.append(f.float().cpu())
        if logits is not None:
            probs.append(logits.double().softmax(1).cpu())
    return torch.cat(features), (torch.cat(probs) if probs else None)


@dataclass(frozen=True)
class CandidateScores:
    """One row of the table: the four scores (``None``: n/a), the feature width and the seconds it took."""

    label: str
    dim: int
    logme: float | None
    h_score: float | None
    leep: float | None
    nce: float | None
    seconds: float
    source_classes: int | None = None
    samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row."""
        return asdict(self)


def score_candidate(
    label: str, features: Tensor, labels: Tensor, probs: Tensor | None, seconds: float = 0.0
) -> CandidateScores:
    """The four scores of one candidate's features and source probabilities (LEEP, NCE: ``None`` without them).

    H-score is the regularised one (Ledoit-Wolf shrinkage, :func:`~lt_finetune.select.h_score`): the plain score
    is ``classes - 1`` for any features when ``N - 1 <= D`` and could not rank. With fewer images than features,
    LogME is computed on the features' coordinates in their own row space (``F V`` for the thin SVD
    ``F = U S V^T``, ``[N, N]``): its evidence depends on the features only through ``F F^T``, so it is unchanged,
    and it costs ``O(N^2 D)`` instead of ``O(D^3)``.
    """
    reduced = _row_space(features)
    return CandidateScores(
        label=label,
        dim=int(features.shape[1]),
        logme=logme(reduced, labels),
        h_score=h_score(features, labels, shrinkage="ledoit_wolf"),
        leep=leep(probs, labels) if probs is not None else None,
        nce=nce(probs, labels) if probs is not None else None,
        seconds=seconds,
        source_classes=int(probs.shape[1]) if probs is not None else None,
        samples=len(labels),
    )


def rank_candidates(
    candidates: Iterable[Candidate],
    dataset: Dataset[Any],
    labels: Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> list[CandidateScores]:
    """Build, run and score every candidate on ``dataset`` (one forward pass each); the time includes all three.

    ``normalization`` is the ``(mean, std)`` the dataset's images are normalised with
    (:func:`datamodule_normalization`): each pretrained candidate then sees them re-normalised with its own
    (:func:`candidate_normalization`), as it was trained and as it should be fine-tuned. ``None`` serves the images
    as they are to every candidate.
    """
    rows = []
    for candidate in candidates:
        start = time.perf_counter()
        model = source_model(candidate)
        features, probs = extract(
            model,
            dataset,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=candidate.label if progress else None,
            renormalize=renormalizer(normalization, candidate_normalization(candidate)),
        )
        del model
        rows.append(score_candidate(candidate.label, features, labels, probs, 0.0))
        rows[-1] = CandidateScores(**{**rows[-1].to_dict(), "seconds": time.perf_counter() - start})
    return rows


def _row_space(features: Tensor) -> Tensor:
    n, d = features.shape
    if n >= d:
        return features
    f = features.detach().double()
    u, s, _ = torch.linalg.svd(f, full_matrices=False)  # [N, N], [N]
    return u * s  # = F V: the same Gram matrix F F^T


@dataclass(frozen=True)
class Recommendation:
    """The outcome of :func:`recommend`: the winner, each candidate's mean rank, and the scores that were ranked."""

    best: str
    mean_ranks: dict[str, float]
    scores: tuple[str, ...]
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        """The rule, in words, with the scores it used and why the others were left out."""
        used = ", ".join(SCORES[s] for s in self.scores)
        out = f"lowest mean rank over {used} (1 = highest score), ties broken by the higher LogME"
        return out + "".join(f"; {SCORES[s]} left out: {why}" for s, why in self.left_out.items())


def recommend(rows: Sequence[CandidateScores]) -> Recommendation:
    """Recommend the candidate with the lowest mean rank over the usable scores; ties go to the higher LogME.

    A score is usable when every candidate has it (LEEP and NCE need a source head).

    Raises:
        ValueError: If ``rows`` is empty.
    """
    if not rows:
        raise ValueError("Expected at least one candidate to recommend from, got none.")
    left_out: dict[str, str] = {}
    for score in SCORES:
        if any(getattr(r, score) is None for r in rows):
            left_out[score] = "n/a for some candidate (no source classifier)"
    used = tuple(s for s in SCORES if s not in left_out) or ("logme",)
    ranks = {r.label: 0.0 for r in rows}
    for score in used:
        for r in rows:  # rank 1 = highest; equal scores share the better rank
            ranks[r.label] += 1 + sum(getattr(o, score) > getattr(r, score) for o in rows)
    mean = {label: total / max(len(used), 1) for label, total in ranks.items()}
    best = min(rows, key=lambda r: (mean[r.label], -_finite(r.logme)))
    return Recommendation(best.label, mean, used, left_out)


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -math.inf


def format_table(rows: Sequence[CandidateScores], recommendation: Recommendation | None = None) -> str:
    """The scores as an aligned text table, one candidate a line, with the mean rank when given."""
    header = ["candidate", "dim", *SCORES.values(), "mean rank", "time (s)"]
    body = []
    for r in rows:
        cells = [r.label, str(r.dim)]
        cells += [f"{getattr(r, s):.4f}" if getattr(r, s) is not None else "n/a" for s in SCORES]
        rank = recommendation.mean_ranks.get(r.label) if recommendation is not None else None
        cells += [f"{rank:.2f}" if rank is not None else "", f"{r.seconds:.1f}"]
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *body]
    ]
    return "\n".join(line.rstrip() for line in lines)


def rows_from_dicts(data: Iterable[Mapping[str, Any]]) -> list[CandidateScores]:
    """Rows back from :meth:`CandidateScores.to_dict` (e.g. a JSON file written by ``lt-finetune rank``)."""
    return [CandidateScores(**dict(d)) for d in data]
