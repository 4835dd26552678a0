"""Config tree: YAML + --set, one-line errors naming the key, frozen build.json, refusal to mix builds."""

from __future__ import annotations

import json

import pytest

from factory.config import ConfigError, FactoryConfig, config_from_dict, load_config
from factory.record import BuildConfigMismatch, prepare_output


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        None, ["build.shard_size=500", "plan.emotions={happiness: 2, sadness: 1}", "build.image_format=jpg"]
    )
    assert cfg.build.shard_size == 500
    assert cfg.plan.emotions == {"happiness": 2.0, "sadness": 1.0}
    assert cfg.build.image_format == "jpg"
    y = tmp_path / "c.yaml"
    y.write_text("build:\n  target: 77\n  seed: 3\n")
    cfg = load_config(y, ["build.seed=4"])
    assert (cfg.build.target, cfg.build.seed) == (77, 4)


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("build.shard_size=-3", "build.shard_size"),
        ("build.shard_size=abc", "build.shard_size"),
        ("build.image_format=gif", "build.image_format"),
        ("build.shardsize=10", "build.shardsize: unknown key; allowed here: image_format, image_size, jpg_quality"),
        ("bogus.x=1", "bogus: unknown key; allowed here: build, checks"),
        ("plan.emotions={joy: 1}", "unknown emotion 'joy'; allowed: neutral, happiness"),
        ("plan.skin_groups=[1, 1]", "plan.skin_groups"),
        ("checks.label_prompt_jaccard=1.5", "checks.label_prompt_jaccard"),
        ("generator=diffusion", "generator"),
        ("detect.min_agree=4", "min_agree=4 but only 3 AU detectors are configured"),
        ("detect.au_detectors=[]", "detect.au_detectors"),
        ("checks.realism=1.5", "checks.realism"),
        ("detect.threshold=0.5", "detect.threshold: unknown key; allowed here: au_detectors, batch_size"),
        ("build.seed", "expected KEY=VALUE"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override, must_contain):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    assert must_contain in msg


def test_bad_yaml_file(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("build: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(y)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_error_in_one_line(run_factory):
    p = run_factory("build", "--dry-run", "--set", "build.max_oversample=0.5")
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "build.max_oversample" in lines[0] and "greater than or equal to 1" in lines[0]


def test_build_json_frozen_and_resume_refuses_other_config(tmp_path):
    out = str(tmp_path / "out")
    cfg = load_config(None, ["build.target=10", "build.shard_size=5"])
    _, rec = prepare_output(cfg, out)
    on_disk = json.loads((tmp_path / "out" / "build.json").read_text())
    assert on_disk["build_id"] == rec["build_id"] == cfg.identity_hash()
    assert FactoryConfig.model_validate(on_disk["config"]) == cfg

    # runtime changes do not change the build
    same = load_config(None, ["build.target=10", "build.shard_size=5", "runtime.num_generators=3"])
    _, rec2 = prepare_output(same, out)
    assert rec2["build_id"] == rec["build_id"]
    # nor do the keys that only decide when a shard gives up
    budget = load_config(
        None, ["build.target=10", "build.shard_size=5", "build.max_oversample=9", "build.shard_retries=0"]
    )
    assert prepare_output(budget, out)[1]["build_id"] == rec["build_id"]

    other = load_config(None, ["build.target=10", "build.shard_size=5", "build.seed=9"])
    with pytest.raises(BuildConfigMismatch) as e:
        prepare_output(other, out)
    assert '-    "seed": 0' in str(e.value) and '+    "seed": 9' in str(e.value)

    (tmp_path / "out" / "shards" / "mifa-000000.tar").write_bytes(b"old")
    _, rec3 = prepare_output(other, out, new_build=True)
    assert rec3["build_id"] == other.identity_hash() != rec["build_id"]
    assert not (tmp_path / "out" / "shards" / "mifa-000000.tar").exists()


def test_an_unreadable_build_json_is_refused_unless_new_build_deletes_it(tmp_path):
    out = tmp_path / "out"
    cfg = load_config(None, ["build.target=10", "build.shard_size=5"])
    prepare_output(cfg, str(out))
    (out / "shards" / "mifa-000000.tar").write_bytes(b"old")
    for text in ("{", "[1, 2]", '{"build_id": "x"}'):
        (out / "build.json").write_text(text)
        with pytest.raises(ConfigError, match="build.json is unreadable.*--new-build"):
            prepare_output(cfg, str(out))
        assert (out / "shards" / "mifa-000000.tar").exists()
    _, rec = prepare_output(cfg, str(out), new_build=True)
    assert rec["build_id"] == cfg.identity_hash() == json.loads((out / "build.json").read_text())["build_id"]
    assert not (out / "shards" / "mifa-000000.tar").exists()


def test_a_corrupt_build_json_stops_every_command_in_one_line_and_a_restored_one_resumes(shared_ray, tmp_path):
    """build, resume, verify and report on an OUT whose build.json is cut short: exit 2, one line
    naming the file and both fixes, nothing touched; with the file restored the resume completes."""
    from conftest import FAST, SMALL_RAY, factory

    out = tmp_path / "out"
    args = ["--target", "10", "--shard-size", "10", "--out", str(out), *FAST]
    prepare_output(load_config(None, ["generator=puppet", "build.target=10", "build.shard_size=10"]), str(out))
    good = (out / "build.json").read_bytes()
    (out / "build.json").write_bytes(good[: len(good) // 2])  # a copy that stopped half-way
    for command in (["build", *args], ["resume", str(out)], ["verify", str(out)], ["report", str(out)]):
        p = factory(*command)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and "Traceback" not in p.stderr, (command, p.stderr[-2000:])
        assert last.startswith(f"{out}/build.json is unreadable or not a factory build record (JSONDecodeError: "), last
        assert last.endswith(f"restore it from the run that made OUT, or start over with `factory build --out {out} "
                             "--new-build` and its config"), last  # fmt: skip
    assert not list((out / "shards").iterdir())

    (out / "build.json").write_bytes(good)
    p = factory("resume", str(out), *SMALL_RAY, env=shared_ray)
    assert p.returncode == 0 and (out / "shards" / "mifa-000000.stats.json").exists(), p.stderr[-2000:]


def test_a_resume_may_change_exactly_what_the_build_identity_leaves_out():
    """One list decides both: every key `resumable` accepts is absent from identity_dict, every other
    key of the config is in it."""
    from factory.config import resumable

    def keys(tree: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k}
        return out

    # keys added later leave the identity at their default (see the test below), so set them here
    speed = {"attention": "eager", "channels_last": True, "compile": True, "cache": "pab", "cache_skip": 3}
    cfg = FactoryConfig.model_validate(
        {
            "build": {"image_size": 128},
            "identities": {"source": "pool", "pool": "/p"},
            "maugen": speed,
            "checks": {"training_similarity": 0.8},
        }
    )
    everything, identity = keys(cfg.model_dump(mode="json")), keys(cfg.identity_dict())
    assert {k for k in everything if resumable(k)} == everything - identity
    assert {"runtime.num_generators", "build.max_oversample", "build.shard_retries"} <= everything - identity
    # when a build gives up on its LLM endpoint is no part of what it writes: ids made before the key stay
    assert "expand.max_fallback_share" in everything - identity
    lenient = FactoryConfig.model_validate({"expand": {"max_fallback_share": 0.9}})
    assert lenient.identity_hash() == FactoryConfig().identity_hash()
    assert not resumable("build.seed") and not resumable("runtimes.x") and not resumable("build.max_oversampled")


def test_a_build_json_from_before_a_runtime_key_was_renamed_still_loads():
    from factory.config import config_from_dict

    old = config_from_dict({"runtime": {"shard_task_cpus": 0.5}})  # shard tasks became shard worker actors
    assert old.runtime.shard_worker_cpus == 0.5 and "shard_task_cpus" not in old.model_dump()["runtime"]
    assert load_config(None, ["runtime.shard_worker_cpus=0.3"]).runtime.shard_worker_cpus == 0.3


def test_detector_threads_follow_the_actor_cpu_share():
    """0 (the default) gives ONNX Runtime the CPUs the detector actor reserves, never fewer than 1;
    a set value wins."""
    assert load_config(None, []).runtime.detector_threads_used == 1  # detector_cpus 0.5
    assert load_config(None, ["runtime.detector_cpus=2"]).runtime.detector_threads_used == 2
    assert load_config(None, ["runtime.detector_cpus=0.25"]).runtime.detector_threads_used == 1
    assert load_config(None, ["runtime.detector_threads=3"]).runtime.detector_threads_used == 3


def test_keys_added_later_leave_the_build_id_alone_at_their_default():
    """A build made before `identities`, `build.image_size` and `checks.training_similarity` existed keeps
    its id (and resumes)."""
    from factory.config import ADDED_LATER

    cfg = FactoryConfig()
    assert cfg.identities.model_dump(mode="json") == ADDED_LATER["identities"]
    assert cfg.build.image_size is ADDED_LATER["build.image_size"]
    ident = cfg.identity_dict()
    assert "identities" not in ident and "image_size" not in ident["build"]
    pool = FactoryConfig.model_validate({"identities": {"source": "pool", "pool": "/photos"}})
    assert pool.identity_dict()["identities"]["pool"] == "/photos" and pool.identity_hash() != cfg.identity_hash()
    sized = FactoryConfig.model_validate({"build": {"image_size": 512}})
    assert sized.identity_dict()["build"]["image_size"] == 512 and sized.identity_hash() != cfg.identity_hash()
    # the generator's throughput switches (issue 23): at their defaults builds made before them keep their id
    speed = {k.split(".", 1)[1]: v for k, v in ADDED_LATER.items() if k.startswith("maugen.")}
    assert set(speed) == {"attention", "channels_last", "compile", "cache", "cache_skip"}
    assert {k: getattr(cfg.maugen, k) for k in speed} == speed and not set(speed) & set(ident["maugen"])
    for key, value in (("attention", "eager"), ("channels_last", True), ("compile", True), ("cache", "pab")):
        on = FactoryConfig.model_validate({"maugen": {key: value}})
        assert on.identity_dict()["maugen"][key] == value and on.identity_hash() != cfg.identity_hash()
    assert cfg.checks.training_similarity is ADDED_LATER["checks.training_similarity"]
    assert "training_similarity" not in ident["checks"]
    strict = FactoryConfig.model_validate({"checks": {"training_similarity": 0.6}})
    assert strict.identity_dict()["checks"]["training_similarity"] == 0.6
    assert strict.identity_hash() != cfg.identity_hash()


@pytest.mark.parametrize(
    "tree, must_contain",
    [
        ({"identities": {"source": "pool"}}, "needs identities.pool"),
        ({"generator": "puppet", "identities": {"source": "pool", "pool": "/p"}}, "a pool of photos needs generator=maugen"),
        ({"generator": "puppet", "build": {"image_size": 512}}, "renders at puppet.image_size=64"),
        ({"build": {"image_size": 100}}, "multiple of 8"),
    ],
)
def test_identity_and_size_config_errors(tree, must_contain):
    with pytest.raises(ConfigError) as e:
        config_from_dict(tree)
    assert must_contain in str(e.value) and "\n" not in str(e.value).strip()


def test_injected_spoils_are_recorded_and_a_resume_must_spoil_alike(tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    cfg = FactoryConfig.model_validate({"generator": "puppet"})
    monkeypatch.setenv("MIFA_INJECT", "blank:0.1")
    monkeypatch.setenv("MIFA_FAULTS", "write:1")
    _, rec = prepare_output(cfg, out)
    assert rec["faults"] == {"MIFA_INJECT": "blank:0.1", "MIFA_FAULTS": "write:1"}
    monkeypatch.delenv("MIFA_FAULTS")  # a fault only fails shards: a resume may drop it
    assert prepare_output(cfg, out)[1]["build_id"] == rec["build_id"]
    monkeypatch.delenv("MIFA_INJECT")
    with pytest.raises(BuildConfigMismatch, match=r"built with MIFA_INJECT=blank:0.1 .* this run has MIFA_INJECT=\(unset\)"):
        prepare_output(cfg, out)


def test_a_set_on_one_plan_weight_keeps_the_others_and_no_stays_a_word():
    cfg = load_config(None, ["plan.age_groups.child=0", "plan.emotions.neutral=2"])
    assert cfg.plan.age_groups == {"child": 0.0, "young_adult": 1.0, "adult": 1.0, "elderly": 1.0}
    assert cfg.plan.emotions["neutral"] == 2.0 and cfg.plan.emotions["happiness"] == 1.0
    assert load_config(None, ["detect.enabled=no"]).detect.enabled is False  # pydantic still reads no as false
    from pipelines.maugen.train import load_train_config

    assert load_train_config(None, ["mixed_precision=no"]).mixed_precision == "no"  # was YAML's False
