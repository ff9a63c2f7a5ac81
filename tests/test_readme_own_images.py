"""The README's "Your own images" section, run as written on a small folder of real images."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from image_folders import write_animal_folders

README = Path(__file__).parents[1] / "README.md"


def _section() -> tuple[str, list[str]]:
    text = README.read_text()
    section = text.split("## Your own images", 1)[1].split("\n## ", 1)[0]
    (config,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    (commands,) = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return config, [line for line in commands.splitlines() if line.strip()]


@pytest.mark.slow
def test_readme_own_images_commands_run_as_written(
    tmp_path: Path, animal_mnist: None, mobilenet_v2_weights: Path
) -> None:
    config, commands = _section()
    # The one change: offline, the ImageNet weights come from the local file instead of the download.
    assert "pretrained: true" in config
    (tmp_path / "my_images.yaml").write_text(config.replace("pretrained: true", f"pretrained: {mobilenet_v2_weights}"))
    write_animal_folders(tmp_path / "images", classes=3, train=12, val=4, new=3, size=28)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for command in commands:
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    fit, test, predict, export, python = outputs
    assert "Best checkpoint (val/acc=" in fit and (tmp_path / "runs/checkpoints/best.ckpt").is_file()
    assert re.search(r"^class +precision +recall +support\n(bear|bird|cat) ", test, flags=re.MULTILINE)
    assert "Confusion matrix written to runs/confusion_matrix.png" in test
    assert (tmp_path / "runs/confusion_matrix.png").stat().st_size > 1000
    assert "written to runs/predictions.csv" in predict
    with open(tmp_path / "runs/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["label"] in ("bear", "bird", "cat") for r in rows)
    assert sorted(r["path"] for r in rows) == sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "images/new").rglob("*.*")
    )
    assert "Exported torchscript model to" in export and (tmp_path / "runs/checkpoints/best.pt.json").is_file()
    assert re.match(r"ImagePrediction\(path='images/new/\S+', label='(bear|bird|cat)', probability=0\.\d+", python)
