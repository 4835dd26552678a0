"""MAUGen training data: DISFA/BP4D loaders on tiny on-disk fixtures, puppet dataset, prompts, collate.

The fixtures follow the datasets' published label layouts (plus our frames folders); every frame
image is one flat colour that encodes (subject, frame), so a test can tell which file was loaded.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.facs import AUS, NUM_AUS, active_set, au_index
from pipelines.maugen.data import (
    BP4D_SUBJECTS,
    DISFA_FOLDS,
    DISFA_SUBJECTS,
    BP4DDataset,
    DisfaDataset,
    FaceSample,
    PuppetFaceDataset,
    bp4d_split,
    collate,
    describe,
    disfa_split,
    extract_frames,
    puppet_subjects,
)
from pipelines.maugen.data.bp4d import BP4D_FOLDS, prompt_vector
from pipelines.maugen.data.prompting import choose_emotion, choose_strength, prompt_levels, request_for
from pipelines.prompts import parse_description, parse_details
from pipelines.puppet import PuppetRenderer
from pipelines.puppet.identity import sample_identity

# ----------------------------------------------------------------------------------------------
# DISFA fixture

#: subject -> (colour code, labelled frames, frames on disk, least active frame)
DISFA_FIXTURE = {
    "SN001": (1, 6, range(1, 7), 3),  # part1
    "SN002": (2, 6, range(1, 7), 5),  # part1
    "SN006": (3, 6, range(1, 5), 2),  # part2; frames 5, 6 are labelled but not extracted
    "SN003": (4, 6, range(1, 7), 1),  # part3
}


def _disfa_value(code: int, frame: int, j: int, least: int) -> int:
    """Intensity of AU index j at `frame`: a varied pattern, all zero at the subject's least active frame."""
    return 0 if frame == least else (code + frame * (j + 1)) % 6


def _colour(code: int, frame: int) -> tuple[int, int, int]:
    return (code * 40, frame * 30, 100)


def _write_frame(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (16, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_disfa(root: Path, subjects: dict = DISFA_FIXTURE) -> Path:
    for subject, (code, n_labels, on_disk, least) in subjects.items():
        labels = root / "ActionUnit_Labels" / subject
        labels.mkdir(parents=True, exist_ok=True)
        for j, au in enumerate(AUS):
            lines = [f"{f},{_disfa_value(code, f, j, least)}" for f in range(1, n_labels + 1)]
            (labels / f"{subject}_au{au}.txt").write_text("\n".join(lines) + "\n")
        for f in on_disk:
            _write_frame(root / "Frames_LeftCamera" / subject / f"{f:06d}.png", _colour(code, f))
    return root


@pytest.fixture(scope="module")
def disfa_root(tmp_path_factory) -> Path:
    return make_disfa(tmp_path_factory.mktemp("disfa"))


def _near(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Pixel equals colour up to JPEG rounding."""
    return bool(np.abs(pixel.astype(int) - np.array(colour)).max() <= 3)


def _index(ds, subject: str, frame: int) -> int:
    for i, (s, f) in enumerate(zip(ds.sample_subjects, ds.frames.tolist())):
        if s == subject and f == frame:
            return i
    raise AssertionError(f"{subject} frame {frame} not in dataset")


def test_disfa_reads_labels_frames_and_exemplars(disfa_root):
    ds = DisfaDataset(disfa_root, size=8)
    assert ds.subjects == ["SN001", "SN002", "SN003", "SN006"]
    assert len(ds) == 6 + 6 + 6 + 4  # SN006: only the 4 frames on disk
    i = _index(ds, "SN002", 4)
    s = ds[i]
    assert isinstance(s, FaceSample)
    want = np.array([_disfa_value(2, 4, j, 5) for j in range(NUM_AUS)], dtype=np.float32)
    np.testing.assert_array_equal(s.intensity, want)
    np.testing.assert_array_equal(s.occurrence, (want >= 2).astype(np.float32))
    assert s.image.shape == (8, 8, 3) and s.image.dtype == np.uint8
    assert tuple(s.image[4, 4]) == _colour(2, 4)  # the right file, centre-cropped and resized
    assert tuple(s.exemplar[0, 0]) == _colour(2, 5)  # least active frame of SN002
    assert s.mask.shape == (8, 8) and (s.mask == 1).all()
    assert s.subject == "SN002" and s.meta["frame"] == 4 and s.meta["file"].endswith("000004.png")
    assert set(parse_description_aus(s.prompt)) == set(active_set(want))
    assert tuple(ds[_index(ds, "SN006", 1)].exemplar[0, 0]) == _colour(3, 2)
    # its subjects and their exemplars, for `factory train`'s training-subject embeddings
    listed = ds.subject_exemplars()
    assert [sub for sub, _ in listed] == ["SN001", "SN002", "SN003", "SN006"]
    least = {sub: DISFA_FIXTURE[sub][3] for sub in DISFA_FIXTURE}
    assert all(tuple(img[4, 4]) == _colour(DISFA_FIXTURE[sub][0], least[sub]) for sub, img in listed)
    # every: every 2nd labelled frame on disk
    ds2 = DisfaDataset(disfa_root, subjects=["SN006"], size=8, every=2)
    assert ds2.frames.tolist() == [1, 3]
    # deterministic prompts
    assert DisfaDataset(disfa_root, subjects=["SN001"], size=8)[2].prompt == ds[_index(ds, "SN001", 3)].prompt


def parse_description_aus(text: str) -> frozenset[int]:
    return active_set(parse_description(text))


def test_disfa_folds(disfa_root):
    assert len(DISFA_SUBJECTS) == 27 and len(set(DISFA_SUBJECTS)) == 27
    assert disfa_split(0, "test") == ["SN001", "SN002", "SN009", "SN010", "SN016", "SN026", "SN027", "SN030", "SN032"]
    assert disfa_split(1, "test") == ["SN006", "SN011", "SN012", "SN013", "SN018", "SN021", "SN024", "SN028", "SN031"]
    assert disfa_split(2, "test") == ["SN003", "SN004", "SN005", "SN007", "SN008", "SN017", "SN023", "SN025", "SN029"]
    tests = []
    for fold in range(3):
        train, test = set(disfa_split(fold, "train")), set(disfa_split(fold, "test"))
        assert not train & test and train | test == set(DISFA_SUBJECTS) and test == set(DISFA_FOLDS[fold])
        tests.append(test)
    assert set().union(*tests) == set(DISFA_SUBJECTS) and sum(map(len, tests)) == 27
    assert DisfaDataset(disfa_root, fold=0, part="test", size=8).subjects == ["SN001", "SN002"]
    assert DisfaDataset(disfa_root, fold=0, part="train", size=8).subjects == ["SN003", "SN006"]
    for bad in (3, -1, "0", True):
        with pytest.raises(ValueError, match="unknown fold"):
            disfa_split(bad, "test")
    with pytest.raises(ValueError, match="unknown fold"):
        DisfaDataset(disfa_root, fold=7)
    with pytest.raises(ValueError, match="unknown part"):
        disfa_split(0, "val")
    with pytest.raises(ValueError, match="not both"):
        DisfaDataset(disfa_root, subjects=["SN001"], fold=0)


def test_disfa_errors(tmp_path):
    one = {"SN001": (1, 3, range(1, 4), 1)}
    root = make_disfa(tmp_path / "a", one)
    (root / "ActionUnit_Labels/SN001/SN001_au9.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"SN001_au9\.txt.*AU9"):
        DisfaDataset(root)

    root = make_disfa(tmp_path / "b", one)
    shutil.rmtree(root / "Frames_LeftCamera/SN001")
    with pytest.raises(FileNotFoundError, match=r"SN001 has labels but no frames folder.*extract_frames"):
        DisfaDataset(root)

    root = make_disfa(tmp_path / "c", one)
    path = root / "ActionUnit_Labels/SN001/SN001_au12.txt"
    path.write_text("1,0\n2;3\n3,1\n")
    with pytest.raises(ValueError, match=r"SN001_au12\.txt:2: malformed line"):
        DisfaDataset(root)
    path.write_text("1,0\n2,7\n3,1\n")
    with pytest.raises(ValueError, match=r"SN001_au12\.txt:2: intensity '7'"):
        DisfaDataset(root)

    root = make_disfa(tmp_path / "d", one)
    for p in (root / "Frames_LeftCamera/SN001").iterdir():
        p.rename(p.with_name("frame_" + p.name))
    with pytest.raises(ValueError, match="no image numbered like a labelled frame"):
        DisfaDataset(root)
    with pytest.raises(FileNotFoundError, match="ActionUnit_Labels"):
        DisfaDataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown subjects"):
        DisfaDataset(root, subjects=["SN099"])
    with pytest.raises(ValueError, match="unknown camera"):
        DisfaDataset(root, camera="top")


# ----------------------------------------------------------------------------------------------
# extract_frames


def _fake_ffmpeg(bin_dir: Path, mode: str = "ok") -> Path:
    """A stand-in `ffmpeg` that logs its arguments and writes 3 frames to the output pattern.

    mode "fail": exits 1; "old": rejects -fps_mode like ffmpeg < 5.1, then works with -vsync.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "ffmpeg"
    write = (
        "from PIL import Image\n"
        "for k in range(1, 4):\n"
        "    Image.new('RGB', (8, 8), (k * 50, 0, 0)).save(sys.argv[-1] % k)\n"
    )
    body = {
        "ok": write,
        "fail": "sys.stderr.write('boom: invalid data'); sys.exit(1)\n",
        "old": "if '-fps_mode' in sys.argv:\n    sys.stderr.write(\"Unrecognized option 'fps_mode'\"); sys.exit(1)\n"
        + write,
    }[mode]
    script.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"with open({str(bin_dir / 'args.txt')!r}, 'a') as f:\n    f.write(' '.join(sys.argv[1:]) + '\\n')\n{body}"
    )
    script.chmod(0o755)
    return script


def _video(root: Path, subject: str = "SN001") -> Path:
    video = root / "Videos_LeftCamera" / f"LeftVideo{subject}_comp.avi"
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"not really a video")
    return video


def test_extract_frames_layout_and_atomicity(tmp_path, monkeypatch):
    root = tmp_path / "disfa"
    _video(root)
    fake = _fake_ffmpeg(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(fake.parent))
    counts = extract_frames(root, every=3, size=16, image_format="png")
    assert counts == {"SN001": 3}
    args = (fake.parent / "args.txt").read_text().split()
    assert "select=not(mod(n\\,3))" in args[args.index("-vf") + 1]
    assert args[args.index("-fps_mode") + 1] == "passthrough"
    out = root / "Frames_LeftCamera"
    assert sorted(p.name for p in out.iterdir()) == ["SN001"]  # no temporary folder left
    assert sorted(p.name for p in (out / "SN001").iterdir()) == ["000001.png", "000004.png", "000007.png"]
    # frames keep their video number, so the labels of frames 1..7 line up with them
    make_disfa(root, {"SN001": (1, 7, [], 4)})
    ds = DisfaDataset(root, size=8)
    assert ds.frames.tolist() == [1, 4, 7] and tuple(ds[1].image[0, 0]) == (100, 0, 0)
    # an existing folder is kept unless overwrite
    assert extract_frames(root, subjects=["SN001"]) == {"SN001": 3}

    failing = _fake_ffmpeg(tmp_path / "bin2", mode="fail")
    monkeypatch.setenv("PATH", str(failing.parent))
    with pytest.raises(RuntimeError, match="ffmpeg failed.*boom"):
        extract_frames(root, subjects=["SN001"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["SN001"]  # the failed run left nothing behind
    assert len(list((out / "SN001").iterdir())) == 3
    shutil.rmtree(out / "SN001")
    with pytest.raises(RuntimeError):
        extract_frames(root)
    assert list(out.iterdir()) == []  # no half extraction that a dataset could take for a full one


def test_extract_frames_old_ffmpeg_falls_back_to_vsync(tmp_path, monkeypatch):
    root = tmp_path / "disfa"
    _video(root)
    fake = _fake_ffmpeg(tmp_path / "bin", mode="old")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert extract_frames(root) == {"SN001": 3}
    calls = (fake.parent / "args.txt").read_text().splitlines()
    assert len(calls) == 2 and "-fps_mode passthrough" in calls[0] and "-vsync passthrough" in calls[1]
    assert sorted(p.name for p in (root / "Frames_LeftCamera/SN001").iterdir()) == [
        "000001.jpg",
        "000002.jpg",
        "000003.jpg",
    ]


def test_extract_frames_without_ffmpeg(tmp_path, monkeypatch):
    root = tmp_path / "disfa"
    _video(root)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="ffmpeg.*not on PATH.*install"):
        extract_frames(root)
    with pytest.raises(FileNotFoundError, match="no videos"):
        extract_frames(tmp_path / "other")


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not on PATH")
def test_extract_frames_real_ffmpeg(tmp_path):
    root = tmp_path / "disfa"
    video = _video(root)
    make = [
        "ffmpeg",
        "-v",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=32x24:rate=10",
        "-frames:v",
        "7",
        "-c:v",
        "mpeg4",
    ]
    subprocess.run([*make, str(video)], check=True)
    assert extract_frames(root, every=3, size=16) == {"SN001": 3}
    files = sorted((root / "Frames_LeftCamera/SN001").iterdir())
    assert [p.name for p in files] == ["000001.jpg", "000004.jpg", "000007.jpg"]
    assert Image.open(files[0]).size == (16, 16)


# ----------------------------------------------------------------------------------------------
# BP4D fixture

OCC_HEADER = [0, 1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24]


def _occ_row(frame: int, values: dict[int, int]) -> str:
    return ",".join([str(frame)] + [str(values.get(au, 0)) for au in OCC_HEADER[1:]])


def make_bp4d(root: Path) -> Path:
    occ = root / "AUCoding" / "AU_OCC"
    occ.mkdir(parents=True)
    # F001 T1: BP4D-style frame numbers (2440...), frame files named 2440.jpg
    rows = {
        2440: {1: 1, 2: 1, 6: 1, 12: 1, 7: 1},
        2441: {1: 9, 4: 1, 15: 1, 17: 1},
        2442: {7: 1},  # none of our AUs, but AU7: not the most neutral
        2443: {},  # nothing at all: the exemplar
    }
    (occ / "F001_T1.csv").write_text(
        ",".join(map(str, OCC_HEADER)) + "\n" + "\n".join(_occ_row(f, v) for f, v in rows.items()) + "\n"
    )
    for f in rows:
        _write_frame(root / "Frames/F001/T1" / f"{f}.jpg", (10, f - 2400, 200))
    # F001 T2: 6-digit names; frame 3 has no image
    (occ / "F001_T2.csv").write_text(
        ",".join(map(str, OCC_HEADER)) + "\n" + "\n".join(_occ_row(f, {12: 1, 17: 1}) for f in (1, 2, 3)) + "\n"
    )
    for f in (1, 2):
        _write_frame(root / "Frames/F001/T2" / f"{f:06d}.png", (20, f, 200))
    # M001 T1
    (occ / "M001_T1.csv").write_text(",".join(map(str, OCC_HEADER)) + "\n" + _occ_row(5, {6: 1}) + "\n")
    _write_frame(root / "Frames/M001/T1/000005.png", (30, 5, 200))
    # intensities: AU06 (zero-padded folder) with a 9, AU12 (unpadded) for T1 only
    au6 = root / "AU-Intensity-Codes3.0" / "AU06"
    au6.mkdir(parents=True)
    (au6 / "F001_T1_AU06.csv").write_text("2440,4\n2441,9\n2442,0\n2443,0\n")
    au12 = root / "AU-Intensity-Codes3.0" / "AU12"
    au12.mkdir(parents=True)
    (au12 / "F001_T1_AU12.csv").write_text("2440,2\n2441,0\n2443,0\n")  # 2442 absent -> NaN
    return root


@pytest.fixture(scope="module")
def bp4d_root(tmp_path_factory) -> Path:
    return make_bp4d(tmp_path_factory.mktemp("bp4d"))


def _bp4d_item(ds: BP4DDataset, task: str, frame: int) -> FaceSample:
    for i in range(len(ds)):
        s = ds[i]
        if s.meta["task"] == task and s.meta["frame"] == frame:
            return s
    raise AssertionError(f"{task} frame {frame} not in dataset")


def test_bp4d_labels_and_nan(bp4d_root):
    ds = BP4DDataset(bp4d_root, size=8)
    assert ds.subjects == ["F001", "M001"] and len(ds) == 4 + 2 + 1
    s = _bp4d_item(ds, "T1", 2440)
    nan = np.nan
    #                AU: 1  2  4  5    6  9    12 15 17 20   25   26
    occ = np.array([1, 1, 0, nan, 1, nan, 1, 0, 0, nan, nan, nan], dtype=np.float32)
    np.testing.assert_array_equal(s.occurrence, occ)
    inten = np.full(NUM_AUS, nan, dtype=np.float32)
    inten[au_index(6)], inten[au_index(12)] = 4, 2
    np.testing.assert_array_equal(s.intensity, inten)
    assert _near(s.image[0, 0], (10, 40, 200)) and s.subject == "F001"

    s = _bp4d_item(ds, "T1", 2441)
    assert np.isnan(s.occurrence[au_index(1)])  # 9 = not labelled
    assert s.occurrence[au_index(4)] == 1 and s.occurrence[au_index(17)] == 1
    assert np.isnan(s.intensity[au_index(6)])  # intensity 9
    assert s.intensity[au_index(12)] == 0 and np.isnan(s.intensity[au_index(17)])  # no AU17 intensity file
    assert np.isnan(_bp4d_item(ds, "T1", 2442).intensity[au_index(12)])  # frame missing from the AU12 file

    # the prompt: known intensity, else 3 for occurring AUs; the prompt never mentions uncoded AUs
    pv = prompt_vector(s.intensity, s.occurrence)
    assert pv[au_index(4)] == 3 and pv[au_index(17)] == 3 and pv[au_index(12)] == 0 and pv[au_index(2)] == 0
    assert np.isnan(pv[au_index(1)]) and np.isnan(pv[au_index(25)])
    assert active_set(parse_description(s.prompt)) == {4, 15, 17}
    assert not parse_details(s.prompt).mentioned[np.isnan(pv)].any()

    # exemplar: the frame with the fewest occurring AUs over all coded columns (2443, not 2442 with AU7)
    assert _near(s.exemplar[0, 0], (10, 43, 200))
    assert _near(_bp4d_item(ds, "T2", 1).exemplar[0, 0], (10, 43, 200))
    listed = ds.subject_exemplars()  # one exemplar per subject, for the training-subject embeddings
    assert [sub for sub, _ in listed] == ["F001", "M001"]
    assert _near(listed[0][1][0, 0], (10, 43, 200)) and _near(listed[1][1][0, 0], (30, 5, 200))
    assert [x.meta["frame"] for x in (ds[i] for i in range(len(ds))) if x.meta["task"] == "T2"] == [1, 2]
    assert len(BP4DDataset(bp4d_root, subjects=["F001"], every=2, size=8)) == 2 + 1
    assert BP4DDataset(bp4d_root, tasks=["T2"], size=8).subjects == ["F001"]


def test_bp4d_split_and_errors(bp4d_root, tmp_path):
    assert len(BP4D_SUBJECTS) == 41 and BP4D_SUBJECTS[0] == "F001" and BP4D_SUBJECTS[-1] == "M018"
    tests = []
    for fold in range(3):
        train, test = set(bp4d_split(fold, "train")), set(bp4d_split(fold, "test"))
        assert not train & test and train | test == set(BP4D_SUBJECTS) and test == set(BP4D_FOLDS[fold])
        assert any(s[0] == "F" for s in test) and any(s[0] == "M" for s in test)
        tests.append(test)
    assert sorted(map(len, tests)) == [13, 14, 14] and bp4d_split(0, "test")[:2] == ["F001", "F004"]
    assert BP4DDataset(bp4d_root, fold=0, part="test", size=8).subjects == ["F001"]
    with pytest.raises(ValueError, match="unknown fold"):
        bp4d_split(3, "train")

    root = make_bp4d(tmp_path / "b")
    shutil.rmtree(root / "Frames/M001")
    with pytest.raises(FileNotFoundError, match=r"M001 T1 has labels .* but no frames folder"):
        BP4DDataset(root)
    assert len(BP4DDataset(root, subjects=["F001"], size=8)) == 6
    with pytest.raises(FileNotFoundError, match="no label files"):
        BP4DDataset(root, subjects=["M002"])
    (root / "AUCoding/AU_OCC/F001_T2.csv").write_text(",".join(map(str, OCC_HEADER)) + "\n" + _occ_row(1, {4: 2}))
    with pytest.raises(ValueError, match=r"F001_T2\.csv:2: AU4 value 2"):
        BP4DDataset(root, subjects=["F001"])
    (root / "AUCoding/AU_OCC/F001_T2.csv").write_text(",".join(map(str, OCC_HEADER)) + "\n1,0,1\n")
    with pytest.raises(ValueError, match=r"F001_T2\.csv:2: malformed row"):
        BP4DDataset(root, subjects=["F001"])


# ----------------------------------------------------------------------------------------------
# puppet


def test_puppet_dataset_deterministic_and_exact():
    a = PuppetFaceDataset(24, 3, split="train", seed=5, workers=1)
    b = PuppetFaceDataset(24, 3, split="train", seed=5, workers=1)
    c = PuppetFaceDataset(24, 3, split="train", seed=6, workers=1)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.prompts == b.prompts and [a[i].subject for i in range(24)] == [b[i].subject for i in range(24)]
    assert not np.array_equal(a.targets, c.targets)
    assert a.exemplars.shape == (3, 64, 64, 3) and a.masks.shape == (3, 64, 64)  # per person, not per sample

    r = PuppetRenderer(64)
    for i in (0, 7, 23):
        s = a[i]
        who = s.meta["person"]
        person = a.people[who]
        np.testing.assert_array_equal(s.occurrence, (s.intensity >= 2).astype(np.float32))
        np.testing.assert_array_equal(s.image, r.render(person, s.intensity))
        np.testing.assert_array_equal(s.exemplar, r.render(person, np.zeros(NUM_AUS)))
        np.testing.assert_array_equal(s.mask, r.face_mask(person).astype(np.float32))
        assert s.mask.dtype == np.float32 and not np.isnan(s.intensity).any()
        assert active_set(parse_description(s.prompt)) == active_set(s.intensity)
    assert len({a[i].subject for i in range(24)}) == 3

    # the people the samples show, with their exemplars: from the dataset, or listed without rendering a sample
    listed = a.subject_exemplars()
    assert [sub for sub, _ in listed] == a.subject_ids and all(
        np.array_equal(img, a.exemplars[k]) for k, (_, img) in enumerate(listed)
    )
    few = PuppetFaceDataset(2, 5, split="train", seed=5, workers=1)  # 2 samples: at most 2 of the 5 people
    for ds, n in ((a, 24), (few, 2)):
        again = puppet_subjects(n, 5 if ds is few else 3, "train", 5, 64, workers=1)
        assert [sub for sub, _ in again] == [sub for sub, _ in ds.subject_exemplars()] == sorted(
            {ds[i].subject for i in range(n)}, key=ds.subject_ids.index
        )
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(again, ds.subject_exemplars()))

    held = PuppetFaceDataset(4, 3, split="heldout", seed=5, workers=1)
    assert not {held[i].subject for i in range(4)} & {a[i].subject for i in range(24)}
    people = [sample_identity(np.random.default_rng(k)) for k in range(2)]
    d = PuppetFaceDataset(5, people, seed=1, workers=1)
    assert d.people == people and {d[i].meta["person"] for i in range(5)} <= {0, 1}
    with pytest.raises(ValueError, match="size must be one of"):
        PuppetFaceDataset(2, 1, size=50)
    with pytest.raises(ValueError, match="empty list"):
        PuppetFaceDataset(2, [])


def test_puppet_dataset_workers_match_serial():
    serial = PuppetFaceDataset(512, 4, seed=2, workers=1)
    parallel = PuppetFaceDataset(512, 4, seed=2, workers=2)  # pipelines.puppet.data.render uses processes from 512
    np.testing.assert_array_equal(serial.images, parallel.images)


# ----------------------------------------------------------------------------------------------
# collate and prompts


def test_collate(disfa_root, bp4d_root):
    puppet = PuppetFaceDataset(3, 2, seed=0, workers=1, size=64)
    batch = collate([puppet[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["exemplar"].shape == (3, 3, 64, 64) and batch["mask"].shape == (3, 1, 64, 64)
    assert batch["intensity"].shape == (3, 12) and batch["occurrence"].shape == (3, 12)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    px = puppet[1].image[10, 20]
    assert torch.allclose(batch["image"][1, :, 10, 20], torch.tensor(px / 127.5 - 1, dtype=torch.float32))
    assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}
    assert len(batch["prompt"]) == 3 and len(batch["subject"]) == 3

    bp4d = BP4DDataset(bp4d_root, size=8)
    disfa = DisfaDataset(disfa_root, size=8)
    batch = collate([bp4d[0], disfa[0]])
    assert torch.isnan(batch["intensity"][0, au_index(1)]) and not torch.isnan(batch["intensity"][1]).any()
    assert torch.isnan(batch["occurrence"][0, au_index(25)]) and (batch["mask"] == 1).all()
    loader = torch.utils.data.DataLoader(disfa, batch_size=5, collate_fn=collate)
    assert next(iter(loader))["image"].shape == (5, 3, 8, 8)
    with pytest.raises(ValueError, match="different image sizes"):
        collate([bp4d[0], puppet[0]])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


def _vec(**aus: float) -> np.ndarray:
    v = np.zeros(NUM_AUS)
    for k, x in aus.items():
        v[au_index(int(k[2:]))] = x
    return v


@pytest.mark.parametrize(
    "v",
    [
        _vec(AU6=3, AU12=4, AU25=2),
        _vec(AU1=2.4, AU4=2.6, AU15=5, AU17=1),
        _vec(AU1=3, AU2=3, AU5=2, AU26=4),
        _vec(AU9=np.nan, AU20=2, AU26=np.nan, AU4=1),
        _vec(),
        _vec(AU12=1, AU26=np.nan),
    ],
)
def test_describe_parses_back(v):
    levels = prompt_levels(v)
    for seed in range(5):
        text = describe(v, seed)
        assert text == describe(v.copy(), seed)
        assert active_set(parse_description(text)) == active_set(levels), text
        assert not parse_details(text).mentioned[np.isnan(v)].any(), text
    assert len({describe(v, s) for s in range(10)}) > 1


def test_describe_emotion_and_strength():
    assert request_for(_vec(AU6=3, AU12=4, AU25=2), 0).emotion == "happiness"
    assert request_for(_vec(AU1=3, AU4=3, AU15=2), 0).emotion == "sadness"
    assert request_for(_vec(AU4=3, AU5=3), 0).emotion == "anger"
    req = request_for(_vec(AU12=1, AU1=np.nan), 0)
    assert (req.emotion, req.strength) == ("neutral", 0)
    assert choose_emotion(set()) == "neutral" and choose_emotion({12}) == "contempt"
    assert [choose_strength(np.array(x)) for x in ([2], [2, 3], [3], [4, 3], [4], [5, 5])] == [1, 2, 3, 3, 4, 4]
    assert prompt_levels(np.array([2.5, 1.49, np.nan, 7, -1, 0, 0, 0, 0, 0, 0, 0])).tolist()[:5] == [3, 1, 0, 5, 0]
    with pytest.raises(ValueError, match="12 entries"):
        describe(np.zeros(5), 0)


def test_training_prompts_fit_the_text_encoder_they_train():
    """With the trained model's budget (Trainer._budget), every training prompt fits its text encoder, as a
    build's prompts do, while the labels stay those rendered; without it long prompts run past 48 tokens."""
    from pipelines.maugen.builtin import resolve_checkpoint
    from pipelines.prompts.budget import TokenBudget

    budget = TokenBudget.from_tokenizer(resolve_checkpoint("builtin:tiny-puppet") / "tokenizer")
    free = PuppetFaceDataset(96, 4, split="train", seed=2, workers=1)
    fitted = PuppetFaceDataset(96, 4, split="train", seed=2, workers=1, budget=budget)
    assert max(budget.count(p) for p in free.prompts) > budget.max_tokens  # the budget has work to do here
    assert all(budget.fits(p) for p in fitted.prompts)
    np.testing.assert_array_equal(free.targets, fitted.targets)
    for p, t in zip(fitted.prompts, fitted.targets):
        said = parse_description(p)
        assert ((said >= 1) <= (t >= 1)).all(), (p, t)  # shortening drops words, never invents an AU
