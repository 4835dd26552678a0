"""The paper's Table 3 on the puppet domain: ablation rows trained for the same steps, one eval.

Each row is a named config switch (`factory train --ablation NAME`, pipelines/maugen/train.py::
ABLATIONS) on the embedded recipe. For every row it trains (or resumes) `OUT/NAME` with the same
step count and seed, then measures the final pipeline with bench_maugen_fidelity's eval (held-out
identities, random grammar prompts, the three builtin detectors and the realism discriminator) and
prints one row per model, with each number's ratio to the full model's.

Training is the cost: one row of the full recipe (24,000 steps) takes about 4 h on 2 cores
(far less on a GPU), so `--steps` trades fidelity for time; rows are only comparable at the same
`--steps`. The eval samples as a build does (`maugen.scheduler`, `maugen.steps`) unless
`--scheduler` / `--sampling-steps` say otherwise; the table's header names the sampler.
`--full RUN` reuses an already trained full model (its `train_config.yaml` must show the same steps).

Run: python bench/bench_maugen_ablations.py --steps 1500 [--rows full,no-idm,...] [--out runs/ablations]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_maugen_fidelity import fidelity  # noqa: E402

from factory.config import MAUGenGeneratorConfig  # noqa: E402
from pipelines.maugen.build import SCHEDULERS  # noqa: E402
from pipelines.maugen.train import ABLATIONS  # noqa: E402

log = logging.getLogger("bench")
RECIPE = "pipelines/maugen/configs/tiny-puppet.yaml"
ROWS = ("full", "no-idm", "no-mutual-conditioning", "no-language-init")
_SAMPLING = MAUGenGeneratorConfig()  # the eval samples as a build does unless told otherwise
COLUMNS = ("f1_labels_vs_targets", "f1_labels_vs_consensus", "f1_targets_vs_consensus", "realism_accepted")


def train_row(row: str, root: Path, steps: int, config: str) -> Path:
    """Train (or resume) one ablation row; returns its final pipeline directory."""
    run = root / row
    cmd = [sys.executable, "-m", "factory.cli", "train", "--config", config, "--ablation", row]
    cmd += ["--set", f"steps={steps}", "--out", str(run)]
    log.info("training %s: %s", row, " ".join(cmd))
    subprocess.run(cmd, check=True)
    return run / "final"


def trained_steps(run: Path) -> int:
    cfg = run.parent / "train_config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"--full {run}: no {cfg}; pass the final/ folder of a `factory train` run")
    return int(yaml.safe_load(cfg.read_text())["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from: {', '.join(ABLATIONS)}")
    ap.add_argument("--steps", type=int, required=True, help="training steps of every row")
    ap.add_argument("--config", default=RECIPE)
    ap.add_argument("--out", default="runs/ablations", help="one run folder per row below this")
    ap.add_argument("--full", help="final/ of an already trained full model with the same steps")
    ap.add_argument("--n", type=int, default=64, help="held-out samples per row")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=_SAMPLING.scheduler)
    ap.add_argument("--sampling-steps", type=int, default=_SAMPLING.steps, help="denoising steps of the eval")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ABLATIONS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the Table 3 rows are: {', '.join(ABLATIONS)}")
    if args.full:
        full = Path(args.full)
        if trained_steps(full) != args.steps:
            raise SystemExit(f"--full {full} was trained for {trained_steps(full)} steps, not --steps {args.steps}")

    results: dict[str, dict[str, float]] = {}
    for row in rows:
        final = Path(args.full) if (row == "full" and args.full) else train_row(row, Path(args.out), args.steps, args.config)
        results[row], _, _ = fidelity(str(final), n=args.n, steps=args.sampling_steps, scheduler=args.scheduler)
    base = results.get("full")
    print(
        f"Table 3 on puppet faces: {args.steps} training steps per row, {args.n} held-out identities each, "
        f"sampled with {args.scheduler} {args.sampling_steps} steps"
    )
    print(f"{'row':<24}" + "".join(f"{c:>26}" for c in COLUMNS))
    for row, r in results.items():
        cells = []
        for c in COLUMNS:
            ratio = f" ({r[c] / base[c]:.2f}x)" if base and base[c] > 0 and row != "full" else ""
            cells.append(f"{r[c]:.3f}{ratio}".rjust(26))
        print(f"{row:<24}" + "".join(cells))


if __name__ == "__main__":
    main()
