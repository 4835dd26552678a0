"""DISFA for MAUGen training: labels in DISFA's published layout, frames pre-extracted from its videos.

Layout under `root` (the first two are DISFA as published; the frames folders are ours):

    ActionUnit_Labels/SN001/SN001_au1.txt ... SN001_au26.txt   lines `frame,intensity`, frames from 1
    Videos_LeftCamera/LeftVideoSN001_comp.avi                   (Videos_RightCamera/RightVideoSN001_comp.avi)
    Frames_LeftCamera/SN001/000001.png                          (Frames_RightCamera/...; .png or .jpg)

Frames are files named by the 6-digit, 1-based video frame number, the same number the label files
use, so a label line and its image meet by name; `extract_frames` writes this layout from the
videos with ffmpeg (`extract_frames(root, every=5, size=256)` keeps every 5th frame, numbered by
its frame in the video, so labels still line up). Decoding video inside a DataLoader would be slow
and non-random-access; pre-extracted frames are read in any order.

DISFA has no face masks: every sample's mask is all ones (the whole image is the face region). The
image is a centre square crop of the frame, resized (`pipelines/identities/images.py`). Occurrence follows
the DISFA protocol: intensity >= 2 (core.facs.DEFAULT_OCCURRENCE_THRESHOLD).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from core.facs import AUS, DEFAULT_OCCURRENCE_THRESHOLD, INTENSITY_MAX, INTENSITY_MIN, NUM_AUS
from pipelines.prompts.budget import TokenBudget
from pipelines.maugen.data.subjects import ExemplarCache, SubjectExemplars, fold_subjects, frame_sample
from pipelines.maugen.data.types import FaceSample

log = logging.getLogger(__name__)

Camera = Literal["left", "right"]
Part = Literal["train", "test"]

LABEL_DIR = "ActionUnit_Labels"
#: camera -> (videos folder, video file name pattern, frames folder)
CAMERAS: dict[str, tuple[str, str, str]] = {
    "left": ("Videos_LeftCamera", "LeftVideo{subject}_comp.avi", "Frames_LeftCamera"),
    "right": ("Videos_RightCamera", "RightVideo{subject}_comp.avi", "Frames_RightCamera"),
}
#: Image files a frames folder may hold; the stem is the 1-based frame number.
FRAME_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")

#: The 27 DISFA subjects (docs/facs.md).
DISFA_SUBJECTS: tuple[str, ...] = tuple(f"SN{i:03d}" for i in (*range(1, 14), 16, 17, 18, 21, *range(23, 33)))
#: The standard 3-fold subject split (docs/facs.md): part1, part2, part3.
DISFA_FOLDS: tuple[tuple[str, ...], ...] = tuple(
    tuple(f"SN{i:03d}" for i in part)
    for part in (
        (1, 2, 9, 10, 16, 26, 27, 30, 32),
        (6, 11, 12, 13, 18, 21, 24, 28, 31),
        (3, 4, 5, 7, 8, 17, 23, 25, 29),
    )
)

EXEMPLAR_CHOICES: tuple[str, ...] = ("least_active", "first")


def fold_split(folds: Sequence[Sequence[str]], fold: int, part: str, dataset: str) -> list[str]:
    """Subjects of `part` for cross-validation fold `fold`: test = that part, train = the others."""
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < len(folds):
        raise ValueError(f"{dataset}: unknown fold {fold!r}; folds are 0..{len(folds) - 1}")
    if part == "test":
        return sorted(folds[fold])
    if part == "train":
        return sorted(s for k, p in enumerate(folds) if k != fold for s in p)
    raise ValueError(f"{dataset}: unknown part {part!r}; use 'train' or 'test'")


def disfa_split(fold: int, part: Part) -> list[str]:
    """DISFA subjects of the standard 3-fold protocol: `test` = part `fold` (0..2), `train` = the other two."""
    return fold_split(DISFA_FOLDS, fold, part, "DISFA")


def read_frame_values(path: Path, unknown: int | None = None, header: bool = False) -> dict[int, float]:
    """{frame: value} from a `frame,value` file; `unknown` (e.g. BP4D's 9) reads as NaN.

    Values must be whole numbers in 0..5; anything else fails naming the file and line, since a
    silently skipped line would shift labels against frames.
    """
    out: dict[int, float] = {}
    with open(path, encoding="utf-8-sig") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            fields = [x.strip() for x in line.split(",")]
            try:
                if len(fields) != 2:
                    raise ValueError
                frame, value = int(fields[0]), float(fields[1])
            except ValueError:
                if header and lineno == 1:
                    continue
                raise ValueError(f"{path}:{lineno}: malformed line {line!r}; expected `frame,intensity`") from None
            if frame < 0:
                raise ValueError(f"{path}:{lineno}: negative frame number {frame}")
            if unknown is not None and value == unknown:
                value = float("nan")
            elif not (value.is_integer() and INTENSITY_MIN <= value <= INTENSITY_MAX):
                allowed = f"{INTENSITY_MIN}..{INTENSITY_MAX}" + (
                    f" or {unknown} (unknown)" if unknown is not None else ""
                )
                raise ValueError(f"{path}:{lineno}: intensity {fields[1]!r} is not one of {allowed}")
            if frame in out:
                raise ValueError(f"{path}:{lineno}: frame {frame} appears twice")
            out[frame] = value
    return out


def read_disfa_labels(root: str | Path, subject: str) -> tuple[np.ndarray, np.ndarray]:
    """(frames int64 (F,), intensity float32 (F, 12)) of one subject, from its 12 AU label files.

    A frame missing from some AU files gets NaN for those AUs (and a warning): DISFA as published
    has all 12 files over the same frames, so a gap means a damaged download.
    """
    folder = Path(root) / LABEL_DIR / subject
    if not folder.is_dir():
        raise FileNotFoundError(f"DISFA: no label folder {folder}; is {root} the DISFA root (with {LABEL_DIR}/)?")
    per_au: list[dict[int, float]] = []
    for au in AUS:
        path = folder / f"{subject}_au{au}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"DISFA: label file {path} for AU{au} is missing; all 12 AU files are needed")
        table = read_frame_values(path)
        if not table:
            raise ValueError(f"DISFA: label file {path} is empty; expected `frame,intensity` lines")
        per_au.append(table)
    frames = np.array(sorted(set().union(*per_au)), dtype=np.int64)
    values = np.full((len(frames), NUM_AUS), np.nan, dtype=np.float32)
    for j, table in enumerate(per_au):
        values[:, j] = [table.get(int(f), np.nan) for f in frames]
    gaps = np.isnan(values).sum(axis=0)
    if gaps.any():
        missing = ", ".join(f"AU{au}: {n}" for au, n in zip(AUS, gaps.tolist()) if n)
        log.warning("DISFA %s: label files cover different frames; NaN for frames missing from (%s)", subject, missing)
    return frames, values


def frame_index(folder: Path) -> dict[int, Path]:
    """{frame number: file} for the numbered images of a frames folder (other files are ignored)."""
    out: dict[int, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() not in FRAME_SUFFIXES or not p.stem.isdigit() or not p.is_file():
            continue
        n = int(p.stem)
        if n in out:
            raise ValueError(f"frames {out[n]} and {p} both claim frame {n}; keep one of them")
        out[n] = p
    return out


def _ffmpeg_binary(ffmpeg: str) -> str:
    path = shutil.which(ffmpeg)
    if path is None:
        raise FileNotFoundError(
            f"extract_frames needs the ffmpeg binary, but {ffmpeg!r} is not on PATH; install it "
            "(apt-get install ffmpeg, conda install -c conda-forge ffmpeg) or pass ffmpeg='/path/to/ffmpeg'"
        )
    return path


def extract_frames(
    root: str | Path,
    camera: Camera = "left",
    subjects: Sequence[str] | None = None,
    every: int = 1,
    size: int | None = None,
    *,
    image_format: Literal["jpg", "png"] = "jpg",
    overwrite: bool = False,
    ffmpeg: str = "ffmpeg",
) -> dict[str, int]:
    """Decode DISFA videos into `Frames_<Camera>Camera/SNxxx/000001.jpg` (see the module doc).

    Keeps frames 1, 1+every, 1+2*every ... under their video frame number; `size` centre-crops to a
    square and resizes (None keeps the full frame). Each subject is decoded into a temporary folder
    that is renamed into place only when ffmpeg succeeded, so an interrupted run never leaves a
    partial folder that a dataset would take for a full one. Subjects whose frames folder already
    exists are skipped unless `overwrite`. JPEG is written at ffmpeg quality 2 (near lossless at a
    fraction of PNG's size: DISFA is ~130k frames). Returns {subject: frames in its folder}.
    """
    if camera not in CAMERAS:
        raise ValueError(f"DISFA: unknown camera {camera!r}; use one of {list(CAMERAS)}")
    if not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    root = Path(root)
    video_dir_name, pattern, frames_dir_name = CAMERAS[camera]
    video_dir = root / video_dir_name
    if subjects is None:
        subjects = [s for s in DISFA_SUBJECTS if (video_dir / pattern.format(subject=s)).is_file()]
        if not subjects:
            raise FileNotFoundError(f"DISFA: no videos like {video_dir / pattern.format(subject='SN001')} found")
    binary = _ffmpeg_binary(ffmpeg)
    out_dir = root / frames_dir_name
    out_dir.mkdir(parents=True, exist_ok=True)

    filters: list[str] = []
    if every > 1:
        filters.append(f"select=not(mod(n\\,{int(every)}))")
    if size is not None:
        filters += ["crop=min(iw\\,ih):min(iw\\,ih)", f"scale={int(size)}:{int(size)}:flags=area"]
    quality = ["-q:v", "2"] if image_format == "jpg" else []

    # passthrough: one image per decoded (and selected) frame, never duplicated to fill a constant rate
    sync = ["-fps_mode", "passthrough"]
    counts: dict[str, int] = {}
    for subject in subjects:
        video = video_dir / pattern.format(subject=subject)
        final = out_dir / subject
        if final.is_dir() and not overwrite:
            counts[subject] = len(frame_index(final))
            log.info("DISFA %s: %s exists (%d frames), skipped", subject, final, counts[subject])
            continue
        if not video.is_file():
            raise FileNotFoundError(f"DISFA: video {video} for subject {subject} is missing")
        tmp = Path(tempfile.mkdtemp(prefix=f".{subject}.partial-", dir=out_dir))
        try:
            cmd = [binary, "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(video)]
            if filters:
                cmd += ["-vf", ",".join(filters)]
            target = [*quality, str(tmp / f"f%06d.{image_format}")]
            proc = subprocess.run([*cmd, *sync, *target], check=False, capture_output=True, text=True)
            if proc.returncode != 0 and sync[0] == "-fps_mode" and "fps_mode" in proc.stderr:
                sync = ["-vsync", "passthrough"]  # ffmpeg < 5.1 has no -fps_mode (and ffmpeg 9 no -vsync)
                for f in tmp.iterdir():
                    f.unlink()
                proc = subprocess.run([*cmd, *sync, *target], check=False, capture_output=True, text=True)
            log.info("DISFA %s: %s", subject, " ".join([*cmd, *sync, *target]))
            if proc.returncode != 0:
                raise RuntimeError(f"ffmpeg failed on {video} (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
            written = sorted(tmp.glob(f"f*.{image_format}"))
            if not written:
                raise RuntimeError(f"ffmpeg wrote no frames from {video}; is the video readable?")
            for k, f in enumerate(written):  # ffmpeg numbers its outputs 1..N; name them by video frame
                f.rename(tmp / f"{k * every + 1:06d}.{image_format}")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        counts[subject] = len(written)
        log.info("DISFA %s: %d frames -> %s", subject, len(written), final)
    return counts


class DisfaDataset(SubjectExemplars, Dataset):
    """DISFA frames with their 12 AU intensities (exact DISFA labels), as `FaceSample`s.

    `subjects` or `fold` (+ `part`) pick the people; with neither, every subject that has a label
    folder under `root`. A fold keeps the split's subjects that are on disk (warning about the
    rest). Only labelled frames whose image exists are used, then every `every`-th of them. The
    exemplar (identity condition) is the subject's least active frame ('least_active': smallest
    summed intensity, the closest DISFA has to a neutral face) or its first frame ('first'). Images
    load lazily per item; exemplars are cached per subject.
    """

    def __init__(
        self,
        root: str | Path,
        subjects: Sequence[str] | None = None,
        fold: int | None = None,
        part: Part = "train",
        camera: Camera = "left",
        size: int = 64,
        every: int = 1,
        exemplar: Literal["least_active", "first"] = "least_active",
        seed: int = 0,
        budget: TokenBudget | None = None,
    ):
        self.root = Path(root)
        self.budget = budget  # prompts within the trained model's text encoder (prompting.describe)
        if camera not in CAMERAS:
            raise ValueError(f"DISFA: unknown camera {camera!r}; use one of {list(CAMERAS)}")
        if exemplar not in EXEMPLAR_CHOICES:
            raise ValueError(f"DISFA: unknown exemplar choice {exemplar!r}; use one of {list(EXEMPLAR_CHOICES)}")
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not (self.root / LABEL_DIR).is_dir():
            raise FileNotFoundError(f"DISFA: {self.root / LABEL_DIR} does not exist; point root at the DISFA folder")
        self.size, self.camera, self.seed, self.exemplar_choice = int(size), camera, int(seed), exemplar
        self.subjects = self._pick_subjects(subjects, fold, part)
        frames_root = self.root / CAMERAS[camera][2]

        rows_subject: list[str] = []
        rows_frame: list[np.ndarray] = []
        rows_path: list[Path] = []
        rows_value: list[np.ndarray] = []
        self.exemplars = ExemplarCache(self.size)
        for subject in self.subjects:
            frames, values = read_disfa_labels(self.root, subject)
            folder = frames_root / subject
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"DISFA: {subject} has labels but no frames folder {folder}; extract it first: "
                    f'python -c "from pipelines.maugen.data import extract_frames; '
                    f"extract_frames('{self.root}', camera='{camera}', subjects=['{subject}'])\""
                )
            on_disk = frame_index(folder)
            keep = np.array([int(f) in on_disk for f in frames], dtype=bool)
            if not keep.any():
                raise ValueError(
                    f"DISFA: {folder} has no image numbered like a labelled frame ({frames.min()}..{frames.max()}); "
                    "expected names like 000001.png; re-run extract_frames with overwrite=True"
                )
            frames, values = frames[keep], values[keep]
            if exemplar == "least_active":
                pick = int(np.argmin(np.nansum(values, axis=1)))
            else:
                pick = 0
            self.exemplars.paths[subject] = on_disk[int(frames[pick])]
            frames, values = frames[::every], values[::every]
            rows_subject += [subject] * len(frames)
            rows_frame.append(frames)
            rows_path += [on_disk[int(f)] for f in frames]
            rows_value.append(values)
        self.sample_subjects: list[str] = rows_subject
        self.frames: np.ndarray = np.concatenate(rows_frame)
        self.paths: list[Path] = rows_path
        #: float32 (N, 12) DISFA intensities of every sample (for samplers and statistics).
        self.intensity: np.ndarray = np.concatenate(rows_value).astype(np.float32)
        log.info(
            "DISFA %s camera: %d subjects, %d frames at %d px", camera, len(self.subjects), len(self.paths), self.size
        )

    def _pick_subjects(self, subjects: Sequence[str] | None, fold: int | None, part: str) -> list[str]:
        present = sorted(p.name for p in (self.root / LABEL_DIR).iterdir() if p.is_dir())
        if subjects is not None and fold is not None:
            raise ValueError("DISFA: give either subjects or fold (+ part), not both")
        if subjects is not None:
            subjects = list(subjects)
            if not subjects:
                raise ValueError("DISFA: subjects is an empty list")
            unknown = [s for s in subjects if s not in DISFA_SUBJECTS]
            if unknown:
                raise ValueError(f"DISFA: unknown subjects {unknown}; DISFA's are {list(DISFA_SUBJECTS)}")
            return subjects
        if fold is not None:
            wanted = disfa_split(fold, part)  # type: ignore[arg-type]
            return fold_subjects("DISFA", wanted, present, fold, part, self.root)
        chosen = [s for s in present if s in DISFA_SUBJECTS]
        if not chosen:
            raise FileNotFoundError(f"DISFA: no subject folders (SN001 ...) under {self.root / LABEL_DIR}")
        return chosen

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> FaceSample:
        subject, frame, path = self.sample_subjects[i], int(self.frames[i]), self.paths[i]
        intensity = self.intensity[i].copy()
        occurrence = np.where(np.isnan(intensity), np.nan, intensity >= DEFAULT_OCCURRENCE_THRESHOLD).astype(np.float32)
        return frame_sample(
            "disfa",
            path,
            self.size,
            intensity,
            occurrence,
            intensity,
            self.exemplar(subject),
            subject,
            self.seed,
            self.budget,
            camera=self.camera,
            frame=frame,
        )
