"""Identity leakage (factory/leakage.py): the training subjects' embeddings beside a MAUGen checkpoint,
the detector panel's highest similarity to them, the `training_similarity` check, and every path on
which a build does not measure it (one line when the check is set, a recorded reason when not).

The shipped checkpoint's file against its recomputation is here too; `factory train` writing the
file: tests/test_maugen.py::test_factory_train_command; a build with the shipped MAUGen measuring it:
tests/test_maugen_default.py::test_a_build_with_the_shipped_maugen_runs_the_whole_graph.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from detectors.builtin import resolve
from detectors.identity import OnnxIdentityEncoder, max_similarity
from detectors.panel import DetectorPanel
from detectors.spec import file_sha256
from factory.candidate import Candidate, SampleDetection
from factory.checks import REASONS, run_checks
from factory.cli import app
from factory.config import load_config
from factory.leakage import (
    FIELDS,
    PREDATES,
    LeakageError,
    TrainingSubjects,
    embed_subjects,
    plan_leakage,
    read_embeddings,
)
from factory.plan import Plan
from factory.record import prepare_output
from factory.report import leakage_line
from factory.report_data import SampleAggregates, leakage_summary
from factory.sample_meta import accepted_sample
from factory.sampler import ShardSampler
from pipelines.maugen.builtin import SUBJECTS_FILE, checkpoint_hash, resolve_checkpoint
from pipelines.prompts import make_expander
from pipelines.prompts.types import ExpansionRequest
from pipelines.puppet import PuppetRenderer
from pipelines.puppet.data import identities

SHIPPED = resolve_checkpoint("builtin:tiny-puppet")
DETECTORS = ["builtin:au-cnn", "builtin:au-resnet", "builtin:au-vit"]


def _candidates(cfg, images: np.ndarray, det) -> list[Candidate]:
    """Candidates of a build's shard 0 carrying `images`, with labels that match their prompts (so only
    the detect-stage checks decide) and the panel's detection of the images."""
    specs = ShardSampler(Plan(cfg).shard(0), cfg).draw()[: len(images)]
    reqs = [
        ExpansionRequest(emotion=s.emotion, strength=s.strength, intensity=tuple(map(int, s.intensity)), seed=s.seed)
        for s in specs
    ]
    expansions, _ = make_expander(cfg.expand).expand_batch(reqs)
    cands = []
    for j, (spec, exp) in enumerate(zip(specs, expansions)):
        c = Candidate(spec, expansion=exp, image=images[j], valid=True)
        c.intensity = spec.intensity.astype(np.float32)
        c.occurrence_prob = (np.asarray(exp.parsed) >= cfg.labels.occurrence_threshold).astype(np.float32)
        c.scores["prompt_target_jaccard"] = exp.jaccard
        c.detection = SampleDetection.of(det, j)
        cands.append(c)
    return cands


def test_the_check_rejects_faces_of_training_subjects_and_unset_it_only_measures():
    people = identities(4, "heldout", seed=3)
    faces, _ = PuppetRenderer(size=64).exemplars(people)
    subjects = embed_subjects([(f"p{k}", faces[k]) for k in range(2)])  # persons 0 and 1 are "training subjects"
    assert subjects.embeddings.shape == (2, 64) and np.allclose(np.linalg.norm(subjects.embeddings, axis=1), 1)
    panel = DetectorPanel(DETECTORS, 2, identity_encoder="builtin:identity", training_subjects=subjects.embeddings)
    det = panel.detect(faces)
    enc = OnnxIdentityEncoder(str(resolve("builtin:identity")))
    want = (enc.embed(faces) @ subjects.embeddings.T).max(1)
    np.testing.assert_allclose(det.training_similarity, want, atol=1e-6)
    # a training subject's own face scores 1; the two others lie well under it (what the check tells apart)
    assert det.training_similarity[:2] == pytest.approx(1.0, abs=1e-5) and (det.training_similarity[2:] < 0.95).all()
    assert panel.describe()["training_subjects"] == 2

    base = ["generator=puppet", "checks.label_consensus_jaccard=0"]
    for limit, rejected in (("0.99", 2), ("-1", 4), (None, 0)):
        cfg = load_config(None, base + ([f"checks.training_similarity={limit}"] if limit else []))
        cands = _candidates(cfg, faces, det)
        counts = run_checks(cands, cfg)
        assert counts["training_similarity"] == rejected and sum(counts.values()) == rejected, (limit, counts)
        if limit == "0.99":
            assert [c.fate for c in cands] == ["training_similarity"] * 2 + ["accepted"] * 2
        assert [c.scores["training_similarity"] for c in cands] == pytest.approx(want, abs=1e-6)  # measured either way
    # accepted samples carry it in KEY.json's scores and the parquet row
    meta, _, row = accepted_sample(cands[2], 2, "puppet@x", "b")
    assert meta["scores"]["training_similarity"] == row["training_similarity"] == round(float(want[2]), 6)
    # a panel without training subjects measures nothing: no score, a null column
    plain = DetectorPanel(DETECTORS, 2).detect(faces)
    assert plain.training_similarity is None
    cands = _candidates(cfg, faces, plain)
    assert run_checks(cands, load_config(None, [*base, "checks.training_similarity=-1"]))["training_similarity"] == 0
    meta, _, row = accepted_sample(cands[0], 2, "puppet@x", "b")
    assert "training_similarity" not in meta["scores"] and row["training_similarity"] is None
    assert REASONS.index("training_similarity") == REASONS.index("label_consensus_jaccard") + 1
    assert max_similarity(np.zeros((0, 64), np.float32), subjects.embeddings).shape == (0,)


def _one_line(res) -> str:
    """The CLI's output, which must be one line and no traceback."""
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_missing_or_foreign_subjects_file_is_one_line_with_the_check_and_a_reason_without(tmp_path):
    """A checkpoint without the file, then with one embedded by another encoder, then recomputed with
    `factory subjects`: the shipped checkpoint's file is exactly its recomputation."""
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, ckpt, ignore=shutil.ignore_patterns(SUBJECTS_FILE))
    out = tmp_path / "out"

    def build(*sets: str):
        args = ["build", "--target", "4", "--out", str(out), "--set", f"maugen.checkpoint={ckpt}", *sets]
        return runner.invoke(app, [*args, "--set", "runtime.progress=false"])

    def plan(*sets: str):
        return plan_leakage(load_config(None, [f"maugen.checkpoint={ckpt}", *sets]))

    # no file: not measured, the report says why and the fix; with the check set the build stops before anything
    p = plan()
    assert not p.measured and p.why == f"{ckpt} has no {SUBJECTS_FILE}; rebuild it with `factory subjects {ckpt}`"
    line = leakage_line(leakage_summary({"training_similarity": p.record()}, SampleAggregates(), 0))
    assert line == f"training similarity (identity leakage): not measured: {p.why}"
    res = build("--set", "checks.training_similarity=0.9")
    assert res.exit_code == 2 and not out.exists()
    assert _one_line(res) == (
        f"config error: checks.training_similarity=0.9 cannot be applied: {ckpt} has no {SUBJECTS_FILE}; rebuild it "
        f"with `factory subjects {ckpt}`, or unset checks.training_similarity to build without the leakage check"
    )

    # embedded with another encoder (sha mismatch): both named, and the command that recomputes it
    res = runner.invoke(app, ["subjects", str(ckpt), "--identity-encoder", "builtin:eval-identity"])
    assert res.exit_code == 0 and "400 training subjects (puppet) embedded with builtin:eval-identity" in res.output
    ours = file_sha256(resolve("builtin:identity").parent / "model.onnx")
    theirs = file_sha256(resolve("builtin:eval-identity").parent / "model.onnx")
    mismatch = (
        f"{ckpt / SUBJECTS_FILE} was embedded with builtin:eval-identity (model sha256 {theirs[:12]}) but "
        f"detect.identity_encoder is builtin:identity (model sha256 {ours[:12]})"
    )
    p = plan()
    assert not p.measured and p.why == f"{mismatch}; recompute it with `factory subjects {ckpt}`"
    res = build("--set", "checks.training_similarity=0.9")
    assert res.exit_code == 2 and not out.exists() and mismatch in _one_line(res)
    assert plan("detect.identity_encoder=builtin:eval-identity").measured  # the encoder it was embedded with

    # recomputed with the build's encoder: the very bytes shipped beside builtin:tiny-puppet
    res = runner.invoke(app, ["subjects", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert (ckpt / SUBJECTS_FILE).read_bytes() == (SHIPPED / SUBJECTS_FILE).read_bytes()
    p = plan("checks.training_similarity=0.9")
    assert p.measured and p.check == 0.9 and p.threshold == 0.7496 and len(p.subjects.subject_ids) == 400
    assert p.model_hashes(str(ckpt)) == {f"training_subjects:{ckpt}": file_sha256(ckpt / SUBJECTS_FILE)}
    with np.load(ckpt / SUBJECTS_FILE) as z:  # embeddings and names only: no photo is copied beside the weights
        assert sorted(z.files) == sorted(FIELDS) and z["embeddings"].shape == (400, 64)
        assert all(z[f].ndim <= 1 for f in FIELDS if f != "embeddings")
    # the weights' hash leaves the file out: recomputing it does not change the generator's provenance tag
    assert checkpoint_hash(ckpt) == checkpoint_hash(SHIPPED)
    other = plan("detect.identity_encoder=builtin:eval-identity")
    assert f"recompute it with `factory subjects {ckpt} --identity-encoder builtin:eval-identity`" in other.why

    # a detector actor re-reads the planned file and refuses one that changed since
    np.testing.assert_array_equal(read_embeddings(p.file, p.file_sha256), p.subjects.embeddings)
    with pytest.raises(LeakageError, match="is not the file the build planned with"):
        read_embeddings(p.file, "0" * 64)
    # a corrupt file stops the build whether or not the check is set
    (ckpt / SUBJECTS_FILE).write_bytes(b"not a zip")
    with pytest.raises(LeakageError, match=rf"{SUBJECTS_FILE} is not a training-subjects file .*rebuild it with"):
        plan()
    res = build()
    assert res.exit_code == 2 and "rebuild it with `factory subjects" in _one_line(res)


def test_a_check_that_cannot_apply_is_a_config_error_and_otherwise_a_recorded_reason(tmp_path):
    p = plan_leakage(load_config(None, ["generator=puppet"]))
    assert not p.measured and p.why == "generator=puppet is no trained model, so it has no training subjects"
    assert p.record()["measured"] is False and p.model_hashes("x") == {} and p.actor_args() is None
    for sets in (["generator=puppet"], ["detect.enabled=false"]):
        with pytest.raises(LeakageError, match=r"^config error: checks.training_similarity=0.5 cannot be applied: "):
            plan_leakage(load_config(None, [*sets, "checks.training_similarity=0.5"]))
    with pytest.raises(ValueError, match="checks.training_similarity"):
        load_config(None, ["checks.training_similarity=2"])
    # a build.json from before the check: the report says so
    assert "predates the identity-leakage check" in leakage_line(leakage_summary({}, SampleAggregates(), 0))
    # `factory train` and `factory subjects` check the encoder they are given before any work
    for command in (["train"], ["subjects", "builtin:tiny-puppet"]):
        res = CliRunner().invoke(app, [*command, "--identity-encoder", "builtin:au-cnn"])
        assert res.exit_code == 2 and "describes a au_detector model, but a identity is configured" in _one_line(res)
    with pytest.raises(ValueError, match="subject twice"):
        embed_subjects([("a", np.zeros((64, 64, 3), np.uint8))] * 2)
    with pytest.raises(LeakageError, match="not a training-subjects file"):
        TrainingSubjects.load(Path(SHIPPED / "model_index.json"), "fix")

    # a default build begun before the check (build.json without its entry) resumes as it began: unmeasured,
    # its models without the file; --new-build starts it over measured
    cfg, out = load_config(None, []), str(tmp_path / "old")
    planned = plan_leakage(cfg)
    layout, rec = prepare_output(cfg, out, leakage=planned)
    assert rec["training_similarity"]["measured"] and "training_subjects:builtin:tiny-puppet" in rec["models"]
    del rec["training_similarity"], rec["models"]["training_subjects:builtin:tiny-puppet"]
    layout.write_json_atomic(layout.build_json, rec)
    _, again = prepare_output(cfg, out, leakage=planned)
    assert again == rec and planned.for_record(again).actor_args() is None
    assert planned.for_record(again).why == PREDATES and planned.for_record(None) is planned
    assert prepare_output(cfg, out, new_build=True)[1]["training_similarity"]["measured"]


def test_a_puppet_build_plans_without_importing_torch():
    """The plan is made in the driver before any shard: for the puppet generator it must not import
    pipelines.maugen (torch and diffusers: seconds of every puppet build's start)."""
    import subprocess
    import sys

    code = (
        "import sys; from factory.config import load_config; from factory.leakage import plan_leakage; "
        "p = plan_leakage(load_config(None, ['generator=puppet'])); print(p.measured, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
