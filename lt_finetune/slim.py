"""Slim checkpoints: leave out the tensors that still hold their pretrained values, and put them back on load.

A linear probe, or LoRA, trains a sliver of the model: the frozen backbone keeps the values it was loaded with,
which the pretrained weights file already holds. A slim checkpoint stores what changed (every trainable tensor,
every buffer that moved, the optimizer and loop state, adapters) plus a reference to the pretrained source
(``TransferModule``'s backbone name and weights file) and a digest of every tensor it left out. Loading re-creates
the backbone from that source, checks each digest and fills the missing tensors in, so the model is rebuilt bit for
bit; weights that differ are refused, never used.

The pieces, pure functions without a Trainer:

- :class:`PretrainedSource` and :func:`pretrained_source`: where a module's pretrained weights come from.
- :func:`plan_slim`: at the start of a fit, which tensors of the model hold their pretrained values.
- :func:`slim_checkpoint`: leave those out of a checkpoint being saved (``TransferModule.on_save_checkpoint``).
- :func:`restore_slim_checkpoint`: fill them back in before the weights are loaded
  (``TransferModule.on_load_checkpoint``, so ``load_from_checkpoint`` and ``fit(ckpt_path=...)`` both work).

The :class:`~lt_finetune.callbacks.SlimCheckpoint` callback turns it on for a fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lt_finetune.fingerprint import tensor_digest
from lt_finetune.snapshot import CHECKPOINT_KEY as SNAPSHOT_KEY

__all__ = [
    "SLIM_KEY",
    "PretrainedSource",
    "SlimPlan",
    "attach_plan",
    "detach_plan",
    "plan_slim",
    "pretrained_source",
    "restore_slim_checkpoint",
    "slim_checkpoint",
]

#: Key of a slim checkpoint's record: the source, and what was left out with its digests.
SLIM_KEY = "lt_finetune_slim"
_FORMAT = 1
#: Checkpoint entries holding model state dicts: the weights, and the training weights beside an averaged model.
_STATE_ENTRIES = ("state_dict", "current_model_state")
_PLAN_ATTR = "_lt_finetune_slim_plan"
_SOURCE_ATTR = "_lt_finetune_slim_source"


@dataclass(frozen=True)
class PretrainedSource:
    """A backbone that can be re-created with its pretrained weights: what slim checkpoints refer to.

    Attributes:
        backbone: The model name (``create_backbone``'s: timm, or ``"torchvision/<name>"``).
        pretrained: ``True`` (the library's download/cache path) or the absolute path of a weights file.
        input_size: ``TransferModule``'s ``input_size``.
    """

    backbone: str
    pretrained: bool | str
    input_size: tuple[int, int, int] = (3, 224, 224)

    def describe(self) -> str:
        """``"torchvision/mobilenet_v2 with weights '/path/w.pth'"``."""
        weights = "the library's pretrained weights" if self.pretrained is True else f"weights {self.pretrained!r}"
        return f"{self.backbone} with {weights}"

    def as_dict(self) -> dict[str, Any]:
        """Plain data, for checkpoints."""
        return {"backbone": self.backbone, "pretrained": self.pretrained, "input_size": list(self.input_size)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PretrainedSource:
        """The inverse of :meth:`as_dict`."""
        size = tuple(int(i) for i in data.get("input_size", (3, 224, 224)))
        return cls(str(data["backbone"]), data["pretrained"], (size[0], size[1], size[2]))

    def load(self) -> dict[str, Tensor]:
        """The pretrained backbone's state dict, re-created from the source.

        Raises:
            FileNotFoundError: If the weights file is gone.
            OSError, ValueError: As ``create_backbone`` raises them (no download, another architecture).
        """
        from lt_finetune.backbones import create_backbone

        if self.pretrained is not True and not os.path.isfile(str(self.pretrained)):
            raise FileNotFoundError(f"the weights file {self.pretrained!r} does not exist")
        module, _ = create_backbone(self.backbone, self.pretrained, input_size=self.input_size)
        return {name: t.detach() for name, t in module.state_dict().items()}


def pretrained_source(pl_module: nn.Module) -> PretrainedSource | None:
    """Where ``pl_module``'s backbone weights came from, if they can be re-created; else ``None``.

    A ``TransferModule`` built from a backbone name with ``pretrained=True`` or a weights file has one (the file's
    path made absolute). So has a model loaded from a slim checkpoint (it remembers the checkpoint's source), even
    though ``load_from_checkpoint`` builds it with ``pretrained=False``. A module backbone, random initialisation
    or a model of another class has none.
    """
    hparams: Mapping[str, Any] = getattr(pl_module, "hparams", None) or {}
    name, pretrained = hparams.get("backbone"), hparams.get("pretrained")
    recorded: PretrainedSource | None = pl_module.__dict__.get(_SOURCE_ATTR)
    if not isinstance(name, str):
        return None
    if pretrained is True or (isinstance(pretrained, (str, os.PathLike)) and os.fspath(pretrained)):
        weights = True if pretrained is True else os.path.abspath(os.fspath(pretrained))
        size = tuple(hparams.get("input_size") or (3, 224, 224))
        return PretrainedSource(name, weights, (int(size[0]), int(size[1]), int(size[2])))
    return recorded if recorded is not None and recorded.backbone == name else None


@dataclass
class SlimPlan:
    """Which tensors of a model hold pretrained values, found at the start of a fit.

    Attributes:
        source: The pretrained source.
        backbone: Attribute path of the backbone on the model.
        pristine: ``{state dict key: (source key, digest)}`` of the tensors equal to a source tensor.
        by_digest: ``{digest: source key}`` of every source tensor (finds copies elsewhere in a checkpoint).
    """

    source: PretrainedSource
    backbone: str
    pristine: dict[str, tuple[str, str]]
    by_digest: dict[str, str]


def plan_slim(
    pl_module: nn.Module,
    source: PretrainedSource,
    backbone: str = "backbone",
    reference: Mapping[str, Tensor] | None = None,
) -> SlimPlan:
    """Compare ``pl_module``'s backbone with ``source``'s tensors (re-created unless ``reference`` is given).

    A backbone tensor is pristine when it is bit-equal to the source tensor of the same name, or, where adapters
    renamed it (peft's ``base_layer``), to any source tensor.
    """
    tensors = dict(reference) if reference is not None else source.load()
    digests = {name: tensor_digest(t) for name, t in tensors.items()}
    by_digest: dict[str, str] = {}
    for name, digest in digests.items():
        by_digest.setdefault(digest, name)
    prefix = backbone + "."
    pristine: dict[str, tuple[str, str]] = {}
    for name, tensor in pl_module.get_submodule(backbone).state_dict(keep_vars=True).items():
        digest = tensor_digest(tensor)
        plain = ".".join(part for part in name.split(".") if part != "base_layer")
        match = next((n for n in (name, plain) if digests.get(n) == digest), None) or by_digest.get(digest)
        if match is not None:
            pristine[prefix + name] = (match, digest)
    return SlimPlan(source, backbone, pristine, by_digest)


def attach_plan(pl_module: nn.Module, plan: SlimPlan) -> None:
    """Make ``pl_module``'s checkpoints slim by ``plan`` (``slim_checkpoint`` reads it)."""
    pl_module.__dict__[_PLAN_ATTR] = plan


def detach_plan(pl_module: nn.Module) -> None:
    """Stop slimming ``pl_module``'s checkpoints."""
    pl_module.__dict__.pop(_PLAN_ATTR, None)


def slim_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Leave out of ``checkpoint`` the tensors that still equal the pretrained source (a no-op without a plan).

    Kept are every trainable parameter (``requires_grad``), every tensor whose digest no longer matches (moved
    BatchNorm statistics, weights trained earlier in the fit), adapters and everything else the checkpoint holds.
    Copies of pretrained tensors in the pretrained snapshot are left out too. Every tensor left out is hashed
    now, so a value written since the fit started is kept, however it was written.
    """
    plan: SlimPlan | None = pl_module.__dict__.get(_PLAN_ATTR)
    if plan is None:
        return
    trainable = {name for name, p in pl_module.named_parameters() if p.requires_grad}
    dropped: dict[str, dict[str, list[str]]] = {}
    for entry in _STATE_ENTRIES:
        state = checkpoint.get(entry)
        if not isinstance(state, dict):
            continue
        for key, (source_key, digest) in plan.pristine.items():
            tensor = state.get(key)
            if isinstance(tensor, Tensor) and key not in trainable and tensor_digest(tensor) == digest:
                del state[key]
                dropped.setdefault(entry, {})[key] = [source_key, digest]
    snapshots: dict[str, dict[str, list[str]]] = {}
    for path, saved in (checkpoint.get(SNAPSHOT_KEY) or {}).items():
        for name, tensor in list(saved.items()):
            digest = tensor_digest(tensor)
            if digest in plan.by_digest:
                del saved[name]
                snapshots.setdefault(path, {})[name] = [plan.by_digest[digest], digest]
    if dropped or snapshots:
        checkpoint[SLIM_KEY] = {
            "format": _FORMAT,
            "source": plan.source.as_dict(),
            "backbone": plan.backbone,
            "dropped": dropped,
            "snapshots": snapshots,
        }


def restore_slim_checkpoint(pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Fill the tensors a slim checkpoint left out back into it, in place; a no-op for a full checkpoint.

    Each tensor comes from ``pl_module`` itself where it holds it already (a model built with the same
    ``pretrained=`` file, as when resuming), else from the source the checkpoint names, re-created; either way its
    digest must match. Call it from ``on_load_checkpoint`` before anything reads the weights.

    Raises:
        FileNotFoundError: If a tensor is missing from the model and the source's weights file is gone.
        ValueError: If the source's tensors do not match the digests (other weights than the checkpoint's), or it
            cannot be re-created.
    """
    record = checkpoint.get(SLIM_KEY)
    if not record:
        return
    source = PretrainedSource.from_dict(record["source"])
    wanted: list[tuple[dict[str, Any], str, str, str]] = []  # (where, key, source key, digest)
    for entry, keys in record.get("dropped", {}).items():
        state = checkpoint.setdefault(entry, {})
        wanted += [(state, key, src, digest) for key, (src, digest) in keys.items() if key not in state]
    for path, names in record.get("snapshots", {}).items():
        saved = checkpoint.setdefault(SNAPSHOT_KEY, {}).setdefault(path, {})
        wanted += [(saved, name, src, digest) for name, (src, digest) in names.items() if name not in saved]
    if not wanted:
        return
    own = pl_module.state_dict()
    backbone = str(record.get("backbone", "backbone")) + "."
    found: dict[int, Tensor] = {}
    for i, (_, key, src, digest) in enumerate(wanted):
        for candidate in (key, backbone + src):
            tensor = own.get(candidate)
            if tensor is not None and tensor_digest(tensor) == digest:
                found[i] = tensor.detach().clone()
                break
    missing = [i for i in range(len(wanted)) if i not in found]
    if missing:
        tensors = _load_source(source, len(missing))
        wrong = [wanted[i][1] for i in missing if wanted[i][2] not in tensors]
        wrong += [
            wanted[i][1]
            for i in missing
            if wanted[i][2] in tensors and tensor_digest(tensors[wanted[i][2]]) != wanted[i][3]
        ]
        if wrong:
            raise ValueError(
                f"The slim checkpoint left out {len(wanted)} pretrained tensors of {source.describe()}, but that "
                f"source no longer holds them: {len(wrong)} differ from the digests saved ({_listed(wrong)}). "
                "These are not the weights the checkpoint was trained from; refusing to fill them in. Pass the "
                "original weights file: TransferModule.load_from_checkpoint(path, pretrained=...), or the same "
                "`pretrained` to the model you resume."
            )
        for i in missing:
            found[i] = tensors[wanted[i][2]].clone()
    for i, (where, key, _, _) in enumerate(wanted):
        where[key] = found[i]
    pl_module.__dict__[_SOURCE_ATTR] = source


def _load_source(source: PretrainedSource, count: int) -> dict[str, Tensor]:
    try:
        return source.load()
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"The slim checkpoint left out {count} pretrained tensors, to be re-created from {source.describe()}, "
            f"but {err} (and the model's own weights do not match). Pass the same weights file: "
            "TransferModule.load_from_checkpoint(path, pretrained='<weights file>'), or the same `pretrained` to the "
            "model you resume."
        ) from err
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"The slim checkpoint left out {count} pretrained tensors of {source.describe()}, which could not be "
            f"re-created: {err}"
        ) from err


def _listed(names: list[str], keep: int = 3) -> str:
    return ", ".join(names[:keep]) + (f", ... ({len(names)} in all)" if len(names) > keep else "")
