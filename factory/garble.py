"""Visibly broken faces on the puppet domain, measured by analysis by synthesis, not by the realism filter.

A puppet face is fully described by its identity and 12 AU intensities, and the renderer draws that
face exactly. So for a generated image of a known puppet identity, the evaluation panel's AU evaluator
(`builtin:eval-au`, which neither trained MAUGen nor filters a build) reads the intensities the image
shows, the renderer draws that identity with them, and the two are compared region by region (brows,
eyes, nose, mouth: the renderer's own AU zones). The sample's prompt target and the generator's own
labels are drawn too, and each region keeps its smallest residual over these explanations, so an
evaluator's misreading alone does not make an intact face broken. A face that a puppet face of its
identity explains has a small residual everywhere; scrambled eyes, a smeared mouth or torn features
leave a large one in their region, whatever intensities explain the rest. Each region's residual is the mean absolute
pixel difference after removing the mean colour difference (a uniform skin or light shift is not a
broken feature), in units of 1/255.

`broken` = the largest region residual >= BROKEN_RESIDUAL. The threshold is calibrated on renders
(residuals from the evaluator's reading errors alone) and checked by eye on MAUGen grids sorted by the
score (bench/bench_maugen_fidelity.py --garble-grid); docs/facs.md states both. Pool (real) identities
have no renderer, so the measure is puppet-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from core.facs import INTENSITY_MAX, INTENSITY_MIN
from pipelines.puppet import PuppetIdentity, PuppetRenderer

#: The renderer's AU zones grouped into the face's features.
REGIONS: dict[str, tuple[int, ...]] = {"brows": (1, 2, 4), "eyes": (5,), "nose": (9,), "mouth": (12, 15, 20, 25)}
#: Largest region residual (1/255 units) of a face a person would call intact; see the module docstring.
BROKEN_RESIDUAL = 18.0


@dataclass
class GarbleScores:
    residual: np.ndarray  # float32 (B, len(REGIONS)): per-region residual, 1/255 units
    broken: np.ndarray  # bool (B,)

    def summary(self) -> dict[str, object]:
        """The eval/bench block: share broken, per-region share above the threshold, quantiles."""
        worst = self.residual.max(axis=1)
        return {
            "broken": round(float(self.broken.mean()), 4) if len(self.broken) else None,
            "threshold": BROKEN_RESIDUAL,
            "by_region": {
                r: round(float((self.residual[:, i] >= BROKEN_RESIDUAL).mean()), 4) for i, r in enumerate(REGIONS)
            },
            "worst_residual_quantiles": {
                k: round(float(v), 2) for k, v in zip(("p50", "p90", "p99"), np.quantile(worst, [0.5, 0.9, 0.99]))
            } if len(worst) else {},
        }


class GarbleMeter:
    """Per-region residuals of generated puppet faces against the render of what the evaluator reads."""

    def __init__(self, evaluator: str = "builtin:eval-au", batch_size: int = 256):
        from detectors.panel import DetectorPanel

        self.evaluator = evaluator
        self.panel = DetectorPanel([evaluator], 1, batch_size=batch_size)
        self._renderers: dict[int, PuppetRenderer] = {}  # one per image size, kept for its mask caches

    def _renderer(self, size: int) -> PuppetRenderer:
        if size not in self._renderers:
            self._renderers[size] = PuppetRenderer(size=size)
        return self._renderers[size]

    def __call__(
        self,
        images: np.ndarray,
        people: Sequence[PuppetIdentity],
        explanations: Sequence[np.ndarray] = (),
        read: np.ndarray | None = None,
    ) -> GarbleScores:
        """Scores of `images` against the evaluator's reading and any other `explanations`: (B, 12)
        intensities per image, such as the prompt targets and the generator's labels. `read`: the
        evaluator's intensities of these images when the caller already ran it (eval's own panel)."""
        size = images.shape[1]
        refs = [self.reference(images, people, read)]
        refs += [self._renderer(size).render_batch(people, np.clip(e, INTENSITY_MIN, INTENSITY_MAX)) for e in explanations]
        best = np.min([self.scores(images, r, people).residual for r in refs], axis=0)
        return GarbleScores(residual=best, broken=best.max(axis=1) >= BROKEN_RESIDUAL)

    def reference(
        self, images: np.ndarray, people: Sequence[PuppetIdentity], read: np.ndarray | None = None
    ) -> np.ndarray:
        """Each identity rendered with the AU intensities the evaluator reads in its image (`read`, if given)."""
        if read is None:
            read = self.panel.detect(images).consensus.intensity
        if np.isnan(read).any():
            raise ValueError(f"garble measure: evaluator {self.evaluator} gives no intensity for some AUs")
        return self._renderer(images.shape[1]).render_batch(people, np.clip(read, INTENSITY_MIN, INTENSITY_MAX))

    def scores(self, images: np.ndarray, refs: np.ndarray, people: Sequence[PuppetIdentity]) -> GarbleScores:
        """Residuals of `images` against `refs` (the renders they are compared with) in each region."""
        diff = images.astype(np.float32) - refs.astype(np.float32)
        res = np.zeros((len(images), len(REGIONS)), dtype=np.float32)
        for b, p in enumerate(people):
            for i, aus in enumerate(REGIONS.values()):
                m = np.zeros(images.shape[1:3], dtype=bool)
                for au in aus:
                    m |= self._renderer(images.shape[1]).region_mask(p, au)
                d = diff[b][m]  # (pixels, 3)
                res[b, i] = float(np.abs(d - d.mean(axis=0)).mean()) if len(d) else 0.0
        return GarbleScores(residual=res, broken=res.max(axis=1) >= BROKEN_RESIDUAL)
