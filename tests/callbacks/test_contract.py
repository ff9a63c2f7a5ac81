"""The contract every exported callback meets: pickles, round-trips its state, and resumes exactly."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import ForeignModule, LRRecorder, flat_params, trainer
from torch.optim import lr_scheduler as S

import lt_finetune.callbacks as callbacks_pkg

# Arguments that make each callback change something within the 12 steps of the tiny runs.
ARGS: dict[str, dict[str, Any]] = {
    "FreezeBackbone": {"unfreeze_at_epoch": 1},
    "GradualUnfreeze": {"every_n_steps": 3, "warmup_steps": 2},
    "LayerwiseLR": {"decay": 0.5},
}
CASES = [*callbacks_pkg.__all__, "combined"]


def make(case: str) -> list[pl.Callback]:
    if case == "combined":
        return [
            callbacks_pkg.FreezeBackbone(groups=["0"], unfreeze_at_step=5),
            callbacks_pkg.GradualUnfreeze(every_n_epochs=1, warmup_steps=3),
            callbacks_pkg.LayerwiseLR(decay=0.6),
        ]
    return [getattr(callbacks_pkg, case)(**ARGS[case])]


def test_every_exported_callback_has_contract_arguments() -> None:
    assert set(callbacks_pkg.__all__) == set(ARGS)


def _cosine(opt: torch.optim.Optimizer) -> S.LRScheduler:
    return S.CosineAnnealingLR(opt, T_max=12, eta_min=1e-3)


def _state(model: pl.LightningModule, trainer_: pl.Trainer) -> dict[str, Any]:
    opt = trainer_.optimizers[0]
    return {
        "params": flat_params(model),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "lrs": [(g["name"], g["lr"], g.get("nominal_lr")) for g in opt.param_groups],
        "opt_state": [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
            for g in opt.param_groups
            for p in g["params"]
        ],
        "bn_training": [m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)],
    }


@pytest.mark.parametrize("case", CASES)
def test_pickles_and_state_dict_round_trip(tmp_path: Any, case: str) -> None:
    cbs = make(case)
    for cb in cbs:
        clone = pickle.loads(pickle.dumps(cb))
        assert repr(clone) == repr(cb)
    trainer(tmp_path, cbs, max_epochs=2).fit(ForeignModule(scheduler=_cosine))
    for cb in cbs:
        state = cb.state_dict()
        fresh = copy.deepcopy(make(case)[cbs.index(cb)])
        fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
        assert fresh.state_dict() == state
        pickle.dumps(cb)  # still pickles after a fit
    # Two instances of one callback class do not collide in a checkpoint.
    keys = [cb.state_key for cb in cbs]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop", ["step=6", "step=8"], ids=["mid_epoch", "epoch_boundary"])
def test_resume_matches_uninterrupted_run(tmp_path: Any, case: str, stop: str) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    full_model = ForeignModule(scheduler=_cosine, optimizer="adamw")
    full_rec = LRRecorder()
    full = trainer(tmp_path / "full", [*make(case), full_rec, ckpt], enable_checkpointing=True)
    full.fit(full_model)

    resumed_model = ForeignModule(scheduler=_cosine, optimizer="adamw")
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
