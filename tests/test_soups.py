"""WiSE-FT and model soups: the pure functions, θ₀ from a checkpoint's snapshot, and `lt-finetune soup`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tinymodels import TermsModule, trainer

from lt_finetune.callbacks import L2SP
from lt_finetune.cli import main
from lt_finetune.soups import (
    greedy_soup,
    interpolate,
    load_state,
    plot_sweep,
    pretrained_state,
    save_state,
    uniform_soup,
    wise_ft,
)

TINY = Path(__file__).parents[1] / "examples" / "configs" / "tiny_fit.yaml"


def _state(w: list[float], steps: int = 3) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(steps)}


def test_interpolate_ends_and_integer_tensors() -> None:
    a, b = _state([0.0, 1.0], 1), _state([2.0, 3.0], 7)
    assert torch.equal(interpolate(a, b, 0.0)["w"], a["w"]) and torch.equal(interpolate(a, b, 1.0)["w"], b["w"])
    assert torch.allclose(interpolate(a, b, 0.5)["w"], torch.tensor([1.0, 2.0]))
    assert int(interpolate(a, b, 0.5)["bn.num_batches_tracked"]) == 7
    with pytest.raises(ValueError, match=r"shape \[3\] in θ₀ and \[2\] in θ"):
        interpolate({"w": torch.zeros(3)}, b, 0.5)


def test_uniform_soup_is_the_mean_and_needs_one_architecture() -> None:
    soup = uniform_soup([_state([0.0, 0.0]), _state([1.0, 2.0]), _state([2.0, 4.0])])
    assert torch.allclose(soup["w"], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="other tensors than state dict 0"):
        uniform_soup([_state([0.0]), {"v": torch.zeros(1)}])


def test_greedy_soup_leaves_out_an_ingredient_that_hurts() -> None:
    states = [_state([1.0]), _state([1.2]), _state([9.0])]

    def score(sd: dict[str, torch.Tensor]) -> float:
        return -abs(float(sd["w"][0]) - 1.1)

    soup, chosen, individual = greedy_soup(states, score)
    assert chosen == [0, 1] or chosen == [1, 0]
    assert torch.allclose(soup["w"], torch.tensor([1.1])) and individual[2] < individual[0]


def test_wise_ft_picks_the_best_alpha_and_plots(tmp_path: Path) -> None:
    best, curve = wise_ft(_state([0.0]), _state([10.0]), [0.0, 0.25, 0.5, 1.0], lambda sd: -abs(float(sd["w"]) - 3))
    assert [p.alpha for p in curve] == [0.0, 0.25, 0.5, 1.0]
    assert float(best["w"]) == pytest.approx(2.5)
    plot_sweep(curve, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000
    with pytest.raises(ValueError, match=r"every alpha in \[0.0, 1.0\], got 1.5"):
        wise_ft(_state([0.0]), _state([1.0]), [1.5], lambda sd: 0.0)


def test_theta0_comes_from_the_checkpoints_snapshot(tmp_path: Path) -> None:
    model = TermsModule()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(tmp_path, [L2SP(alpha=0.1), ckpt], enable_checkpointing=True, max_epochs=1).fit(model)
    state, checkpoint = load_state(tmp_path / "last.ckpt")
    theta0 = pretrained_state(checkpoint)
    assert all(torch.equal(theta0[n], initial[n]) for n in initial if n.startswith("backbone."))
    assert torch.equal(theta0["head.weight"], state["head.weight"]) and not torch.equal(
        state["backbone.0.weight"], initial["backbone.0.weight"]
    )
    save_state(checkpoint, interpolate(theta0, state, 0.5), tmp_path / "half.ckpt", alpha=0.5)
    reloaded, saved = load_state(tmp_path / "half.ckpt")
    assert saved["lt_finetune_soup"] == {"alpha": 0.5} and "optimizer_states" not in saved
    expected = (initial["backbone.0.weight"] + state["backbone.0.weight"]) / 2
    assert torch.allclose(reloaded["backbone.0.weight"], expected)
    with pytest.raises(ValueError, match="no pretrained snapshot of 'encoder'"):
        pretrained_state(checkpoint, "encoder")


@pytest.mark.slow  # a fit and seven validations of the tiny config: about 30 s on 2 cores
def test_soup_command_scores_soups_and_wise_ft_on_validation_data(
    tmp_path: Path, animal_mnist: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    fit_args: list[Any] = ["fit", "--config", str(TINY), *root, "--trainer.enable_checkpointing", "true"]
    fit_args += ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-1"]
    main(fit_args)
    ckpts = sorted(str(p) for p in tmp_path.rglob("epoch=*.ckpt"))
    assert len(ckpts) == 2, ckpts
    out, plot = tmp_path / "soup.ckpt", tmp_path / "wise.png"
    main(
        [
            "soup",
            *ckpts,
            "--config",
            str(TINY),
            *root,
            "--alphas",
            "[0.0, 1.0]",
            "--output",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    printed = capsys.readouterr().out
    for line in ("uniform soup of 2", "greedy soup of", "WiSE-FT alpha=0 of", "WiSE-FT alpha=1 of", "Best: "):
        assert line in printed, printed[-2000:]
    assert plot.stat().st_size > 1000
    _, saved = load_state(out)
    assert saved["lt_finetune_soup"]["metric"] == "val/acc" and 0.0 <= saved["lt_finetune_soup"]["score"] <= 1.0
