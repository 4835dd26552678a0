"""Detector throughput: ONNX Runtime vs torch on the same model and the same batches.

For every shipped model (three AU detectors, realism, identity) it times inference on puppet
renders with both runtimes under the same thread count, checks that they agree (max |diff|), and
prints images/s and the ratio ORT / torch measured in this one run. It also times the whole
detector panel (3 AU detectors + consensus + realism) as the detect stage runs it.

Run: python bench/bench_detectors.py [--n 2048] [--batch 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.identity_net import IdentityNet  # noqa: E402
from detectors import data  # noqa: E402
from detectors.au import OnnxAUDetector  # noqa: E402
from detectors.builtin import BUILTIN_MODELS, resolve  # noqa: E402
from detectors.identity import OnnxIdentityEncoder  # noqa: E402
from detectors.models import AUDetectorNet, RealismNet  # noqa: E402
from detectors.panel import DetectorPanel  # noqa: E402
from detectors.realism import OnnxRealism  # noqa: E402
from detectors.spec import load_spec  # noqa: E402
from detectors.train import _RealismExport, to_input  # noqa: E402

log = logging.getLogger("bench")
ORT_CLASSES = {"au_detector": OnnxAUDetector, "realism": OnnxRealism, "identity": OnnxIdentityEncoder}
TORCH_CLASSES = {"au_detector": AUDetectorNet, "realism": RealismNet, "identity": IdentityNet}


def _rate(fn, images: np.ndarray, batch: int, repeats: int = 3) -> float:
    fn(images[:batch])  # warm-up (session / kernel set-up)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(images), batch):
            fn(images[i : i + batch])
        best = max(best, len(images) / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    images = data.au_set(args.n, 64, "heldout", seed=3, workers=2).images
    log.info(
        "%s, python %s, torch %s, %d images of 64 px, batch %d, %d thread(s)",
        platform.machine(),
        platform.python_version(),
        torch.__version__,
        args.n,
        args.batch,
        args.threads,
    )
    log.info("%-10s %12s %12s %10s %12s", "model", "ORT img/s", "torch img/s", "ORT/torch", "max|diff|")
    for name in BUILTIN_MODELS:
        loaded = load_spec(resolve(f"builtin:{name}"))
        ort_model = ORT_CLASSES[loaded.spec.task](
            loaded, threads=args.threads, provider_list=["CPUExecutionProvider"], batch_size=args.batch
        )
        net = TORCH_CLASSES[loaded.spec.task].from_pretrained(loaded.torch_path).eval()
        if loaded.spec.task == "realism":
            net = _RealismExport(net).eval()  # the exported graph ends in a sigmoid

        def run_torch(x: np.ndarray, net=net) -> list[np.ndarray]:
            with torch.inference_mode():
                out = net(to_input(x))
            return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]

        diff = max(float(np.abs(a - b).max()) for a, b in zip(ort_model.run(images[:64]), run_torch(images[:64])))
        r_ort = _rate(ort_model.run, images, args.batch)
        r_torch = _rate(run_torch, images, args.batch)
        log.info("%-10s %12.0f %12.0f %10.2f %12.2e", name, r_ort, r_torch, r_ort / r_torch, diff)
    panel = DetectorPanel(
        ["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"],
        2,
        realism="builtin:realism",
        threads=args.threads,
        batch_size=args.batch,
    )
    r_panel = _rate(panel.detect, images, args.batch, repeats=2)
    log.info("detect stage (3 AU detectors + consensus + realism, ORT): %.0f images/s", r_panel)


if __name__ == "__main__":
    main()
