"""BP4D for MAUGen training: AU occurrence (and FERA2015 intensity where coded) with extracted frames.

Layout under `root` (labels as BP4D publishes them; the frames folder is ours):

    AUCoding/AU_OCC/F001_T1.csv                       header row of AU numbers, first column the frame,
                                                      values 0/1, 9 = not labelled
    AU-Intensity-Codes3.0/AU06/F001_T1_AU06.csv       `frame,intensity` (0-5, 9 = unknown); AU6 or AU06
    Frames/F001/T1/000001.jpg                         one image per frame, .jpg or .png

A frame file's name is its frame number as in the label files. Any zero padding is accepted
(`000001.jpg`, `0001.jpg` and BP4D's own `2440.jpg` all parse to their integer), so BP4D's
sequence folders can be copied or linked in as they are.

Labels on our 12-vector (AUS order): BP4D codes 7 of DISFA's 12 AUs (1, 2, 4, 6, 12, 15, 17);
AUs 5, 9, 20, 25 and 26 are NaN in both occurrence and intensity. Occurrence is BP4D's own coding
(not DISFA's intensity >= 2 rule). Intensity is known only for AU6, AU12 and AU17 (the FERA2015
intensity AUs that are among the 12) and only where their intensity file exists; it is NaN
elsewhere, including for AUs whose occurrence is known. For the text prompt only, an AU with
known occurrence but unknown intensity reads as intensity 3 ("marked") when it occurs and 0 when
not (`PROMPT_LEVEL_OCCURRING`), so the prompt names every occurring AU.

There is no published BP4D subject split (docs/facs.md); `bp4d_split` is ours: the 41 subjects sorted,
then dealt round-robin into 3 parts (subject k goes to part k % 3), which mixes F and M subjects.
BP4D has no face masks: every mask is all ones; images are centre square crops (`load_face`).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from torch.utils.data import Dataset

from core.facs import NUM_AUS, au_index
from pipelines.maugen.data.disfa import fold_split, frame_index, read_frame_values
from pipelines.prompts.budget import TokenBudget
from pipelines.maugen.data.subjects import ExemplarCache, SubjectExemplars, fold_subjects, frame_sample
from pipelines.maugen.data.types import FaceSample

log = logging.getLogger(__name__)

Part = Literal["train", "test"]

OCC_DIR = Path("AUCoding") / "AU_OCC"
INTENSITY_DIR = "AU-Intensity-Codes3.0"
FRAMES_DIR = "Frames"

#: A BP4D subject id: F001-F023 (female), M001-M018 (male).
BP4D_SUBJECT: re.Pattern[str] = re.compile(r"^[FM]\d{3}$")
BP4D_SUBJECTS: tuple[str, ...] = tuple(f"F{i:03d}" for i in range(1, 24)) + tuple(f"M{i:03d}" for i in range(1, 19))
_SEQUENCE = re.compile(r"^([FM]\d{3})_(T\d+)\.csv$")

#: Of the 12 DISFA AUs, those BP4D codes for occurrence, and those with FERA2015 intensity codes.
OCC_AUS: tuple[int, ...] = (1, 2, 4, 6, 12, 15, 17)
INTENSITY_AUS: tuple[int, ...] = (6, 12, 17)
#: BP4D's code for "not labelled".
UNLABELLED: int = 9
#: Prompt level of an AU whose occurrence is 1 but whose intensity is not coded.
PROMPT_LEVEL_OCCURRING: int = 3

#: Our 3-fold subject split (not from the literature): sorted subjects dealt round-robin.
BP4D_FOLDS: tuple[tuple[str, ...], ...] = tuple(tuple(sorted(BP4D_SUBJECTS)[k::3]) for k in range(3))


def bp4d_split(fold: int, part: Part) -> list[str]:
    """BP4D subjects of our 3-fold split: `test` = part `fold` (0..2), `train` = the other two."""
    return fold_split(BP4D_FOLDS, fold, part, "BP4D")


def read_occurrence(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frames int64 (F,), occurrence float32 (F, 12) with NaN, active count over all coded AUs (F,)).

    The active count covers every AU column of the file (not only the 12): it picks the most
    neutral frame as the exemplar, and AU7, AU10, AU23 ... change the face too.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise ValueError(f"BP4D: {path} has no frame rows; expected a header row of AU numbers, then one row per frame")
    header = rows[0]
    try:
        file_aus = [int(c.strip().upper().removeprefix("AU")) for c in header[1:]]
    except ValueError:
        raise ValueError(f"BP4D: {path}:1: header {header!r} is not `frame, AU numbers...`") from None
    cols = {au: k for k, au in enumerate(file_aus)}
    frames = np.empty(len(rows) - 1, dtype=np.int64)
    table = np.empty((len(rows) - 1, len(file_aus)), dtype=np.int64)
    for i, row in enumerate(rows[1:]):
        try:
            if len(row) != len(header):
                raise ValueError
            frames[i] = int(row[0])
            table[i] = [int(float(c)) for c in row[1:]]
        except ValueError:
            raise ValueError(
                f"BP4D: {path}:{i + 2}: malformed row {','.join(row)!r}; expected a frame and {len(file_aus)} "
                "values 0/1/9"
            ) from None
    bad = ~np.isin(table, (0, 1, UNLABELLED))
    if bad.any():
        i, k = map(int, np.argwhere(bad)[0])
        raise ValueError(f"BP4D: {path}:{i + 2}: AU{file_aus[k]} value {table[i, k]} is not 0, 1 or {UNLABELLED}")
    if len(set(frames.tolist())) != len(frames):
        raise ValueError(f"BP4D: {path}: a frame number appears twice")
    occ = np.full((len(frames), NUM_AUS), np.nan, dtype=np.float32)
    for au in OCC_AUS:
        if au in cols:
            v = table[:, cols[au]].astype(np.float32)
            v[v == UNLABELLED] = np.nan
            occ[:, au_index(au)] = v
    active = (table == 1).sum(axis=1)
    return frames, occ, active


def _intensity_file(root: Path, subject: str, task: str, au: int) -> Path | None:
    for name in (f"AU{au:02d}", f"AU{au}"):
        p = root / INTENSITY_DIR / name / f"{subject}_{task}_{name}.csv"
        if p.is_file():
            return p
    return None


def prompt_vector(intensity: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """The AU vector a BP4D prompt describes: coded intensity, else 3/0 from occurrence, else NaN."""
    v = np.asarray(intensity, dtype=np.float32).copy()
    fill = np.isnan(v) & ~np.isnan(occurrence)
    v[fill] = np.where(occurrence[fill] >= 1, PROMPT_LEVEL_OCCURRING, 0)
    return v


class BP4DDataset(SubjectExemplars, Dataset):
    """BP4D frames with occurrence (7 of the 12 AUs) and intensity (AU6/12/17) labels, as `FaceSample`s.

    `subjects` or `fold` (+ `part`) pick the people; with neither, every subject with AU_OCC files.
    `tasks` (e.g. ["T1", "T2"]) restricts the sequences. Only labelled frames whose image exists are
    used, then every `every`-th of them per sequence. The exemplar is the subject's frame (over all
    its sequences) with the fewest occurring AUs. Images load lazily; exemplars are cached.
    """

    def __init__(
        self,
        root: str | Path,
        subjects: Sequence[str] | None = None,
        size: int = 64,
        every: int = 1,
        *,
        fold: int | None = None,
        part: Part = "train",
        tasks: Sequence[str] | None = None,
        seed: int = 0,
        budget: TokenBudget | None = None,
    ):
        self.root = Path(root)
        self.budget = budget  # prompts within the trained model's text encoder (prompting.describe)
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        occ_dir = self.root / OCC_DIR
        if not occ_dir.is_dir():
            raise FileNotFoundError(f"BP4D: {occ_dir} does not exist; point root at the BP4D folder (with {OCC_DIR}/)")
        self.size, self.seed = int(size), int(seed)
        sequences: dict[str, list[tuple[str, Path]]] = {}
        for p in sorted(occ_dir.glob("*.csv")):
            m = _SEQUENCE.match(p.name)
            if m is None:
                log.warning("BP4D: ignoring %s (not named like F001_T1.csv)", p)
                continue
            if tasks is None or m.group(2) in tasks:
                sequences.setdefault(m.group(1), []).append((m.group(2), p))
        self.subjects = self._pick_subjects(sorted(sequences), subjects, fold, part)

        meta: list[tuple[str, str, int, Path]] = []
        occ_rows: list[np.ndarray] = []
        int_rows: list[np.ndarray] = []
        self.exemplars = ExemplarCache(self.size)
        for subject in self.subjects:
            best: tuple[int, Path] | None = None
            for task, occ_path in sorted(sequences[subject], key=lambda t: int(t[0][1:])):
                frames, occ, active = read_occurrence(occ_path)
                folder = self.root / FRAMES_DIR / subject / task
                if not folder.is_dir():
                    raise FileNotFoundError(
                        f"BP4D: {subject} {task} has labels ({occ_path}) but no frames folder {folder}; "
                        f"copy the sequence's images there (named by frame number) or leave {task} out with tasks="
                    )
                on_disk = frame_index(folder)
                keep = np.array([int(f) in on_disk for f in frames], dtype=bool)
                if not keep.any():
                    raise ValueError(
                        f"BP4D: {folder} has no image numbered like a labelled frame of {occ_path.name} "
                        f"({frames.min()}..{frames.max()}); name frames by their number, e.g. {frames.min():06d}.jpg"
                    )
                frames, occ, active = frames[keep], occ[keep], active[keep]
                k = int(np.argmin(active))
                if best is None or active[k] < best[0]:
                    best = (int(active[k]), on_disk[int(frames[k])])
                intensity = np.full_like(occ, np.nan)
                for au in INTENSITY_AUS:
                    path = _intensity_file(self.root, subject, task, au)
                    if path is not None:
                        table = read_frame_values(path, unknown=UNLABELLED, header=True)
                        intensity[:, au_index(au)] = [table.get(int(f), np.nan) for f in frames]
                sel = slice(None, None, every)
                meta += [(subject, task, int(f), on_disk[int(f)]) for f in frames[sel]]
                occ_rows.append(occ[sel])
                int_rows.append(intensity[sel])
            assert best is not None  # every subject has at least one sequence with frames (checked above)
            self.exemplars.paths[subject] = best[1]
        self._meta = meta
        #: float32 (N, 12): BP4D occurrence (NaN = not coded) and intensity (NaN = not coded) per sample.
        self.occurrence: np.ndarray = np.concatenate(occ_rows)
        self.intensity: np.ndarray = np.concatenate(int_rows)
        log.info("BP4D: %d subjects, %d frames at %d px", len(self.subjects), len(meta), self.size)

    def _pick_subjects(
        self, present: list[str], subjects: Sequence[str] | None, fold: int | None, part: str
    ) -> list[str]:
        if subjects is not None and fold is not None:
            raise ValueError("BP4D: give either subjects or fold (+ part), not both")
        if subjects is not None:
            subjects = list(subjects)
            if not subjects:
                raise ValueError("BP4D: subjects is an empty list")
            bad = [s for s in subjects if not BP4D_SUBJECT.match(s)]
            if bad:
                raise ValueError(f"BP4D: subject ids {bad} are not like F001 / M001")
            missing = [s for s in subjects if s not in present]
            if missing:
                raise FileNotFoundError(f"BP4D: no label files {self.root / OCC_DIR}/<subject>_T*.csv for {missing}")
            return subjects
        if fold is not None:
            wanted = bp4d_split(fold, part)  # type: ignore[arg-type]
            return fold_subjects("BP4D", wanted, present, fold, part, self.root)
        if not present:
            raise FileNotFoundError(f"BP4D: no label files like F001_T1.csv in {self.root / OCC_DIR}")
        return present

    def __len__(self) -> int:
        return len(self._meta)

    def __getitem__(self, i: int) -> FaceSample:
        subject, task, frame, path = self._meta[i]
        intensity, occurrence = self.intensity[i].copy(), self.occurrence[i].copy()
        return frame_sample(
            "bp4d",
            path,
            self.size,
            intensity,
            occurrence,
            prompt_vector(intensity, occurrence),
            self.exemplar(subject),
            subject,
            self.seed,
            self.budget,
            task=task,
            frame=frame,
        )
