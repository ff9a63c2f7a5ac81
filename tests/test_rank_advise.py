"""`lt-finetune rank` and `lt-finetune advise`: candidates, the one-pass model, the rule, the table, the config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from torch import nn

from lt_finetune.advise import (
    RECIPES,
    Advice,
    Evidence,
    Thresholds,
    advise,
    advised_config,
    linear_probe_cv,
    source_confidence,
)
from lt_finetune.advise_command import _backbone_normalization
from lt_finetune.backbones import create_backbone
from lt_finetune.cli import main
from lt_finetune.data import AnimalMNISTDataModule
from lt_finetune.ranking import (
    Candidate,
    CandidateScores,
    candidate_normalization,
    datamodule_normalization,
    extract,
    parse_candidate,
    recommend,
    renormalizer,
    score_candidate,
    source_model,
    training_sample,
)
from lt_finetune.select import h_score, ledoit_wolf_shrinkage, logme

TINY_DATA = ["--data", "AnimalMNISTDataModule", "--data.image_size", "32", "--data.batch_size", "20"]
TINY_DATA += ["--data.train_per_class", "4", "--data.val_per_class", "2", "--data.test_per_class", "2"]


def _row(label: str, logme: float, h: float, leep: float | None = None, nce: float | None = None, **kw: Any) -> Any:
    return CandidateScores(label, kw.pop("dim", 8), logme, h, leep, nce, 0.0, samples=kw.pop("samples", 100))


# -- candidates --------------------------------------------------------------------------------------------------


def test_candidate_specs(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert parse_candidate("resnet18") == Candidate("resnet18", True, "resnet18")
    assert parse_candidate("resnet18=pretrained").weights is True
    assert parse_candidate("torchvision/mobilenet_v2=random").weights is False
    chosen = parse_candidate(f"torchvision/mobilenet_v2.IMAGENET1K_V1={weights}")
    assert chosen.weights == str(weights) and chosen.label == "torchvision/mobilenet_v2.IMAGENET1K_V1=w.pth"
    # A converted file trained with another normalisation says so after the weights.
    converted = parse_candidate(f"efficientnet_lite0={weights},mean=0.5,std=0.25/0.5/1")
    assert (converted.weights, converted.label) == (str(weights), "efficientnet_lite0=w.pth")
    assert candidate_normalization(converted) == ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("resnet1", ValueError, r"Unknown candidate 'resnet1': not a timm model name\. Close matches: \['resnet18'"),
        ("mobilenet_v2", ValueError, r"For torchvision's model use 'torchvision/mobilenet_v2'"),
        ("torchvision/mobilenetv2", ValueError, r"not a torchvision classification model.*'torchvision/mobilenet_v2'"),
        ("torchvision/resnet18.V9", ValueError, r"no weights 'V9' for 'resnet18'; available: \['IMAGENET1K_V1'"),
        ("resnet18=missing.pth", FileNotFoundError, r"weights 'missing.pth' is not a file.*'random' or 'pretrained'"),
        ("=random", ValueError, r"with a model name, got '=random'"),
        ("resnet18,mean=0.5", ValueError, r"give both `mean=` and `std=`, or neither"),
        ("resnet18,gamma=2", ValueError, r"unexpected 'gamma=2' after the weights; only `,mean=M,std=S` may follow"),
        ("resnet18,mean=a,std=1", ValueError, r"mean='a' is not a number or numbers joined by '/'"),
        ("resnet18,mean=0,std=0", ValueError, r"std must be positive, got '0'"),
    ],
)
def test_bad_candidates_say_what_is_wrong(spec: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        parse_candidate(spec)


# -- the one-pass model ------------------------------------------------------------------------------------------


def test_torchvision_source_model_gives_backbone_features_and_imagenet_logits(mobilenet_v2_weights: Path) -> None:
    x = torch.randn(2, 3, 32, 32)
    model = source_model(f"torchvision/mobilenet_v2={mobilenet_v2_weights}")
    assert model.has_source_head
    backbone, _ = create_backbone("torchvision/mobilenet_v2", str(mobilenet_v2_weights))
    with torch.no_grad():
        features, logits = model(x)
        torch.testing.assert_close(features, backbone.eval()(x))
        assert logits is not None and logits.shape == (2, 1000)
        torch.testing.assert_close(logits, model.model(x))  # the full ImageNet classifier's own output


def test_timm_source_model_reads_the_classifier_of_the_file(tmp_path: Path) -> None:
    source = timm.create_model("resnet10t", num_classes=7)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = source_model(f"resnet10t={path}")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features, logits = model(x)
        torch.testing.assert_close(logits, source.eval()(x))
        torch.testing.assert_close(features, create_backbone("resnet10t", str(path))[0].eval()(x))
    assert features.shape == (3, 512)
    # Without the classifier in the file, or with random weights: features only, so LEEP and NCE are n/a.
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}, headless)
    for spec in (f"resnet10t={headless}", "resnet10t=random"):
        plain = source_model(spec)
        assert not plain.has_source_head and plain(x)[1] is None
    assert source_model(nn.Conv2d(3, 4, 3))(x)[0].shape == (3, 4)  # a plain module's maps are pooled


def test_each_candidate_sees_the_images_normalised_as_its_weights_expect(tmp_path: Path) -> None:
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    half = ((0.5,) * 3, (0.5,) * 3)
    assert candidate_normalization(parse_candidate("vit_tiny_patch16_224")) == half  # timm's registered config
    assert candidate_normalization(parse_candidate("torchvision/mobilenet_v2")) == imagenet
    assert candidate_normalization(parse_candidate("vit_tiny_patch16_224=random")) is None  # nothing to match
    assert candidate_normalization(Candidate("efficientnet_lite0", "lite0.pth", "a converted file", *half)) == half
    dm = AnimalMNISTDataModule(image_size=16)
    assert datamodule_normalization(dm) == imagenet and datamodule_normalization(object()) is None
    # A model that returns its input: the features are the pixels the candidate sees.
    raw = torch.rand(6, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet)
    dataset = list(zip((raw - mean) / std, torch.zeros(6, dtype=torch.long), strict=True))
    identity = source_model(nn.Flatten())
    seen, _ = extract(identity, dataset, renormalize=renormalizer(imagenet, ((0.5,) * 3, (0.5,) * 3)))
    torch.testing.assert_close(seen, ((raw - 0.5) / 0.5).flatten(1))
    assert renormalizer(imagenet, imagenet) is None and renormalizer(None, imagenet) is None


def test_training_sample_is_stratified_and_unaugmented(animal_mnist: None) -> None:
    dm = AnimalMNISTDataModule(image_size=16, train_per_class=6, val_per_class=2, test_per_class=2)
    dataset, labels, classes = training_sample(dm, 30, seed=0)
    assert classes == 10 and len(labels) == 30 and torch.bincount(labels).tolist() == [3] * 10
    assert dm.train_dataset.hflip is True  # the datamodule keeps its augmentation
    first = dataset[0][0]
    assert all(torch.equal(first, dataset[0][0]) for _ in range(5))  # no random flip any more
    assert int(dataset[0][1]) == int(labels[0])


# -- scores and the rule -----------------------------------------------------------------------------------------


def test_scores_with_fewer_images_than_features_are_unchanged_by_the_row_space() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    features = torch.randn(30, 64, generator=g) + labels[:, None].float()
    row = score_candidate("a", features, labels, None)
    assert row.logme == pytest.approx(logme(features, labels), rel=1e-9)
    assert row.h_score == pytest.approx(h_score(features, labels, shrinkage="ledoit_wolf"), rel=1e-9)
    assert row.leep is None and row.nce is None and row.dim == 64


def test_regularised_h_score_ranks_where_the_plain_one_saturates() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    good = torch.randn(40, 100, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 100).double()
    poor = torch.randn(40, 100, generator=g)
    assert h_score(good, labels) == pytest.approx(3.0) and h_score(poor, labels) == pytest.approx(3.0)  # C - 1
    assert h_score(good, labels, shrinkage="ledoit_wolf") > 2 * h_score(poor, labels, shrinkage="ledoit_wolf")
    with pytest.raises(ValueError, match="shrinkage"):
        h_score(good, labels, shrinkage=1.0)
    with pytest.raises(ValueError, match="shrinkage"):
        h_score(good, labels, shrinkage="oas")


def test_ledoit_wolf_shrinkage_matches_scikit_learn() -> None:
    covariance = pytest.importorskip("sklearn.covariance")
    g = torch.Generator().manual_seed(0)
    for n, d in ((20, 50), (500, 8)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
        x = x - x.mean(0)
        expected = covariance.ledoit_wolf_shrinkage(x.numpy(), assume_centered=True)
        assert ledoit_wolf_shrinkage(x) == pytest.approx(expected, rel=1e-9)


def test_recommend_averages_ranks_and_breaks_ties_by_logme() -> None:
    rows = [
        _row("a", logme=0.3, h=1.0, leep=-1.0, nce=-0.5),  # ranks 2, 3, 1, 1 -> 1.75
        _row("b", logme=0.5, h=3.0, leep=-2.0, nce=-0.9),  # ranks 1, 1, 2, 3 -> 1.75, higher LogME: wins the tie
        _row("c", logme=0.1, h=2.0, leep=-3.0, nce=-0.7),  # ranks 3, 2, 3, 2 -> 2.5
    ]
    pick = recommend(rows)
    assert pick.mean_ranks == {"a": 1.75, "b": 1.75, "c": 2.5}
    assert pick.best == "b" and pick.scores == ("logme", "h_score", "leep", "nce") and not pick.left_out


def test_recommend_leaves_out_missing_scores() -> None:
    rows = [_row("a", logme=0.3, h=9.0, dim=512, samples=100), _row("b", logme=0.5, h=4.0, leep=-1.0, nce=-1.0)]
    pick = recommend(rows)
    assert pick.scores == ("logme", "h_score") and pick.best == "b"  # ranks 2 + 1 against 1 + 2: the higher LogME
    assert set(pick.left_out) == {"leep", "nce"} and "LEEP left out: n/a" in pick.rule
    with pytest.raises(ValueError, match="at least one candidate"):
        recommend([])


# -- rank, end to end --------------------------------------------------------------------------------------------


def test_rank_command_prints_the_table_and_the_pick(
    tmp_path: Path, animal_mnist: None, mobilenet_v2_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "rank.json"
    candidates = [f"torchvision/mobilenet_v2={mobilenet_v2_weights}", "resnet18=random"]
    assert main(["rank", *TINY_DATA, "--candidates", *candidates, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    header, first, second = next(
        lines for lines in [out.splitlines()[i : i + 3] for i in range(len(out.splitlines()))] if "LogME" in lines[0]
    )
    assert header.split() == ["candidate", "dim", "LogME", "H-score", "LEEP", "NCE", "mean", "rank", "time", "(s)"]
    assert first.split()[:2] == ["torchvision/mobilenet_v2=mobilenet_v2-b0353104.pth", "1280"]
    assert second.split()[:2] == ["resnet18=random", "512"] and second.split()[4:6] == ["n/a", "n/a"]
    assert "40 training images of AnimalMNISTDataModule (10 classes)" in out
    assert "LEEP left out: n/a for some candidate" in out and "images <= feature width" in out
    result = json.loads(output.read_text())
    rows = [CandidateScores(**row) for row in result["rows"]]
    assert result["best"] == recommend(rows).best and f"Recommended backbone: {result['best']}" in out
    assert rows[0].leep is not None and rows[0].source_classes == 1000 and rows[1].leep is None


def test_rank_command_rejects_a_bad_candidate_before_any_pass(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", *TINY_DATA, "--candidates", "resnet18=random", "resnet1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown candidate 'resnet1': not a timm model name. Close matches:" in err
    assert "Scoring" not in err


# -- advise ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evidence", "recipe", "last_reason"),
    [
        (Evidence(10, None, 10, pretrained=False), "full", "no pretrained weights"),
        (Evidence(10, 0.995, 10), "linear_probe", "0.995 >= 0.99 (fine-tuning can add at most 0.005) -> linear probe"),
        (Evidence(10, 0.64, 10), "full", "0.640 < 0.9 (chance 0.100): the features are far from the task"),
        (Evidence(200, 0.84, 10), "full", "0.840 < 0.9"),
        (Evidence(20, 0.93, 10), "l2sp", "20 labels per class < 50: few labels"),
        (Evidence(200, 0.97, 10), "lp_ft", "0.970 >= 0.95: fit the head first -> LP-FT"),
        (Evidence(200, 0.92, 10), "gradual_layerwise", "0.920 < 0.95: adapt the top layers first"),
    ],
)
def test_advise_rule(evidence: Evidence, recipe: str, last_reason: str) -> None:
    advice = advise(evidence)
    assert advice.recipe == recipe and last_reason in advice.reasons[-1]
    assert advice.description == RECIPES[recipe]


def test_advise_thresholds_are_checked_and_can_be_changed() -> None:
    with pytest.raises(ValueError, match=r"Expected `probe_far` <= `probe_lp_ft` <= `probe_enough`"):
        Thresholds(probe_far=0.97, probe_lp_ft=0.95)
    with pytest.raises(ValueError, match="probe_enough"):
        Thresholds(probe_enough=1.5)
    assert advise(Evidence(200, 0.84, 10), Thresholds(probe_far=0.8)).recipe == "gradual_layerwise"
    with pytest.raises(ValueError, match="Expected `probe_accuracy` for a pretrained backbone"):
        advise(Evidence(10, None, 10))


def test_linear_probe_cv() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    means = torch.randn(4, 300, generator=g)  # one direction per class: linearly separable
    assert linear_probe_cv(torch.randn(200, 300, generator=g) + means[labels], labels) == 1.0
    noise = linear_probe_cv(torch.randn(200, 300, generator=g), labels)
    assert noise < 0.45  # chance is 0.25
    with pytest.raises(ValueError, match="at least `folds` = 5 samples, got a class with 3"):
        linear_probe_cv(torch.randn(12, 3), torch.arange(12) % 4)
    assert source_confidence(torch.tensor([[0.2, 0.8], [0.6, 0.4]])) == pytest.approx(0.7)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_advised_config_is_accepted_by_fit(
    recipe: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {"class_path": "lt_finetune.data.AnimalMNISTDataModule", "init_args": {"image_size": 32}}
    config = advised_config(
        Advice(recipe),  # type: ignore[arg-type]
        backbone="resnet18",
        pretrained=False,
        data=data,
        groups=9,
        steps_per_epoch=10,
        trainer={"accelerator": "cpu", "logger": False},
    )
    path = tmp_path / "advised.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    names = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    expected = {
        "linear_probe": ["FreezeBackbone"],
        "lp_ft": ["LPFT"],
        "gradual_layerwise": ["GradualUnfreeze", "LayerwiseLR"],
        "full": [],
        "l2sp": ["L2SP"],
    }[recipe]
    assert names == [*expected, "ModelCheckpoint"]
    assert printed["trainer"]["max_epochs"] == 5 and printed["trainer"]["accelerator"] == "cpu"
    assert "logger" not in config["trainer"]  # only the listed trainer settings are carried over
    assert printed["model"]["weight_decay"] == (0.0 if recipe == "l2sp" else 0.05)
    if recipe == "lp_ft":
        lpft = printed["trainer"]["callbacks"][0]["init_args"]
        assert lpft["finetune_lr_factor"] == pytest.approx(0.002 / 0.03, abs=1e-6) and lpft["warmup_steps"] == 5
    if recipe == "gradual_layerwise":
        assert printed["trainer"]["callbacks"][0]["init_args"]["groups_per_stage"] == 5  # ceil(9 / 2)


def test_advise_command_writes_a_config_that_fits(
    tmp_path: Path, animal_mnist: None, mobilenet_v2_weights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "advised.yaml"
    model = ["--model.backbone", "torchvision/mobilenet_v2", "--model.pretrained", str(mobilenet_v2_weights)]
    trainer = ["--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path)]
    assert main(["advise", *TINY_DATA, *model, *trainer, "--folds", "4", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "labels per class: median 4, smallest class 4, 10 classes" in out
    assert "linear-probe accuracy: " in out and "40 training images; chance 0.100" in out
    assert "source-head confidence: " in out and "over 1000 source classes" in out
    assert "backbone: torchvision/mobilenet_v2, pretrained, 19 layer groups" in out
    assert "Recommended: " in out and f"lt-finetune fit --config {output}" in out
    text = output.read_text()
    assert text.startswith("# Written by `lt-finetune advise`.\n# labels per class: median 4")
    config = yaml.safe_load(text)
    assert config["model"]["backbone"] == "torchvision/mobilenet_v2"
    assert config["model"]["pretrained"] == str(mobilenet_v2_weights)
    assert config["data"]["init_args"]["train_per_class"] == 4
    assert config["data"]["init_args"].get("mean") is None  # the datamodule's ImageNet normalisation is MobileNetV2's
    assert config["trainer"]["default_root_dir"] == str(tmp_path)
    fit = ["fit", "--config", str(output), "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"]
    assert main(fit) == 0


def test_advise_writes_the_normalisation_a_backbone_expects(animal_mnist: None) -> None:
    dm = AnimalMNISTDataModule(image_size=16)
    assert _backbone_normalization("vit_tiny_patch16_224", True, dm) == ((0.5,) * 3, (0.5,) * 3)
    assert _backbone_normalization("torchvision/mobilenet_v2", True, dm) is None  # ImageNet's, as the data has
    assert _backbone_normalization("vit_tiny_patch16_224", False, dm) is None  # random weights expect nothing
