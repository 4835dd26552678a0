"""Builds with the detect stage: AU detectors, k-of-N consensus, realism; injected bad samples are
rejected for the right reason; bad model files stop the build with a clear error and write nothing."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from detectors.builtin import resolve

from conftest import FAST, SMALL_RAY, factory, shard_stats

INJECT = "blank:0.04,noise:0.04,wrong_expression:0.06"
EXPECTED_REASON = {"blank": "invalid_image", "noise": "realism", "wrong_expression": "label_consensus_jaccard"}


@pytest.fixture(scope="module")
def injected(tmp_path_factory, shared_ray) -> Path:
    out = tmp_path_factory.mktemp("detect") / "out"
    p = factory(
        "build", "--target", "300", "--shard-size", "150", "--out", str(out), *FAST,
        env={**shared_ray, "MIFA_INJECT": INJECT},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _tar_members(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def test_injected_bad_samples_are_rejected_for_the_right_reason(injected):
    stats = list(shard_stats(injected).values())
    kept = set(_tar_members(injected))
    assert len(kept) == 300
    seen = {k: 0 for k in EXPECTED_REASON}
    for s in stats:
        assert s["size"] == 150 and s["samples"] == 150
        for kind, keys in s.get("injected", {}).items():
            reason = EXPECTED_REASON[kind]
            examples = set(s["rejected_examples"].get(reason, []))
            assert s["rejected"][reason] <= 200 or len(examples) == 200
            for key in keys:
                assert key not in kept, f"{kind} sample {key} was written"
                assert key in examples, f"{kind} sample {key} not rejected as {reason}: {s['rejected_examples']}"
            seen[kind] += len(keys)
    assert all(n >= 3 for n in seen.values()), seen  # every kind was exercised
    # the rest was kept: rejections beyond the injected ones are few on the exact puppet generator
    total = sum(s["candidates"] for s in stats)
    natural = sum(sum(s["rejected"].values()) for s in stats) - sum(seen.values())
    assert natural / total < 0.25, [s["rejected"] for s in stats]


def test_kept_samples_carry_consensus_raw_outputs_and_scores(injected):
    table = pq.read_table(sorted((injected / "shards").glob("*.parquet"))[0])
    rows = table.to_pylist()
    for r in rows:
        assert len(r["consensus_occurrence"]) == 12 and len(r["consensus_agree"]) == 12
        assert r["realism"] >= 0.5 and r["label_consensus_jaccard"] >= 0.67
        raw = json.loads(r["detectors"])
        assert set(raw) == {"puppet-au-cnn", "puppet-au-resnet", "puppet-au-vit"}
        assert all(len(v["probability"]) == 12 and len(v["intensity"]) == 12 for v in raw.values())
    sample = next(iter(_tar_members(injected).values()))
    meta = json.loads(sample["json"])
    assert meta["consensus"]["min_agree"] == 2 and meta["consensus"]["coverage"] == [3] * 12
    assert set(meta["detectors"]) == {"puppet-au-cnn", "puppet-au-resnet", "puppet-au-vit"}
    assert {"realism", "label_consensus_jaccard", "label_prompt_jaccard"} <= set(meta["scores"])
    build = json.loads((injected / "build.json").read_text())
    assert set(build["models"]) == {
        "builtin:au-cnn",
        "builtin:au-resnet",
        "builtin:au-vit",
        "builtin:realism",
    }


def test_verify_and_eval_on_a_detected_build(injected):
    p = factory("verify", str(injected))
    assert p.returncode == 0, p.stdout + p.stderr
    p = factory("eval", str(injected), "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)
    assert rep["samples"] == 300 and rep["panel"] == "independent"
    # judged by models nothing trained or filtered on; only realism has no independent judge yet
    roles = {j["role"]: j for j in rep["judges"]}
    assert roles["au_detector"]["name"] == "puppet-eval-au" and roles["au_detector"]["also"] == []
    assert roles["identity_encoder"]["name"] == "puppet-eval-identity" and roles["identity_encoder"]["also"] == []
    assert roles["feature_network"]["name"] == "eval-au-gap" and roles["feature_network"]["also"] == []
    assert roles["realism"]["also"] == ["build filter detect.realism (builtin:realism)"]
    assert len(rep["overlap"]) == 1 and "puppet-realism" in rep["overlap"][0]
    # the puppet generator labels exactly, so its labels match the evaluator closely
    assert rep["consensus_vs_generated_labels"]["f1_mean"] >= 0.9
    assert rep["consensus_vs_prompt_targets"]["f1_mean"] >= 0.85
    assert rep["realism"]["accepted"] == 1.0
    assert rep["identity_similarity"]["verified"] >= 0.9
    # the puppet generator renders the targets exactly: its images are the reference set
    fd = rep["frechet_distance"]
    assert fd["feature_network"] == "eval-au-gap" and fd["samples"] == 300
    assert 0 <= fd["value"] < 1e-3
    assert {"f1", "icc", "mae", "frechet_distance", "broken_faces"} <= set(rep["definitions"])
    # the exact renderer's faces are intact by the broken-face measure
    assert rep["broken_faces"]["broken"] == 0.0
    assert (injected / "eval.json").is_file()
    # the build's own panel: every judge also filtered the corpus (the Frechet features are the realism
    # filter's backbone), and the terminal view says so
    p = factory("eval", str(injected), "--panel", "build", "--max-samples", "60", "--no-save")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("also build filter") == 5 and "judged by the build panel" in p.stdout
    assert p.stdout.count("its figures are not independent") == 5


def _copy_spec(tmp_path: Path, name: str) -> Path:
    src = resolve(f"builtin:{name}")
    d = tmp_path / name
    d.mkdir()
    shutil.copy(src.parent / "model.onnx", d / "model.onnx")
    tree = yaml.safe_load(src.read_text())
    tree.pop("sha256")
    tree.pop("torch_weights")
    (d / "spec.yaml").write_text(yaml.safe_dump(tree))
    return d / "spec.yaml"


def test_corrupt_or_missing_models_stop_the_build_before_any_shard_naming_each(shared_ray, tmp_path):
    """A corrupt detector model and a generator checkpoint that cannot load, in one build: the errors
    raised inside the actors reach the user as one line each (not a Ray traceback), both at once."""
    from pipelines.maugen.builtin import resolve_checkpoint

    spec = _copy_spec(tmp_path, "au-cnn")
    (spec.parent / "model.onnx").write_bytes(b"not an onnx file" * 100)
    ckpt = tmp_path / "maugen"
    shutil.copytree(resolve_checkpoint("builtin:tiny-puppet"), ckpt)
    (ckpt / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors" * 100)
    out = tmp_path / "out"
    dets = f"detect.au_detectors=[{spec},builtin:au-resnet]"
    args = ["--target", "20", "--shard-size", "10", "--out", str(out), "--set", dets, *SMALL_RAY]
    p = factory("build", *args, "--set", "generator=maugen", "--set", f"maugen.checkpoint={ckpt}", env=shared_ray)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-2000:]
    lines = p.stderr.splitlines()
    assert any("could not load their models" in ln and "corrupt or not ONNX" in ln for ln in lines)
    assert any(
        "generator actors could not load their model" in ln and f"maugen.checkpoint {ckpt}" in ln and "re-save it" in ln
        for ln in lines
    ), p.stderr[-2000:]
    assert not list((out / "shards").glob("*")) if (out / "shards").exists() else True

    (spec.parent / "model.onnx").unlink()
    out2 = tmp_path / "out2"
    args2 = ["--target", "20", "--shard-size", "10", "--out", str(out2), "--set", dets, *FAST]
    p = factory("build", *args2, env=shared_ray)
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and str(spec.parent / "model.onnx") in p.stderr.strip().splitlines()[-1]
    assert not (out2 / "build.json").exists()


def test_resume_with_other_model_files_is_refused(shared_ray, tmp_path):
    spec = _copy_spec(tmp_path, "au-cnn")
    out = tmp_path / "out"
    args = ["--target", "20", "--shard-size", "10", "--out", str(out), *FAST]
    args += ["--set", f"detect.au_detectors=[{spec}]", "--set", "detect.min_agree=1", "--set", "detect.realism=null"]
    p = factory("build", *args, env=shared_ray)
    assert p.returncode == 0, p.stderr[-2000:]
    shutil.copy(resolve("builtin:au-resnet").parent / "model.onnx", spec.parent / "model.onnx")
    p = factory("build", *args, env=shared_ray)
    assert p.returncode == 2 and "other model files" in p.stderr, p.stderr[-2000:]


def test_images_of_rejected_injections_never_reach_the_tar(injected):
    """Noise images are the easiest to spot in the corpus: none may be there."""
    from PIL import Image

    for key, files in list(_tar_members(injected).items())[:300]:
        img = np.asarray(Image.open(io.BytesIO(files["png"])))
        assert img.std() > 1.0, key
