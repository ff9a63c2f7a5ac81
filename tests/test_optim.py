"""lt_finetune.optim without a Trainer: the named-group contract, splitting, and exact scaled schedulers."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

from lt_finetune.groups import layer_groups
from lt_finetune.optim import (
    LR_FACTOR,
    NOMINAL_LR,
    add_param_groups,
    apply_lr_factors,
    attach_lr_scaling,
    build_param_groups,
    detach_lr_scaling,
    is_lr_scaled,
    is_no_decay,
    split_param_groups,
)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_build_param_groups_names_companions_and_extras() -> None:
    model = _model()
    groups = layer_groups(model[:2])
    head = list(model[2].named_parameters())
    extra = {"discriminator": list(nn.Linear(2, 1).named_parameters())}
    built = build_param_groups(groups, head, weight_decay=0.1, extras=extra)
    assert [g["name"] for g in built] == [
        "0",
        "0/no_decay",
        "1/no_decay",
        "head",
        "head/no_decay",
        "discriminator",
        "discriminator/no_decay",
    ]
    assert all(g["weight_decay"] == (0.0 if g["name"].endswith("/no_decay") else 0.1) for g in built)
    assert len(build_param_groups(groups, head, weight_decay=0.0)) == 3  # no companions without decay


def test_is_no_decay() -> None:
    assert is_no_decay("x.bias", nn.Parameter(torch.zeros(3, 3)))
    assert is_no_decay("norm.weight", nn.Parameter(torch.zeros(3)))
    assert is_no_decay("cls_token", nn.Parameter(torch.zeros(1, 1, 3)))
    assert not is_no_decay("fc.weight", nn.Parameter(torch.zeros(3, 3)))


def test_split_keeps_hyperparameters_and_repoints_schedulers() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = S.LambdaLR(opt, lambda s: 0.5**s)
    assignment = {id(p): "stem" for p in model[0].parameters()} | {id(p): "head" for p in model[2].parameters()}
    changes = split_param_groups(opt, assignment, ["stem", "head"], [sched])
    assert changes == ["split param group 0 into 2 layer groups"]  # LayerNorm's parameters default to "head"
    assert [g["layer_group"] for g in opt.param_groups] == ["stem", "head"]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == 2
    extra = nn.Linear(1, 1)
    add_param_groups(opt, {"adapter": list(extra.parameters())}, ["stem", "head", "adapter"], [sched])
    assert [g["name"] for g in opt.param_groups] == ["stem", "head", "adapter"] and len(sched.base_lrs) == 3


def test_factors_are_plain_data_in_the_param_groups() -> None:
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))], "layer_group": "stem"}], lr=0.2)
    apply_lr_factors(opt, lambda layer: 0.25)
    group = opt.param_groups[0]
    assert (group["lr"], group[NOMINAL_LR], group[LR_FACTOR]) == (0.05, 0.2, 0.25)
    apply_lr_factors(opt)  # stored factors are reused
    assert group["lr"] == 0.05
    pickle.loads(pickle.dumps(opt.state_dict()))


@pytest.mark.parametrize(
    "make",
    [
        lambda o: S.ExponentialLR(o, gamma=0.5),
        lambda o: S.StepLR(o, step_size=2, gamma=0.1),
        lambda o: S.CosineAnnealingLR(o, T_max=6),
        lambda o: S.ReduceLROnPlateau(o, patience=0, factor=0.5),
    ],
    ids=["exponential", "step", "cosine", "plateau"],
)
def test_scaled_scheduler_is_exact_pickles_and_detaches(make: object) -> None:
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    groups = [{"params": [params[0]], "layer_group": "stem"}, {"params": [params[1]], "layer_group": "head"}]
    opt = torch.optim.SGD(groups, lr=1.0)
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, ref = make(opt), make(ref_opt)  # type: ignore[operator]
    cls = type(sched)
    attach_lr_scaling(opt, lambda layer: 0.1 if layer == "stem" else 1.0, [sched])
    assert is_lr_scaled(sched) and isinstance(sched, cls)
    for step in range(6):
        opt.step()
        ref_opt.step()
        args = (1.0,) if isinstance(sched, S.ReduceLROnPlateau) else ()
        sched.step(*args)
        ref.step(*args)
        expected = ref_opt.param_groups[0]["lr"]
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * expected, rel=1e-12), step
        assert opt.param_groups[1]["lr"] == pytest.approx(expected, rel=1e-12), step
    clone = pickle.loads(pickle.dumps(sched))
    assert type(clone) is cls and type(copy.deepcopy(sched)) is cls
    detach_lr_scaling(opt, [sched])
    assert type(sched) is cls and not is_lr_scaled(sched)
    assert all(LR_FACTOR not in g for g in opt.param_groups)
