"""One process of test_maugen's two-process training run (RANK, WORLD_SIZE, MASTER_* from the test).

Trains the micro MAUGen for a few steps with half the conditions dropped, then writes what the test
compares across processes: the first trained weights and each step's first random draw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from test_maugen import MICRO  # noqa: E402

from pipelines.maugen.data import PuppetFaceDataset  # noqa: E402
from pipelines.maugen.train import TrainConfig, Trainer  # noqa: E402


def main(out: str, report: str) -> None:
    torch.set_num_threads(1)
    ds = PuppetFaceDataset(12, 4, split="train", seed=1, workers=1)
    cfg = TrainConfig(
        out=out, batch_size=2, model=MICRO, steps=3, warmup=0, checkpoint_every=100, log_every=1,
        losses={"image_label": False, "cfg_dropout": 0.5},
    )  # fmt: skip
    tr = Trainer(cfg, dataset=ds)
    draws = []
    for step in range(cfg.steps):
        tr.step = step
        draws.append(float(torch.rand(1, generator=tr.step_generator())))
    tr.step = 0
    tr.fit()
    weights = [float(p.detach().flatten()[0]) for p in tr.params]
    Path(report).write_text(
        json.dumps({"processes": tr.accelerator.num_processes, "draws": draws, "weights": weights})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
