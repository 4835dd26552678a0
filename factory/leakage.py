"""Identity leakage: is a generated face one of the people MAUGen was trained on?

A generator can reproduce its training subjects instead of the identity it was asked for (Vec2Face
shipped a dataset that did), and for DISFA or BP4D that would put licensed people into a corpus.
So `factory train` saves, beside every pipeline it writes, each training subject's identity
embedding: its exemplar (what MAUGen's identity condition saw) through the ONNX identity encoder
that a build embeds generated faces with (`detect.identity_encoder`, `builtin:identity` by default).
Only embeddings are written, never the photos. `factory subjects CKPT` recomputes the file for an
existing checkpoint from its train_config.yaml (another encoder, data moved, a checkpoint older than
the file).

In a build with generator=maugen, the detector actor embeds every generated face with the same
encoder and records its maximum cosine similarity to the training subjects (`training_similarity`
in KEY.json's scores and the parquet); `checks.training_similarity` (None: measure only) rejects
above it. The file must have been embedded by the very model file `detect.identity_encoder` names
(sha256): embeddings of two encoders are not comparable. `plan_leakage` decides before any shard
whether the build measures, and why not; build.json keeps that decision for `factory report`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.builtin import resolve
from detectors.spec import LoadedSpec, file_sha256, load_spec

from .config import ConfigError, DetectConfig, FactoryConfig

if TYPE_CHECKING:
    from pipelines.maugen.train import TrainConfig

log = logging.getLogger(__name__)

#: The identity encoder the files are embedded with unless told otherwise: the build's default.
DEFAULT_ENCODER: str = DetectConfig().identity_encoder
#: The arrays of the file (numpy .npz, no pickled objects).
FIELDS: tuple[str, ...] = ("embeddings", "subject_ids", "identity_encoder", "identity_encoder_sha256", "info")


#: Why a resumed build does not measure: it was begun before the check existed.
PREDATES = "this build was begun before the identity-leakage check existed; a resume keeps it unmeasured"


class LeakageError(ConfigError):
    """A training-subjects file that cannot be used as it is; the message names the file and the fix."""


def subjects_command(checkpoint: str, encoder: str) -> str:
    """The command that (re)computes a checkpoint's training-subjects file for `encoder`."""
    extra = "" if encoder == DEFAULT_ENCODER else f" --identity-encoder {encoder}"
    return f"factory subjects {checkpoint}{extra}"


@dataclass(frozen=True)
class TrainingSubjects:
    """One row per training subject: its exemplar's identity embedding, and which encoder made them."""

    embeddings: np.ndarray  # float32 (N, D), L2-normalised
    subject_ids: tuple[str, ...]
    encoder: str  # the spec reference it was embedded with (builtin:identity, or a spec path)
    encoder_sha256: str  # sha256 of that spec's ONNX model file
    info: dict[str, Any]  # encoder name, its verification threshold, the training data, the exemplar size

    def __post_init__(self) -> None:
        e = self.embeddings
        if e.ndim != 2 or e.dtype != np.float32 or len(e) != len(self.subject_ids) or len(e) == 0:
            raise ValueError(
                f"training subjects: embeddings must be float32 (N, D) with N = {len(self.subject_ids)} subject ids "
                f"(N > 0), got {e.dtype} {e.shape}"
            )

    def save(self, path: Path) -> None:
        """Write the file atomically; the same content always gives the same bytes (zip times fixed)."""
        arrays = {
            "embeddings": self.embeddings,
            "subject_ids": np.array(self.subject_ids, dtype=str),
            "identity_encoder": np.array(self.encoder),
            "identity_encoder_sha256": np.array(self.encoder_sha256),
            "info": np.array(json.dumps(self.info, sort_keys=True)),
        }
        tmp = path.with_name(f".{path.name}.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, arr, allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, fix: str) -> TrainingSubjects:
        """Read a file written by `save`; anything else is one LeakageError naming the file and `fix`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [f for f in FIELDS if f not in z.files]
                if missing:
                    raise KeyError(f"no {', '.join(missing)}")
                return cls(
                    embeddings=np.asarray(z["embeddings"]),
                    subject_ids=tuple(str(s) for s in z["subject_ids"]),
                    encoder=str(z["identity_encoder"]),
                    encoder_sha256=str(z["identity_encoder_sha256"]),
                    info=json.loads(str(z["info"])),
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            raise LeakageError(
                f"{path} is not a training-subjects file of this factory ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else err!r}); {fix}"
            ) from None


def check_encoder(encoder: str, key: str = "identity encoder") -> LoadedSpec:
    """`encoder`'s spec; a SpecError or FileNotFoundError naming it (as `key`) when it is no identity
    encoder spec or its model file does not exist."""
    loaded = load_spec(resolve(encoder), task="identity")
    if not loaded.model_path.is_file():
        raise FileNotFoundError(
            f"{key} {encoder}: its ONNX model {loaded.model_path} does not exist; fix `model:` in {loaded.path} "
            "or name another identity spec"
        )
    return loaded


def embed_subjects(
    subjects: Sequence[tuple[str, np.ndarray]],
    encoder: str = DEFAULT_ENCODER,
    data: dict[str, Any] | None = None,
    threads: int = 1,
) -> TrainingSubjects:
    """Embed each (subject id, exemplar uint8 (H, W, 3)) with the ONNX identity encoder `encoder`."""
    from detectors.identity import OnnxIdentityEncoder

    if not subjects:
        raise ValueError("the training data lists no subjects to embed")
    ids = [s for s, _ in subjects]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the training data lists a subject twice ({len(ids)} ids, {len(set(ids))} distinct)")
    model = OnnxIdentityEncoder(str(resolve(encoder)), threads=threads)
    images = np.stack([img for _, img in subjects])
    info = {
        "encoder_name": model.name,
        "verify_threshold": model.verify_threshold,
        "exemplar_size": int(images.shape[1]),
        "subjects": len(ids),
        "data": data or {},
    }
    return TrainingSubjects(model.embed(images), tuple(ids), encoder, model.sha256, info)


def subjects_writer(
    subjects: Sequence[tuple[str, np.ndarray]], encoder: str, data: dict[str, Any]
) -> Callable[[Path], None]:
    """Embed the training subjects once; returns the Trainer's `on_save`, which writes them into each
    pipeline folder it saves."""
    from pipelines.maugen.builtin import SUBJECTS_FILE

    embedded = embed_subjects(subjects, encoder, data)
    n, name = len(embedded.subject_ids), embedded.info["encoder_name"]
    log.info("training subjects: %d embedded with %s (%s)", n, encoder, name)

    def write(folder: Path) -> None:
        embedded.save(folder / SUBJECTS_FILE)

    return write


def data_description(train: TrainConfig) -> dict[str, Any]:
    """What the file says about the training data its subjects came from (the config's data section)."""
    return train.data.model_dump(mode="json", exclude={"workers"})


def train_config_of(path: Path) -> Path:
    """The training config that made a saved pipeline: beside it (RUN/final), or the run's
    (RUN/checkpoints/step-N/pipeline[-ema]); FileNotFoundError naming both places otherwise."""
    candidates = [path / "train_config.yaml"]
    if path.parent.parent.name == "checkpoints":
        candidates.append(path.parent.parent.parent / "train_config.yaml")
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"no training config at {' or '.join(map(str, candidates))}; pass the one that trained {path} with --config"
    )


def recompute(checkpoint: str, train: TrainConfig, encoder: str, threads: int = 1) -> tuple[Path, TrainingSubjects]:
    """`factory subjects`: embed the training subjects of a saved pipeline again, listed by the training
    config that made it, at the size it makes, and write them beside its weights."""
    from pipelines.maugen.builtin import SUBJECTS_FILE, checkpoint_image_size, resolve_checkpoint
    from pipelines.maugen.train import subject_exemplars

    path = resolve_checkpoint(checkpoint)
    size = checkpoint_image_size(path)
    subjects = embed_subjects(subject_exemplars(train.data, size), encoder, data_description(train), threads)
    subjects.save(path / SUBJECTS_FILE)
    return path / SUBJECTS_FILE, subjects


def read_embeddings(file: str, sha256: str) -> np.ndarray:
    """A detector actor's copy of the training subjects' embeddings: the file the driver planned with,
    refused when it changed since (on this node: another copy of the checkpoint)."""
    path = Path(file)
    got = file_sha256(path) if path.is_file() else "missing"
    if got != sha256:
        raise LeakageError(
            f"{path} on this node is not the file the build planned with (sha256 {got[:12]}, planned {sha256[:12]}); "
            "give every node the same checkpoint folder"
        )
    return TrainingSubjects.load(path, "give every node the same checkpoint folder").embeddings


@dataclass(frozen=True)
class LeakagePlan:
    """Whether a build measures training similarity, and with what; `why` says why not."""

    measured: bool
    why: str | None
    encoder: str
    threshold: float | None = None  # detect.identity_encoder's verification threshold (its spec's), if any
    check: float | None = None  # checks.training_similarity
    subjects: TrainingSubjects | None = None
    file: str | None = None
    file_sha256: str | None = None

    def record(self) -> dict[str, Any]:
        """What build.json keeps of it (for `factory report`)."""
        out: dict[str, Any] = {
            "measured": self.measured,
            "why": self.why,
            "identity_encoder": self.encoder,
            "verify_threshold": self.threshold,
            "check": self.check,
        }
        if self.subjects is not None:
            out |= {"file": self.file, "sha256": self.file_sha256, "subjects": len(self.subjects.subject_ids)}
            out["data"] = self.subjects.info.get("data", {})
        return out

    def actor_args(self) -> dict[str, str] | None:
        """What a detector actor needs to measure (`read_embeddings`'s arguments), or None: not measured."""
        if not (self.measured and self.file and self.file_sha256):
            return None
        return {"file": self.file, "sha256": self.file_sha256}

    def model_hashes(self, checkpoint: str) -> dict[str, str]:
        """build.json's `models` entry: a resume against another file is refused, like other model files."""
        return {f"training_subjects:{checkpoint}": self.file_sha256} if self.measured and self.file_sha256 else {}

    def for_record(self, record: dict[str, Any] | None) -> LeakagePlan:
        """The plan a build runs with, given its build.json (None: a new build): this one, but unmeasured for
        a build begun before the check existed (no `training_similarity` entry), so that it resumes as it
        began (its model hashes and its shards' scores unchanged)."""
        if record is None or "training_similarity" in record or not self.measured:
            return self
        return LeakagePlan(False, PREDATES, self.encoder, self.threshold, self.check)


def plan_leakage(cfg: FactoryConfig) -> LeakagePlan:
    """Decide before any shard whether the build measures training similarity.

    Not measured (why recorded): the puppet generator (no trained model), detect off, a checkpoint
    without the file, a file embedded with another encoder than detect.identity_encoder. With
    checks.training_similarity set, each of these is instead a LeakageError naming the fix: a build
    asked to reject leaked identities must not quietly skip it. A corrupt file is an error either way.
    """
    check, ref = cfg.checks.training_similarity, cfg.detect.identity_encoder

    def unmeasured(why: str, fix: str | None = None) -> LeakagePlan:
        if check is not None:
            raise LeakageError(
                f"config error: checks.training_similarity={check} cannot be applied: {why}; "
                f"{fix + ', or ' if fix else ''}unset checks.training_similarity to build without the leakage check"
            )
        return LeakagePlan(False, f"{why}; {fix}" if fix else why, ref, check=check)

    if cfg.generator != "maugen":
        return unmeasured(f"generator={cfg.generator} is no trained model, so it has no training subjects")
    if not cfg.detect.enabled:
        return unmeasured("detect.enabled=false, and the detector actor is what embeds the generated faces")
    # imported only here, past the puppet's return: importing pipelines.maugen loads torch and diffusers
    # (seconds of a driver's start), which `factory report` and a puppet build do without
    from pipelines.maugen.builtin import SUBJECTS_FILE, resolve_checkpoint

    ckpt = cfg.maugen.checkpoint
    path = resolve_checkpoint(ckpt)
    where = ckpt if str(path) == ckpt else f"{ckpt} ({path})"
    file = path / SUBJECTS_FILE
    command = subjects_command(ckpt, ref)
    if not file.is_file():
        return unmeasured(f"{where} has no {SUBJECTS_FILE}", f"rebuild it with `{command}`")
    subjects = TrainingSubjects.load(file, f"rebuild it with `{command}`")
    loaded = check_encoder(ref, "detect.identity_encoder")
    sha = file_sha256(loaded.model_path)
    if subjects.encoder_sha256 != sha:
        return unmeasured(
            f"{file} was embedded with {subjects.encoder} (model sha256 {subjects.encoder_sha256[:12]}) but "
            f"detect.identity_encoder is {ref} (model sha256 {sha[:12]})",
            f"recompute it with `{command}`",
        )
    return LeakagePlan(
        True, None, ref, loaded.spec.threshold, check, subjects, str(file), file_sha256(file)
    )
