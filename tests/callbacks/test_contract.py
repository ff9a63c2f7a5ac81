"""The contract every callback meets, ours and those written against the public names only: pickles, round-trips
its state, resumes exactly, keeps separate checkpoint state per instance, and leaves nothing behind after a fit."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref
from typing import Any

import extending  # examples/extending.py: written against the public names only
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import DomainModule, ForeignModule, LRRecorder, TermsModule, flat_params, trainer
from torch.optim import lr_scheduler as S

import lt_finetune.callbacks as callbacks_pkg

# Arguments that make each callback change something within the 12 steps of the tiny runs.
ARGS: dict[str, dict[str, Any]] = {
    "FreezeBackbone": {"unfreeze_at_epoch": 1},
    "GradualUnfreeze": {"every_n_steps": 3, "warmup_steps": 2},
    "LayerwiseLR": {"decay": 0.5},
    "LoRA": {"r": 2, "alpha": 4.0},
    "L2SP": {"alpha": 0.5, "beta": 0.1},
    "BSS": {"weight": 0.05, "k": 2},
    "EMA": {"decay": 0.8},
    "LPFT": {"probe_steps": 4, "finetune_lr_factor": 0.5, "warmup_steps": 3},
    "DomainAdapt": {"method": "cdan", "entropy": True, "hidden": 8},
    # On these foreign modules the backbone trains (nothing to cache) and there is no named pretrained source.
    "CachedProbe": {"max_cache_bytes": 2**20},
    "SlimCheckpoint": {},
}
CASES = [
    *callbacks_pkg.__all__,
    "combined",
    "two_of_a_kind",
    "example_policy",
    "example_loss_term",
    "averaging_with_policies",
    "regularizers_with_policies",
    "domain_adapt_with_policies",
]
#: Cases whose callbacks add loss terms: they run on a module that applies them.
LOSS_TERM_CASES = {"example_loss_term", "L2SP", "BSS", "regularizers_with_policies"}
#: Cases that train on CombinedLoader batches with a target stream (domain adaptation).
DOMAIN_CASES = {"DomainAdapt", "domain_adapt_with_policies"}


def make(case: str) -> list[pl.Callback]:
    if case == "combined":
        return [
            callbacks_pkg.FreezeBackbone(groups=["0"], unfreeze_at_step=5),
            callbacks_pkg.GradualUnfreeze(every_n_epochs=1, warmup_steps=3),
            callbacks_pkg.LayerwiseLR(decay=0.6),
        ]
    if case == "two_of_a_kind":  # two instances of each class: their checkpoint state must not collide
        return [
            callbacks_pkg.GradualUnfreeze(every_n_steps=3, warmup_steps=2),
            callbacks_pkg.GradualUnfreeze(every_n_steps=5, warmup_steps=4),
            callbacks_pkg.LayerwiseLR(decay=0.5),
            callbacks_pkg.LayerwiseLR(decay=1.0, multipliers={"head": 2.0}),
        ]
    if case == "example_policy":
        return [extending.ThawAfterSteps(steps=5, head_factor=3.0), callbacks_pkg.LayerwiseLR(decay=0.7)]
    if case == "example_loss_term":
        return [extending.FeatureNormPenalty(weight=0.05), callbacks_pkg.GradualUnfreeze(every_n_steps=4)]
    if case == "averaging_with_policies":
        return [
            callbacks_pkg.GradualUnfreeze(every_n_steps=3, warmup_steps=2),
            callbacks_pkg.LayerwiseLR(decay=0.6),
            callbacks_pkg.EMA(decay=0.7),
        ]
    if case == "regularizers_with_policies":
        return [
            callbacks_pkg.LPFT(probe_steps=3, finetune_lr_factor=0.5, warmup_steps=2),
            callbacks_pkg.LayerwiseLR(decay=0.6),
            callbacks_pkg.L2SP(alpha=0.5, beta=0.1),
            callbacks_pkg.BSS(weight=0.05),
            callbacks_pkg.EMA(decay=0.6, update_starting_at_step=4),
        ]
    if case == "domain_adapt_with_policies":
        return [
            callbacks_pkg.GradualUnfreeze(every_n_steps=3, warmup_steps=2),
            callbacks_pkg.LayerwiseLR(decay=0.6),
            callbacks_pkg.DomainAdapt(method="dann", hidden=8, adabn=True),
        ]
    return [getattr(callbacks_pkg, case)(**ARGS[case])]


def module(case: str, **kwargs: Any) -> pl.LightningModule:
    if case in DOMAIN_CASES:
        return DomainModule(**kwargs)
    return TermsModule(**kwargs) if case in LOSS_TERM_CASES else ForeignModule(**kwargs)


def test_every_exported_callback_has_contract_arguments() -> None:
    assert set(callbacks_pkg.__all__) == set(ARGS)


def _cosine(opt: torch.optim.Optimizer) -> S.LRScheduler:
    return S.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3)


def _state(model: pl.LightningModule, trainer_: pl.Trainer) -> dict[str, Any]:
    opt = trainer_.optimizers[0]
    return {
        "params": flat_params(model),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "lrs": [(g.get("name"), g["lr"], g.get("nominal_lr")) for g in opt.param_groups],
        "opt_state": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups
            for p in g["params"]
        ],
        "bn_training": [m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)],
    }


class _PickleDuringFit(pl.Callback):
    """Pickles the callbacks and the scheduler in the middle of the fit, when the scheduler is wrapped."""

    def __init__(self, others: list[pl.Callback]) -> None:
        self.others = others
        self.scheduler_class: type | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == 3:
            scheduler = trainer.lr_scheduler_configs[0].scheduler
            clone = pickle.loads(pickle.dumps(scheduler))
            self.scheduler_class = type(clone)
            assert clone.state_dict() == scheduler.state_dict()
            for cb in self.others:
                pickle.loads(pickle.dumps(cb))
                copy.deepcopy(cb)


@pytest.mark.parametrize("case", CASES)
def test_pickles_and_state_dict_round_trip(tmp_path: Any, case: str) -> None:
    cbs = make(case)
    for cb in cbs:
        clone = pickle.loads(pickle.dumps(cb))
        assert repr(clone) == repr(cb)
    probe = _PickleDuringFit(cbs)
    model = module(case, scheduler=_cosine)
    fit = trainer(tmp_path, [*cbs, probe], max_epochs=2)
    fit.fit(model)
    assert probe.scheduler_class is S.CosineAnnealingLR
    # Nothing the callbacks attached outlives the fit: the scheduler has its own class back.
    assert type(fit.lr_scheduler_configs[0].scheduler) is S.CosineAnnealingLR
    assert not any("lr_factor" in g for g in fit.optimizers[0].param_groups)
    for cb in cbs:
        state = cb.state_dict()
        fresh = copy.deepcopy(make(case)[cbs.index(cb)])
        fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
        assert fresh.state_dict() == state
        pickle.dumps(cb)  # still pickles after a fit
    # Instances never collide in a checkpoint, two of one class included.
    keys = [cb.state_key for cb in cbs]
    assert len(set(keys)) == len(keys)


def test_state_keys_differ_by_arguments() -> None:
    a, b = callbacks_pkg.GradualUnfreeze(every_n_steps=3), callbacks_pkg.GradualUnfreeze(every_n_steps=5)
    assert a.state_key != b.state_key
    assert callbacks_pkg.LayerwiseLR(decay=0.5).state_key != callbacks_pkg.LayerwiseLR(decay=0.9).state_key


def test_identical_callbacks_are_refused(tmp_path: Any) -> None:
    cbs = [callbacks_pkg.LayerwiseLR(decay=0.5), callbacks_pkg.LayerwiseLR(decay=0.5)]
    with pytest.raises(ValueError, match=r"same arguments .*LayerwiseLR.*Remove the duplicate"):
        trainer(tmp_path, cbs).fit(ForeignModule())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop", ["step=6", "step=8"], ids=["mid_epoch", "epoch_boundary"])
def test_resume_matches_uninterrupted_run(tmp_path: Any, case: str, stop: str) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    full_model = module(case, scheduler=_cosine, optimizer="adamw")
    full_rec = LRRecorder()
    full = trainer(tmp_path / "full", [*make(case), full_rec, ckpt], enable_checkpointing=True)
    full.fit(full_model)

    resumed_model = module(case, scheduler=_cosine, optimizer="adamw")
    resumed_rec = LRRecorder()
    resumed = trainer(tmp_path / "resumed", [*make(case), resumed_rec])
    resumed.fit(resumed_model, ckpt_path=tmp_path / "ckpt" / f"{stop}.ckpt")

    a, b = _state(full_model, full), _state(resumed_model, resumed)
    assert (a["params"] - b["params"]).abs().max().item() == 0.0
    assert a["trainable"] == b["trainable"]
    assert a["lrs"] == b["lrs"]
    assert a["bn_training"] == b["bn_training"]
    assert len(a["opt_state"]) == len(b["opt_state"])
    for sa, sb in zip(a["opt_state"], b["opt_state"]):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))
    # The resumed run applied, step for step, the lrs of the uninterrupted one.
    done = int(stop.split("=")[1])
    assert resumed_rec.lrs == full_rec.lrs[done:]


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed (with a grad scaler) needs CUDA")


@pytest.mark.parametrize("precision", ["bf16-mixed", pytest.param("16-mixed", marks=_CUDA)])
@pytest.mark.parametrize("case", CASES)
def test_mixed_precision_trains_and_resumes_exactly(tmp_path: Any, case: str, precision: str) -> None:
    """Under mixed precision (``bf16-mixed`` runs on a CPU) every callback trains to finite weights, its
    checkpoints load, and a run resumed mid-epoch ends where the uninterrupted one does."""
    device = {"precision": precision, "accelerator": "gpu" if precision == "16-mixed" else "cpu"}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}")
    full_model = module(case, scheduler=_cosine, optimizer="adamw")
    before = flat_params(full_model)
    full = trainer(tmp_path / "full", [*make(case), ckpt], enable_checkpointing=True, **device)
    full.fit(full_model)
    after = flat_params(full_model).cpu()
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    resumed_model = module(case, scheduler=_cosine, optimizer="adamw")
    resumed = trainer(tmp_path / "resumed", make(case), **device)
    resumed.fit(resumed_model, ckpt_path=tmp_path / "ckpt" / "step=6.ckpt")
    assert torch.equal(flat_params(resumed_model).cpu(), after)


def _fit_and_forget(tmp_path: Any, callbacks: list[pl.Callback]) -> weakref.ref:
    # Lightning keeps the trainer (and so its optimizer) reachable from the model: both go out of scope here.
    model = ForeignModule(scheduler=_cosine, optimizer="adamw")
    fit = trainer(tmp_path, callbacks, max_epochs=1)
    fit.fit(model)
    return weakref.ref(fit.optimizers[0])


def test_finished_fits_free_their_optimizers(tmp_path: Any) -> None:
    """A sweep of fits in one process keeps no optimizer (state, parameters) alive; the callbacks are reused."""
    callbacks = make("combined")
    refs = [_fit_and_forget(tmp_path, callbacks) for _ in range(3)]
    gc.collect()
    assert [r() is None for r in refs] == [True, True, True]


def test_constructor_arguments_win_over_the_checkpoint(tmp_path: Any) -> None:
    """Resuming a LayerwiseLR(decay=0.5) checkpoint with decay=0.9 trains at 0.9: state holds counters only."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer(tmp_path / "a", [callbacks_pkg.LayerwiseLR(decay=0.5), ckpt], enable_checkpointing=True).fit(
        ForeignModule(scheduler=_cosine)
    )
    saved = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    assert all("factors" not in state for state in saved["callbacks"].values())
    callback, recorder = callbacks_pkg.LayerwiseLR(decay=0.9), LRRecorder()
    trainer(tmp_path / "b", [callback, recorder]).fit(
        ForeignModule(scheduler=_cosine), ckpt_path=tmp_path / "ckpt" / "step=4.ckpt"
    )
    assert repr(callback) == "LayerwiseLR(backbone='backbone', decay=0.9, multipliers=None)"
    for lrs in recorder.lrs:
        assert lrs["5"] / lrs["head"] == pytest.approx(0.9) and lrs["0"] / lrs["head"] == pytest.approx(0.9**4)
