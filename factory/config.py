"""One pydantic model tree for a build: YAML file, then `--set a.b=value` overrides.

Everything that decides what a build writes lives here and is frozen into OUT/build.json; the
`runtime` section (how many actors, how much memory) may change between a build and its resume
because it changes speed, not bytes.

Over 400 lines on purpose: one section class per config section, so the whole tree, its defaults and
its one-line errors read in one place.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.facs import DEFAULT_OCCURRENCE_THRESHOLD, EMOTION_NAMES, INTENSITY_MAX, STRENGTHS
from pipelines.overrides import OverrideError, format_validation_error
from pipelines.overrides import apply_override as _apply_override
from pipelines.prompts.config import ExpandConfig
from pipelines.puppet.identity import AGE_GROUPS, SKIN_TONE_GROUPS


class ConfigError(ValueError):
    """A config problem, worded as one line that names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BuildConfig(_Section):
    """What to build: size, sharding, seed and the output encoding."""

    target: int = Field(1000, gt=0, description="accepted samples in the corpus")
    shard_size: int = Field(250, gt=0, description="accepted samples per shard (last shard: the remainder)")
    seed: int = Field(0, ge=0, description="build seed; shard i draws from a stream derived from it")
    max_oversample: float = Field(
        20.0,
        ge=1.0,
        description="a shard that has drawn max_oversample * size candidates starts no new round (of "
        "plan.candidate_batch) and fails",
    )
    shard_retries: int = Field(2, ge=0, description="re-runs of a failed shard before it goes to OUT/failed/")
    image_size: int | None = Field(
        None,
        ge=32,
        le=2048,
        multiple_of=8,
        description="corpus image size in px; null: the generator's own (puppet.image_size, or the size the MAUGen "
        "checkpoint was trained at)",
    )
    image_format: Literal["png", "jpg"] = Field("png", description="png (lossless) or jpg (jpg_quality; far smaller)")
    jpg_quality: int = Field(95, ge=1, le=100)
    shard_prefix: str = Field("mifa", pattern=r"^[a-z][a-z0-9]*$")
    rejected_samples: int = Field(
        2,
        ge=0,
        le=100,
        description="rejected candidates kept per reason per shard (image, prompt, labels, scores) in "
        "rejected/NAME.tar, for the report's grid; 0 keeps none",
    )


class LabelsConfig(_Section):
    """How intensities turn into occurrence labels (DISFA protocol: intensity >= 2)."""

    occurrence_threshold: int = Field(DEFAULT_OCCURRENCE_THRESHOLD, ge=1, le=INTENSITY_MAX)


class PlanConfig(_Section):
    """The balance the corpus aims for: weights per emotion, skin-tone group and age group."""

    emotions: dict[str, float] = Field(default_factory=lambda: {e: 1.0 for e in EMOTION_NAMES})
    skin_groups: list[float] = Field(default_factory=lambda: [1.0] * SKIN_TONE_GROUPS)
    age_groups: dict[str, float] = Field(default_factory=lambda: {a: 1.0 for a in AGE_GROUPS})
    strengths: dict[int, float] = Field(default_factory=lambda: {s: 1.0 for s in STRENGTHS})
    extra_au_rate: float = Field(
        0.08, ge=0.0, le=1.0, description="chance that an AU outside the emotion prototype is added"
    )
    candidate_batch: int = Field(32, gt=0, description="candidates a shard draws per round")

    @field_validator("emotions")
    @classmethod
    def _emotions(cls, v: dict[str, float]) -> dict[str, float]:
        return _weights(v, EMOTION_NAMES, "emotion")

    @field_validator("age_groups")
    @classmethod
    def _ages(cls, v: dict[str, float]) -> dict[str, float]:
        return _weights(v, AGE_GROUPS, "age group")

    @field_validator("strengths")
    @classmethod
    def _strengths(cls, v: dict[int, float]) -> dict[int, float]:
        return _weights(v, tuple(STRENGTHS), "strength")

    @field_validator("skin_groups")
    @classmethod
    def _skins(cls, v: list[float]) -> list[float]:
        if len(v) != SKIN_TONE_GROUPS:
            raise ValueError(f"needs {SKIN_TONE_GROUPS} weights, one per skin-tone group 0..{SKIN_TONE_GROUPS - 1}")
        _weights(dict(enumerate(v)), tuple(range(SKIN_TONE_GROUPS)), "skin group")
        return v


def _weights(v: dict, allowed: tuple, what: str) -> dict:
    unknown = [k for k in v if k not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {unknown[0]!r}; allowed: {', '.join(map(str, allowed))}")
    if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
        raise ValueError(f"{what} weights must be >= 0 with a positive sum")
    return v


class ExpandSection(ExpandConfig):
    """The expander's own keys (pipelines/prompts/config.py) and when the build gives up on it."""

    max_fallback_share: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="stop the build (committed shards kept) once more than this share of this run's prompts fell "
        "back to the grammar, judged over at least 50 prompts: an LLM endpoint that fails most requests "
        "(0: stop at the first fallback, 1: never stop; the grammar backend never falls back)",
    )


class PuppetConfig(_Section):
    """The procedural renderer: the test domain's generator, and the exemplars of puppet identities."""

    image_size: Literal[64, 128, 256] = Field(
        64, description="the renderer's image size: the corpus size with generator=puppet"
    )
    supersample: int = Field(4, ge=1, le=8)


class IdentitiesConfig(_Section):
    """Where a build's identities come from (factory/identities.py)."""

    source: Literal["puppet", "pool"] = Field(
        "puppet", description="puppet: procedural identities (test domain); pool: real exemplar photos (identities.pool)"
    )
    pool: str | None = Field(
        None, description="a folder of photos, a parquet or webdataset shards, local or s3:// (pipelines/identities/pool.py)"
    )
    split: Literal["build", "train", "all"] = Field(
        "build", description="which side of the pool's split a build draws: a name-hash rule, see train_share"
    )
    train_share: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="share of the pool (by sha256 of each name) kept for MAUGen training and never drawn by a build",
    )
    masks: Literal["auto", "user", "detector", "ellipse"] = Field(
        "auto",
        description="inpainting masks of pool exemplars: auto = the user's mask, else the face detector (a photo with "
        "no face found is skipped); ellipse = a centred ellipse for every photo",
    )

    @model_validator(mode="after")
    def _pool(self) -> IdentitiesConfig:
        if self.source == "pool" and not self.pool:
            raise ValueError("identities.source=pool needs identities.pool (a folder, parquet or webdataset of photos)")
        return self


class MAUGenGeneratorConfig(_Section):
    """The MAUGen generator (generator=maugen): a saved MAUGenPipeline and how to sample it."""

    checkpoint: str = Field(
        "builtin:tiny-puppet",
        min_length=1,
        description="builtin:NAME (pipelines/maugen/models/) or a saved MAUGenPipeline directory "
        "(`factory train` writes OUT/final)",
    )
    steps: int = Field(15, ge=1, le=1000, description="denoising steps")
    guidance_scale: float = Field(
        4.0,
        ge=1.0,
        description="classifier-free guidance (1 = off); 4 suits the shipped model: stronger draws the AUs a little "
        "more and breaks more faces (pipelines/maugen/models/README.md)",
    )
    guidance_interval: tuple[float, float] = Field(
        (0.0, 0.6),
        description="guide only the steps whose noise level t/T lies in [lo, hi]; the others skip the unconditional "
        "pass. Guidance at low noise draws the AUs; at high noise it costs realism (pipelines/maugen/models/README.md)",
    )

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError("give [lo, hi] with 0 <= lo < hi <= 1 (noise levels t/T)")
        return v
    scheduler: Literal["ddim", "dpm", "ddpm"] = Field(
        "dpm",
        description="diffusers scheduler: dpm (DPM-Solver++) at 15 steps passes the checks as often as ddim at 25 "
        "(pipelines/maugen/models/README.md) for 60% of the UNet calls",
    )
    batch_size: int = Field(16, ge=1, description="images per pipeline call inside the actor")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor sees a GPU")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="weights and activations: float16 on a GPU only; bfloat16 on a GPU or the CPU"
    )
    # throughput switches (pipelines/maugen/speed.py), applied where the generator actor loads the pipeline;
    # each may move the last bits of a sample, so each is part of the build's identity
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="attention backend: sdpa = torch scaled_dot_product_attention (diffusers AttnProcessor2_0; "
        "flash / memory-efficient kernels on a GPU); eager = diffusers AttnProcessor (matmul, softmax, matmul)",
    )
    channels_last: bool = Field(False, description="UNet in NHWC memory format (tensor-core convolutions on a GPU)")
    compile: bool = Field(
        False,
        description="torch.compile the UNet (the first batch of each shape pays the compilation: minutes on SD 1.5)",
    )
    cache: Literal["none", "pab"] = Field(
        "none",
        description="feature cache: pab = diffusers' Pyramid Attention Broadcast on the UNet's self-attention (reuse "
        "each layer's output between recomputations at noise levels t in (100, 800)); the one diffusers cache hook "
        "that fits a UNet2DConditionModel; bench/bench_maugen_fidelity.py --cache pab measures its cost in labels",
    )
    cache_skip: int = Field(
        2, ge=2, le=8, description="with cache=pab: recompute each self-attention every cache_skip-th UNet call"
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str, info: ValidationInfo) -> str:
        if v == "float16" and info.data.get("device") == "cpu":
            raise ValueError("float16 needs a GPU but maugen.device is cpu; use bfloat16 or float32 on the CPU")
        return v


class ChecksConfig(_Section):
    """Thresholds of the named check stages; each rejection is counted under the stage's name.

    The prompt-vs-target check uses `expand.tau`, the same threshold the LLM expander verifies
    its replies with, so one number decides what a good prompt is.
    """

    label_prompt_jaccard: float = Field(
        0.67, ge=0.0, le=1.0, description="Jaccard(parsed prompt AUs, generated labels): the paper's filter"
    )
    label_consensus_jaccard: float = Field(
        0.67,
        ge=0.0,
        le=1.0,
        description="Jaccard(generated labels, detector consensus) over the AUs the detectors agree on",
    )
    realism: float = Field(0.5, ge=0.0, le=1.0, description="minimum realism score")
    training_similarity: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="identity leakage: the highest cosine similarity a sample's face may have to any of MAUGen's "
        "training subjects (detect.identity_encoder; factory/leakage.py); null: measured and reported, never rejected",
    )


class DetectConfig(_Section):
    """The detect stage: N AU detectors with k-of-N consensus, and the realism discriminator.

    Models are spec YAML files (see detectors/spec.py) or `builtin:NAME` for the tiny puppet-domain
    models shipped in detectors/models/. Their file hashes go into build.json, and a resume with
    other model files is refused like a resume under another config.
    """

    enabled: bool = Field(True, description="run detect, consensus and realism, and their checks")
    au_detectors: list[str] = Field(
        default_factory=lambda: ["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"], min_length=1
    )
    min_agree: int = Field(2, ge=1, description="k: an AU is agreed when k of the detectors covering it vote alike")
    realism: str | None = Field("builtin:realism", description="realism discriminator spec; null: no realism check")
    identity_encoder: str = Field("builtin:identity", description="identity encoder spec (eval, MAUGen)")
    batch_size: int = Field(64, gt=0, description="images per detector call")

    @model_validator(mode="after")
    def _k(self) -> DetectConfig:
        if self.enabled and self.min_agree > len(self.au_detectors):
            raise ValueError(
                f"min_agree={self.min_agree} but only {len(self.au_detectors)} AU detectors are configured; "
                "no AU could ever be agreed - lower detect.min_agree or add detectors"
            )
        return self


AUTO = "auto"


def _whole_or_auto(v: Any, key: str, minimum: int) -> Any:
    """`auto`, or a whole number >= minimum (as a YAML number or a `--set` string); else one clear line."""
    if v == AUTO:
        return v
    n = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and v.strip().isdigit():
        n = int(v)
    if n is None or n < minimum:
        raise ValueError(f"give a whole number >= {minimum}, or auto (sized from the Ray cluster); e.g. --set {key}=auto")
    return n


def _number_or_auto(v: Any, key: str, positive: bool) -> Any:
    """`auto`, or a number > 0 (positive) / >= 0; else one clear line."""
    if v == AUTO:
        return v
    try:
        x = float(v) if not isinstance(v, bool) else None
    except (TypeError, ValueError):
        x = None
    if x is None or x != x or x < 0 or (positive and x == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"give a number {bound}, or auto (sized from the Ray cluster); e.g. --set {key}=auto")
    return x


class RuntimeConfig(_Section):
    """How the build runs. Not part of the build's identity: a resume may change it.

    The `auto` keys are sized from the Ray cluster the build runs on (factory/sizing.py): on a
    cluster with GPUs, one generator per GPU; on CPUs only, one generator per core, each reserving
    an even share of the CPUs the detectors and shard workers leave. A number always wins. A
    generator runs one torch thread whatever it reserves: more threads change MAUGen's bytes.
    """

    num_generators: int | Literal["auto"] = Field(
        AUTO,
        description="generator actors; auto: one per whole GPU left beside the detectors when the generators "
        "get GPUs (generator_gpus), else one per CPU core (with generator_cpus=auto) or as many as the CPUs hold "
        "beside the detectors with 2 shard workers each (with a number for generator_cpus)",
    )
    generator_gpus: float | Literal["auto"] = Field(
        AUTO,
        description="GPUs per generator actor; auto: 1 when the Ray cluster has GPUs and the generator uses them "
        "(generator=maugen, maugen.device not cpu), else 0",
    )
    generator_cpus: float | Literal["auto"] = Field(
        AUTO,
        description="CPUs each generator actor reserves in Ray; auto: 1 beside a GPU, else an even share of the "
        "CPUs the detectors and shard workers leave",
    )
    shard_worker_cpus: float = Field(
        0.25,
        gt=0.0,
        # shard_task_cpus: its name before shard tasks became shard worker actors (build.json files keep it)
        validation_alias=AliasChoices("shard_worker_cpus", "shard_task_cpus"),
        description="CPUs each shard worker reserves (one per shard in flight; it mostly waits)",
    )
    max_shards_in_flight: int | None = Field(
        None, ge=1, description="shard workers, one shard each (default: 2 per generator actor)"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (default: all)")
    object_store_mb: int = Field(256, ge=80, description="object store of the embedded local Ray")
    num_detectors: int = Field(1, ge=1, description="detector actors (AU detectors + realism, loaded once each)")
    detector_gpus: float = Field(0.0, ge=0.0, description="GPUs per detector actor (a fraction on a GPU cluster)")
    detector_cpus: float = Field(0.5, gt=0.0, description="CPUs a detector actor reserves")
    detector_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime intra-op threads per model (0: the actor's CPU share, detector_cpus rounded, >= 1)",
    )

    @field_validator("num_generators", mode="before")
    @classmethod
    def _num_generators(cls, v: Any) -> Any:
        return _whole_or_auto(v, "runtime.num_generators", 1)

    @field_validator("generator_gpus", mode="before")
    @classmethod
    def _generator_gpus(cls, v: Any) -> Any:
        return _number_or_auto(v, "runtime.generator_gpus", positive=False)

    @field_validator("generator_cpus", mode="before")
    @classmethod
    def _generator_cpus(cls, v: Any) -> Any:
        return _number_or_auto(v, "runtime.generator_cpus", positive=True)

    @property
    def detector_threads_used(self) -> int:
        """Threads a detector actor gives ONNX Runtime. Its own default (one per core, spinning while
        idle) fights the generator and shard workers for CPUs the actor did not reserve."""
        return self.detector_threads or max(1, round(self.detector_cpus))

    progress: bool = True
    progress_trace: str | None = Field(
        None, description="append every progress update (time, accepted, in flight) to this JSONL file"
    )


#: What a resume may change, and so what the build identity leaves out: the `runtime` section (how the
#: graph runs) and the keys that decide when a shard or the build gives up, never what a committed
#: shard holds (a shard that fills its quotas draws the same candidates under any budget). Being out
#: of the identity, expand.max_fallback_share (added later) leaves the ids of older builds alone.
RESUMABLE = ("runtime", "build.max_oversample", "build.shard_retries", "expand.max_fallback_share")


#: Keys added after builds were made with this code: at their default (the behaviour before them)
#: they stay out of the build identity, so those builds keep their id and still resume.
ADDED_LATER: dict[str, Any] = {
    "build.image_size": None,
    "checks.training_similarity": None,
    "identities": {"source": "puppet", "pool": None, "split": "build", "train_share": 0.0, "masks": "auto"},
    "maugen.attention": "sdpa",
    "maugen.channels_last": False,
    "maugen.compile": False,
    "maugen.cache": "none",
    "maugen.cache_skip": 2,
}


def resumable(key: str) -> bool:
    """Whether `factory resume --set key=...` may change this dotted key."""
    return any(key == r or key.startswith(r + ".") for r in RESUMABLE)


class FactoryConfig(_Section):
    """The whole build configuration."""

    build: BuildConfig = BuildConfig()
    labels: LabelsConfig = LabelsConfig()
    plan: PlanConfig = PlanConfig()
    expand: ExpandSection = ExpandSection()
    generator: Literal["puppet", "maugen"] = Field(
        "maugen",
        description="maugen: a trained MAUGen (maugen.checkpoint, by default the shipped builtin:tiny-puppet); "
        "puppet: the exact procedural renderer (the test domain's ground truth; far faster on a CPU)",
    )
    identities: IdentitiesConfig = IdentitiesConfig()
    puppet: PuppetConfig = PuppetConfig()
    maugen: MAUGenGeneratorConfig = MAUGenGeneratorConfig()
    detect: DetectConfig = DetectConfig()
    checks: ChecksConfig = ChecksConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _shards(self) -> FactoryConfig:
        if self.build.shard_size > 1_000_000:
            raise ValueError("build.shard_size above 1000000 would not fit a shard task's memory budget")
        if self.generator == "puppet" and self.identities.source != "puppet":
            raise ValueError(
                "generator=puppet renders puppet identities only; a pool of photos needs generator=maugen"
            )
        if self.generator == "puppet" and self.build.image_size not in (None, self.puppet.image_size):
            raise ValueError(
                f"generator=puppet renders at puppet.image_size={self.puppet.image_size}; set build.image_size to "
                "null or to puppet.image_size (64, 128 or 256)"
            )
        return self

    def identity_dict(self) -> dict[str, Any]:
        """The part of the config that decides the corpus bytes (all but RESUMABLE)."""
        d = self.model_dump(mode="json")
        for key in RESUMABLE:
            *parents, name = key.split(".")
            node = d
            for part in parents:
                node = node[part]
            node.pop(name)
        for key, default in ADDED_LATER.items():  # keys newer than a build leave its id alone at their default
            *parents, name = key.split(".")
            node = d
            for part in parents:
                node = node[part]
            if node.get(name) == default:
                node.pop(name)
        return d

    def identity_hash(self) -> str:
        blob = json.dumps(self.identity_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides, errors as one line each.


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` to a nested dict (in place); a bad one is a ConfigError."""
    try:
        _apply_override(tree, assignment)
    except OverrideError as err:
        raise ConfigError(str(err)) from None


def config_from_dict(tree: dict[str, Any]) -> FactoryConfig:
    try:
        return FactoryConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, FactoryConfig)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FactoryConfig:
    """Config from an optional YAML file plus `a.b=value` overrides, validated once."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: file {p} does not exist; pass a YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config error: {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config error: {p} must hold a mapping of sections (build:, plan:, ...)")
        tree = loaded or {}
    for assignment in overrides or []:
        _seed_weight_tables(tree, assignment)
        apply_override(tree, assignment)
    return config_from_dict(tree)


def _seed_weight_tables(tree: dict[str, Any], assignment: str) -> None:
    """`--set plan.age_groups.child=0` changes one weight: the rest of that table keeps its value
    (the file's, else the default) instead of the table becoming {child: 0}."""
    parts = assignment.split("=", 1)[0].strip().split(".")
    if len(parts) == 3 and parts[0] == "plan" and parts[1] in ("emotions", "age_groups", "strengths"):
        plan = tree.setdefault("plan", {}) or {}
        tree["plan"] = plan
        if not isinstance(plan.get(parts[1]), dict):
            plan[parts[1]] = dict(getattr(PlanConfig(), parts[1]))


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A unified diff of two config trees, for the refusal to resume under another config."""
    a = json.dumps(old, indent=2, sort_keys=True).splitlines()
    b = json.dumps(new, indent=2, sort_keys=True).splitlines()
    return "\n".join(difflib.unified_diff(a, b, "build.json", "this command", lineterm="", n=1))
