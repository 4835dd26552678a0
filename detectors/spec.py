"""The small YAML spec that describes an ONNX model to the factory.

A user who exports GraphAU, FMAE or LibreFace to ONNX writes one of these next to the file; the
factory needs nothing else. Example (an ME-GraphAU export covering DISFA's 8 AUs):

    task: au_detector
    name: graphau-disfa
    model: graphau.onnx               # relative to this file
    sha256: 3f1c...                   # optional; a mismatch is reported as a corrupt file
    input: {size: 224, resize: 256, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}
    aus: [1, 2, 4, 6, 9, 12, 25, 26]  # order of the output columns
    outputs:
      - {kind: probability}           # occurrence probability, >= 0.5 means present

An identity spec may also name the same network's torch weights, which MAUGen loads for C_ID and its identity
loss (`model.identity_encoder`): a diffusers-style folder (`torch_weights: torch`, the builtin IdentityNet), or
insightface arcface_torch's `backbone.pth` with its architecture (`torch_weights: arcface-iresnet50.pth` and
`torch_arch: iresnet50`, core/iresnet.py; see detectors/specs/arcface-iresnet50.yaml).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.facs import AUS

Task = Literal["au_detector", "realism", "identity"]
#: arcface_torch IResNets a `torch_arch:` may name (core/iresnet.py)
TorchArch = Literal["iresnet18", "iresnet34", "iresnet50", "iresnet100"]
OutputKind = Literal["probability", "logit", "intensity", "embedding"]


class SpecError(ValueError):
    """A spec or model file problem, worded to name the file and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """Pre-processing: resize so the shorter side is `resize`, centre-crop `size`, scale to [0, 1],
    normalise with mean/std per channel (in the model's channel order), lay out as `layout`."""

    size: int = Field(gt=0, description="side of the square crop the model takes")
    resize: int | None = Field(None, gt=0, description="shorter side before the centre crop (default: size)")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    name: str | None = Field(None, description="ONNX input name (default: the model's first input)")

    @field_validator("std")
    @classmethod
    def _std(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be > 0")
        return v

    @model_validator(mode="after")
    def _resize(self) -> InputSpec:
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be >= size ({self.size}) so the centre crop fits")
        return self


class OutputSpec(_Strict):
    kind: OutputKind
    name: str | None = Field(None, description="ONNX output name (default: by position)")


class ModelSpec(_Strict):
    """One ONNX model: an AU detector, the realism discriminator or the identity encoder."""

    task: Task
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(description="path of the .onnx file, relative to the spec file")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    aus: list[int] | None = Field(None, description="au_detector: FACS AU number of each output column")
    outputs: list[OutputSpec] = Field(min_length=1, max_length=2)
    threshold: float | None = Field(
        None, description="realism: default acceptance threshold; identity: verification threshold"
    )
    torch_weights: str | None = Field(
        None,
        description="optional torch weights, relative to this file: a diffusers-style folder, or with torch_arch "
        "a .pth state_dict (MAUGen's identity condition and loss take the identity encoder from here)",
    )
    torch_arch: TorchArch | None = Field(
        None, description="identity: torch_weights is insightface arcface_torch's backbone.pth of this IResNet"
    )

    @model_validator(mode="after")
    def _by_task(self) -> ModelSpec:
        kinds = [o.kind for o in self.outputs]
        if self.task == "au_detector":
            if not self.aus:
                raise ValueError("an au_detector spec needs `aus:`, the AU number of each output column")
            if len(set(self.aus)) != len(self.aus):
                raise ValueError(f"aus lists an AU twice: {self.aus}")
            if not set(self.aus) & set(AUS):
                raise ValueError(f"aus {self.aus} covers none of the 12 AUs the factory labels ({list(AUS)})")
            if (
                "embedding" in kinds
                or len(set(kinds)) != len(kinds)
                or kinds.count("probability") + kinds.count("logit") > 1
            ):
                raise ValueError(
                    "au_detector outputs: one occurrence output (probability or logit) and/or one intensity output"
                )
        elif self.task == "realism":
            if len(kinds) != 1 or kinds[0] not in ("probability", "logit"):
                raise ValueError("a realism spec has one output of kind probability or logit")
        elif self.task == "identity" and kinds != ["embedding"]:
            raise ValueError("an identity spec has one output of kind embedding")
        if self.task != "au_detector" and self.aus is not None:
            raise ValueError(f"`aus:` only applies to au_detector specs, not {self.task}")
        if self.torch_arch is not None:
            if self.task != "identity":
                raise ValueError(f"`torch_arch:` only applies to identity specs, not {self.task}")
            if self.torch_weights is None:
                raise ValueError("`torch_arch:` names the architecture of `torch_weights:`, which is missing")
            if self.input.size != 112:
                raise ValueError(
                    f"an IResNet (torch_arch {self.torch_arch}) takes 112 x 112 faces: input.size must be 112"
                )
        return self


class LoadedSpec(BaseModel):
    """A validated spec plus where it came from (for error messages and provenance)."""

    model_config = ConfigDict(frozen=True)

    spec: ModelSpec
    path: Path

    @property
    def model_path(self) -> Path:
        return (self.path.parent / self.spec.model).resolve()

    @property
    def torch_path(self) -> Path | None:
        w = self.spec.torch_weights
        return (self.path.parent / w).resolve() if w else None


def load_spec(path: str | Path, task: Task | None = None) -> LoadedSpec:
    """Read and validate a spec file; errors name the file and the offending key."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"detector spec {p} does not exist; point the config at a spec YAML file")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"detector spec {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(tree, dict):
        raise SpecError(f"detector spec {p} must be a mapping with task, name, model, input, outputs")
    try:
        spec = ModelSpec.model_validate(tree)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        raise SpecError(f"detector spec {p}: {loc}: {e['msg'].removeprefix('Value error, ')}") from None
    if task is not None and spec.task != task:
        raise SpecError(f"detector spec {p} describes a {spec.task} model, but a {task} is configured here")
    return LoadedSpec(spec=spec, path=p.resolve())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
