"""`OnnxAUDetector`: any AU detector exported to ONNX, described by a spec, mapped onto the 12 AUs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD, INTENSITY_MAX, NUM_AUS

from .runtime import OnnxModel, sigmoid
from .spec import LoadedSpec


@dataclass
class AUOutput:
    """One detector's view of a batch, on the 12-AU schema; NaN where it has no opinion.

    `occurrence` is the detector's vote (1.0 / 0.0): its probability >= 0.5 when it has an occurrence
    output, else its intensity rounded to the scale >= the occurrence threshold.
    """

    name: str
    probability: np.ndarray  # float32 (B, 12), NaN where not covered or no occurrence output
    intensity: np.ndarray  # float32 (B, 12) on 0-5, NaN where not covered or no intensity output
    occurrence: np.ndarray  # float32 (B, 12) in {0, 1}, NaN where not covered
    covers: np.ndarray  # bool (12,): the AUs this detector covers

    def __len__(self) -> int:
        return len(self.occurrence)


class OnnxAUDetector(OnnxModel):
    """Batched AU detection with the spec's pre-processing; columns re-ordered into AUS order."""

    task = "au_detector"

    def __init__(
        self,
        spec: LoadedSpec | str,
        threads: int = 0,
        provider_list: list[str] | None = None,
        occurrence_threshold: int = DEFAULT_OCCURRENCE_THRESHOLD,
        batch_size: int = 64,
        io_binding: bool | None = None,
    ):
        super().__init__(
            spec, threads=threads, provider_list=provider_list, batch_size=batch_size, io_binding=io_binding
        )
        aus = self.spec.aus or []
        #: (column in the model output, position in the 12-vector) for the AUs the factory labels
        self.columns = np.array([c for c, au in enumerate(aus) if au in AUS], dtype=np.int64)
        self.slots = np.array([AUS.index(au) for au in aus if au in AUS], dtype=np.int64)
        self.covers = np.zeros(NUM_AUS, dtype=bool)
        self.covers[self.slots] = True
        kinds = [o.kind for o in self.spec.outputs]
        self.has_intensity = "intensity" in kinds
        self.has_probability = any(k in ("probability", "logit") for k in kinds)
        self.threshold = occurrence_threshold

    def expected_width(self, kind: str) -> int | None:
        return len(self.spec.aus or [])

    def _width_hint(self) -> str:
        return f" (the number of AUs in `aus:` {self.spec.aus}); fix the spec's AU list or re-export the model"

    def predict(self, images: np.ndarray) -> AUOutput:
        outs = self.run(images)
        b = len(images)
        prob = np.full((b, NUM_AUS), np.nan, dtype=np.float32)
        inten = np.full((b, NUM_AUS), np.nan, dtype=np.float32)
        for o, arr in zip(self.spec.outputs, outs):
            cols = arr[:, self.columns] if b else np.zeros((0, len(self.columns)), np.float32)
            if o.kind == "probability":
                prob[:, self.slots] = np.clip(cols, 0.0, 1.0)
            elif o.kind == "logit":
                prob[:, self.slots] = sigmoid(cols)
            else:
                inten[:, self.slots] = np.clip(cols, 0.0, INTENSITY_MAX)
        occ = np.full((b, NUM_AUS), np.nan, dtype=np.float32)
        if self.has_probability:
            occ[:, self.slots] = (prob[:, self.slots] >= 0.5).astype(np.float32)
        else:
            occ[:, self.slots] = (np.floor(inten[:, self.slots] + 0.5) >= self.threshold).astype(np.float32)
        return AUOutput(name=self.name, probability=prob, intensity=inten, occurrence=occ, covers=self.covers.copy())
