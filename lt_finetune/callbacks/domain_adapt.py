"""DomainAdapt: unsupervised domain adaptation (DANN, CDAN, MCC, MMD, CORAL, AdaBN) as one drop-in callback."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lt_finetune.domain.adabn import target_batchnorm
from lt_finetune.domain.discriminator import ConditionalDomainDiscriminator, DomainDiscriminator
from lt_finetune.domain.losses import coral_loss, domain_adversarial_loss, entropy_weights, mcc_loss, mmd_loss
from lt_finetune.domain.reversal import dann_coefficient, gradient_reversal
from lt_finetune.domain.selection import information_maximization, selection_score, soft_neighborhood_density
from lt_finetune.extras import add_trainable_module, trainable_modules
from lt_finetune.loss_terms import LossTermsMixin, StepOutputs
from lt_finetune.validation import check_bool, check_choice, check_float, check_int, check_optional_int

__all__ = ["DomainAdapt"]

Method = Literal["dann", "cdan", "mcc", "mmd", "coral", "none"]
METHODS: tuple[str, ...] = ("dann", "cdan", "mcc", "mmd", "coral", "none")
#: Default loss weights. CORAL's loss carries the paper's 1 / (4 d^2): without a large weight it does nothing.
DEFAULT_WEIGHTS: dict[str, float] = {"dann": 1.0, "cdan": 1.0, "mcc": 1.0, "mmd": 1.0, "coral": 1000.0, "none": 0.0}
_ADVERSARIAL = ("dann", "cdan")
DISCRIMINATOR = "discriminator"


class DomainAdapt(pl.Callback):
    """Align a labelled source domain with an unlabelled target domain, and choose models without target labels.

    Adds the loss term ``domain`` (logged as ``train/loss_domain``) computed from the features and logits of the
    source batch and of the ``"target"`` stream of the same forward pass (:class:`~lt_finetune.loss_terms.StepOutputs`):

    - ``"dann"``: a domain discriminator on the features behind a gradient-reversal layer (Ganin et al., 2016);
    - ``"cdan"``: the discriminator sees the features conditioned on the class predictions (Long et al., 2018);
      ``entropy=True`` weights samples by ``1 + exp(-H)`` (CDAN+E);
    - ``"mcc"``: minimum class confusion of the target predictions (Jin et al., 2020), no discriminator;
    - ``"mmd"``: multi-kernel MMD between source and target features (DAN);
    - ``"coral"``: distance between the feature covariances (Deep CORAL);
    - ``"none"``: no alignment loss (with ``adabn=True``: AdaBN alone; with ``adabn=False``: a source-only run
      that still logs the target scores).

    The reversal coefficient follows DANN's ramp ``λ(p) = 2 / (1 + exp(-gamma p)) - 1`` with ``p`` the trainer's
    ``global_step`` over its total steps, so a resumed run continues the ramp exactly. The discriminator is an extra
    trainable module (``lt_finetune.extras``): its own param group ``"discriminator"`` (this callback adds one param
    group to the optimizer), saved in checkpoints, registered with DDP.

    ``adabn=True`` re-estimates the BatchNorm statistics on the unlabelled target data before every evaluation on
    target, and restores the source statistics afterwards (Li et al., 2016).

    **Model selection without target labels.** At the end of every validation the callback logs

    - ``val/source_acc``: accuracy on the source validation split (the datamodule's ``val_dataloader``);
    - ``val/target_im``: information maximization of the target predictions, ``H(mean p) - mean H(p)``;
    - ``val/target_snd``: soft neighbourhood density of the target predictions;
    - ``val/da_score``: the selection rule ``(val/source_acc + val/target_im / log C) / 2``; monitor it with
      ``ModelCheckpoint(monitor="val/da_score", mode="max")``;
    - ``val/target_acc``, only where the target has labels: reported, never to be used for selection.

    After testing it logs ``test/target_acc`` (and ``test/target_im``). Target data come from the datamodule's
    ``target_dataloader(split)`` (:class:`~lt_finetune.data.DomainAdaptDataModule`); without one, the training
    loader's ``"target"`` stream serves AdaBN and the label-free scores.

    Works with ``TransferModule`` and with any LightningModule that inherits
    :class:`~lt_finetune.loss_terms.LossTermsMixin` and hands its target stream to ``StepOutputs.streams``. The
    feature size for the discriminator comes from ``in_features``, else the module's ``num_features``, else the
    first ``nn.Linear`` of its ``head``; the number of classes (CDAN) from the last ``nn.Linear`` of the head.

    Args:
        method: The alignment loss (see above).
        weight: Weight of the alignment loss; ``None``: the method's default (:data:`DEFAULT_WEIGHTS`).
        adabn: Evaluate on target with BatchNorm statistics of the target data.
        entropy: CDAN+E's entropy conditioning (``method="cdan"`` only).
        gamma: Steepness of DANN's ramp of the reversal coefficient.
        hidden: Width of the discriminator's hidden layers.
        temperature: MCC's softmax temperature.
        in_features: Feature size, where the module does not tell it.
        max_eval_batches: Cap on the target batches used per evaluation (AdaBN and scores); ``None``: all.

    Raises:
        ValueError: For an unknown ``method`` or a value out of range; at fit start for a training loader without a
            ``"target"`` stream, or a feature size that cannot be found or does not match the discriminator.
        TypeError: At setup, for a module without ``LossTermsMixin`` when ``method`` adds a loss.

    Example::

        >>> callback = DomainAdapt(method="cdan", entropy=True, adabn=True)  # CDAN+E, evaluated with AdaBN
        >>> callback.weight, DomainAdapt(method="coral").weight
        (1.0, 1000.0)
    """

    def __init__(
        self,
        method: Method = "dann",
        weight: float | None = None,
        adabn: bool = False,
        entropy: bool = False,
        gamma: float = 10.0,
        hidden: int = 1024,
        temperature: float = 2.5,
        in_features: int | None = None,
        max_eval_batches: int | None = None,
    ) -> None:
        self.method = check_choice("method", method, METHODS)
        self.weight = DEFAULT_WEIGHTS[method] if weight is None else check_float("weight", weight, 0.0)
        self.adabn = check_bool("adabn", adabn)
        self.entropy = check_bool("entropy", entropy)
        if self.entropy and method != "cdan":
            raise ValueError(f"Expected `entropy` to be False unless method='cdan', got entropy=True with {method!r}.")
        self.gamma = check_float("gamma", gamma, 0.0, low_open=True)
        self.hidden = check_int("hidden", hidden, 1)
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        self.in_features = check_optional_int("in_features", in_features, 1)
        self.max_eval_batches = check_optional_int("max_eval_batches", max_eval_batches, 1)
        self.coefficient = 0.0  # the current reversal coefficient, a function of the trainer's progress
        self._discriminator: nn.Module | None = None
        self._added_discriminator = False
        self._total_steps = 1

    def _config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "weight": self.weight,
            "adabn": self.adabn,
            "entropy": self.entropy,
            "gamma": self.gamma,
            "hidden": self.hidden,
            "temperature": self.temperature,
            "in_features": self.in_features,
            "max_eval_batches": self.max_eval_batches,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config().items())})"

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self._config())

    # -- setup ---------------------------------------------------------------------------------------------------

    @property
    def _adds_loss(self) -> bool:
        return self.method != "none"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._adds_loss and not isinstance(pl_module, LossTermsMixin):
            raise TypeError(
                f"DomainAdapt(method={self.method!r}) adds a loss term: {type(pl_module).__name__} must inherit "
                "lt_finetune.loss_terms.LossTermsMixin and return self.apply_loss_terms(loss, outputs) from "
                "training_step, with the target stream's features and logits in `outputs.streams['target']` "
                "(TransferModule does)."
            )
        if self.method in _ADVERSARIAL:
            features = _feature_size(pl_module, self.in_features, self.method)
            if self.method == "dann":
                module: nn.Module = DomainDiscriminator(features, self.hidden)
            else:
                module = ConditionalDomainDiscriminator(features, _class_count(pl_module), self.hidden)
            self._added_discriminator = DISCRIMINATOR not in trainable_modules(pl_module)
            self._discriminator = add_trainable_module(pl_module, DISCRIMINATOR, module)
            _check_discriminator(self._discriminator, module)
        if self._adds_loss:
            pl_module.add_loss_term("domain", self.term)  # type: ignore[operator]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Before the first step: the loaders are built now.
        if self._adds_loss and _target_stream(trainer) is None:
            raise ValueError(
                f"DomainAdapt(method={self.method!r}) found no target data in the training batches of "
                f"{type(pl_module).__name__}: train on lt_finetune.data.DomainAdaptDataModule(source=..., target=...) "
                "or on CombinedLoader({'source': labelled, 'target': unlabelled}, 'max_size_cycle')."
            )
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if math.isfinite(total) and total > 0 else 1
        self._set_coefficient(trainer.global_step)
        rank_zero_info(
            f"DomainAdapt: {self!r}" + (f"; added the param group {DISCRIMINATOR!r}" if self._discriminator else "")
        )

    def _set_coefficient(self, step: int) -> None:
        self.coefficient = dann_coefficient(step / self._total_steps, self.gamma)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._set_coefficient(trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._adds_loss and isinstance(pl_module, LossTermsMixin):
            pl_module.remove_loss_term("domain")
        self._discriminator = None

    # -- the loss term ----------------------------------------------------------------------------------------------

    def term(self, outputs: StepOutputs) -> Tensor:
        """The alignment loss of one step, times ``weight``."""
        target = outputs.streams.get("target")
        if target is None:
            raise ValueError(
                "DomainAdapt found no 'target' stream in the step's outputs (got streams "
                f"{sorted(outputs.streams)}): the training batch must be a dict with a 'target' entry and the "
                "training_step must put its features and logits in StepOutputs.streams['target']."
            )
        fs, ft = outputs.features, target.features
        if fs.ndim != 2 or ft.ndim != 2:
            raise ValueError(
                f"DomainAdapt expects pooled features [B, D], got source {list(fs.shape)} and target {list(ft.shape)}."
            )
        if self.method == "dann":
            assert self._discriminator is not None
            d = self._discriminator(gradient_reversal(torch.cat([fs, ft]), self.coefficient))
            loss = domain_adversarial_loss(d[: len(fs)], d[len(fs) :])
        elif self.method == "cdan":
            assert self._discriminator is not None
            features = torch.cat([fs, ft])
            probs = torch.softmax(torch.cat([outputs.logits, target.logits]).float(), dim=1).detach()
            conditioned = self._discriminator.condition(features.float(), probs)  # type: ignore[operator]
            d = self._discriminator.discriminator(gradient_reversal(conditioned, self.coefficient))  # type: ignore[operator]
            ws = wt = None
            if self.entropy:
                ws, wt = entropy_weights(probs[: len(fs)]), entropy_weights(probs[len(fs) :])
            loss = domain_adversarial_loss(d[: len(fs)], d[len(fs) :], ws, wt)
        elif self.method == "mcc":
            loss = mcc_loss(target.logits, self.temperature)
        elif self.method == "mmd":
            loss = mmd_loss(fs, ft)
        else:
            loss = coral_loss(fs, ft)
        return self.weight * loss

    # -- evaluation on target -------------------------------------------------------------------------------------

    def _target_loader(self, trainer: pl.Trainer, split: str) -> Iterable[Any] | None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and callable(getattr(datamodule, "target_dataloader", None)):
            return datamodule.target_dataloader(split)
        return _target_stream(trainer) if split == "train" else None

    def _batches(self, loader: Iterable[Any]) -> Iterable[Any]:
        for i, batch in enumerate(loader):
            if self.max_eval_batches is not None and i >= self.max_eval_batches:
                return
            yield batch

    def _predict(self, pl_module: pl.LightningModule, loader: Iterable[Any]) -> tuple[Tensor, Tensor | None]:
        logits, labels = [], []
        with torch.no_grad():
            for batch in self._batches(loader):
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                logits.append(pl_module(x.to(pl_module.device)).float().cpu())
                if isinstance(batch, (list, tuple)) and len(batch) > 1:
                    labels.append(batch[1].cpu())
        return torch.cat(logits), (torch.cat(labels) if labels else None)

    def _evaluate_target(self, trainer: pl.Trainer, pl_module: pl.LightningModule, split: str) -> dict[str, float]:
        pool = self._target_loader(trainer, "train")
        labelled = self._target_loader(trainer, split)
        results: dict[str, float] = {}
        if pool is None:
            return results
        was_training = pl_module.training
        pl_module.eval()
        try:
            with _maybe_adabn(self.adabn, pl_module, self._batches(pool)):
                unlabelled, _ = self._predict(pl_module, pool)
                results["target_im"] = float(information_maximization(unlabelled))
                results["target_snd"] = float(soft_neighborhood_density(unlabelled))
                if labelled is not None:
                    logits, labels = self._predict(pl_module, labelled)
                    if labels is not None:
                        results["target_acc"] = float((logits.argmax(1) == labels).float().mean())
                results["_im_norm"] = 2.0 * selection_score(0.0, unlabelled)  # IM / log C
        finally:
            pl_module.train(was_training)
        return results

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        results = self._evaluate_target(trainer, pl_module, "val")
        source = trainer.val_dataloaders
        if isinstance(source, (list, tuple)):
            source = source[0] if source else None
        if source is not None:
            logits, labels = self._predict(pl_module, source)
            if labels is not None:
                results["source_acc"] = float((logits.argmax(1) == labels).float().mean())
        im = results.pop("_im_norm", None)
        if im is not None and "source_acc" in results:
            results["da_score"] = 0.5 * (results["source_acc"] + im)
        for name, value in results.items():
            pl_module.log(f"val/{name}", value, on_step=False, on_epoch=True)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        results = self._evaluate_target(trainer, pl_module, "test")
        results.pop("_im_norm", None)
        for name in ("target_acc", "target_im"):
            if name in results:
                pl_module.log(f"test/{name}", results[name], on_step=False, on_epoch=True)

    # -- state ------------------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # The ramp is a function of the restored global step and the discriminator lives in the model's state:
        # nothing else to save.
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_discriminator"] = None  # lives in the model; a pickled callback does not drag it along
        return state


class _NullContext:
    def __enter__(self) -> int:
        return 0

    def __exit__(self, *args: object) -> None:
        return None


def _maybe_adabn(enabled: bool, module: nn.Module, batches: Iterable[Any]) -> Any:
    return target_batchnorm(module, batches) if enabled else _NullContext()


def _target_stream(trainer: pl.Trainer) -> Any:
    loaders = trainer.train_dataloader
    if isinstance(loaders, Mapping) and "source" in loaders:
        return loaders.get("target")
    return None


def _linears(module: nn.Module | None) -> list[nn.Linear]:
    if module is None:
        return []
    if isinstance(module, nn.Linear):
        return [module]
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _feature_size(pl_module: nn.Module, given: int | None, method: str) -> int:
    found = getattr(pl_module, "num_features", None)
    head = getattr(pl_module, "head", None)
    linears = _linears(head) if isinstance(head, nn.Module) else []
    inferred = found if isinstance(found, int) else (linears[0].in_features if linears else None)
    if given is not None:
        if inferred is not None and inferred != given:
            raise ValueError(
                f"DomainAdapt(in_features={given}) does not match {type(pl_module).__name__}, whose features have "
                f"{inferred} entries; remove `in_features` or set it to {inferred}."
            )
        return given
    if inferred is None:
        raise ValueError(
            f"DomainAdapt(method={method!r}) cannot tell the feature size of {type(pl_module).__name__}: give it a "
            "`num_features` attribute or a `head` starting with nn.Linear, or pass `in_features`."
        )
    return inferred


def _class_count(pl_module: nn.Module) -> int:
    head = getattr(pl_module, "head", None)
    linears = _linears(head) if isinstance(head, nn.Module) else []
    if not linears:
        raise ValueError(
            f"DomainAdapt(method='cdan') needs the number of classes of {type(pl_module).__name__}: give it a `head` "
            "ending with nn.Linear."
        )
    return linears[-1].out_features


def _check_discriminator(existing: nn.Module, wanted: nn.Module) -> None:
    shapes = [tuple(p.shape) for p in existing.parameters()]
    if shapes != [tuple(p.shape) for p in wanted.parameters()]:
        raise ValueError(
            "The model already has a discriminator of other shapes (from an earlier fit with other arguments); "
            f"remove it with lt_finetune.extras.remove_trainable_module(model, {DISCRIMINATOR!r}) first."
        )
