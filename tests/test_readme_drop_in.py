"""The README's drop-in snippet, run as written against a small LightningModule of the kind it describes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"

# What the snippet assumes the user already has: a module whose pretrained part is `encoder`, and a datamodule.
PROJECT = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lightning.pytorch as pl


class MyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class MyDataModule(pl.LightningDataModule):
    def train_dataloader(self):
        x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=16)
"""


def _snippet() -> str:
    section = README.read_text().split("## Drop-in use in an existing Lightning project", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return code


@pytest.mark.ddp
def test_readme_drop_in_snippet_runs_and_resumes_from_last(tmp_path: Path) -> None:
    code = _snippet()
    assert 'ckpt_path="last"' in code and "pl.Trainer(" in code
    # The snippet as written, with a trainer small enough for a test (a user's run sets its own length).
    script = PROJECT + code.replace("pl.Trainer(", "pl.Trainer(max_epochs=int(sys.argv[1]), accelerator='cpu', ")
    script += textwrap.dedent(
        """
        print("epochs", trainer.current_epoch, "steps", trainer.global_step, "resumed_from", trainer.ckpt_path)
        """
    )
    (tmp_path / "project.py").write_text("import sys\n" + script)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outputs = []
    for epochs in (3, 4):
        run = subprocess.run(
            [sys.executable, "project.py", str(epochs)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env=env,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        outputs.append(run.stdout + run.stderr)
    assert "epochs 3 steps 12 resumed_from None" in outputs[0]  # no checkpoint yet: starts afresh
    assert re.search(r"epochs 4 steps 16 resumed_from \S+last\.ckpt", outputs[1])  # resumes from the last one
    assert "unfroze" in outputs[0]  # FreezeBackbone(unfreeze_at_epoch=2) ran its schedule
