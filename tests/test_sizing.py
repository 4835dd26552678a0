"""Runtime sizing (issue 23): `auto` fills the cores of a CPU machine with single-threaded generators and
gives each GPU one generator; a number in the config wins; every actor fits the cluster; and no
sizing changes what a build writes (tests/test_corpus_digest.py builds under the default sizing
against a digest made with one generator)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from factory.config import ConfigError, load_config
from factory.sizing import Sizing, check_resources, size_runtime


def sized(resources: dict[str, float], *sets: str) -> Sizing:
    cfg = load_config(None, list(sets))
    s = size_runtime(cfg, resources)
    check_resources(cfg, s, resources)
    return s


def reserved(s: Sizing) -> float:
    return s.generators * s.generator_cpus + s.detectors * s.detector_cpus + s.shard_workers * s.shard_worker_cpus


@pytest.mark.parametrize("cpus, generators, share", [(2, 2, 0.25), (3, 3, 0.333), (8, 8, 0.437), (64, 64, 0.492)])
def test_auto_on_cpus_is_one_single_threaded_generator_per_core(cpus, generators, share):
    s = sized({"CPU": float(cpus)})
    assert (s.generators, s.generator_cpus, s.generator_gpus) == (generators, share, 0.0)
    assert (s.detectors, s.detector_cpus, s.shard_workers, s.shard_worker_cpus) == (1, 0.5, 2 * generators, 0.25)
    assert cpus - 0.001 * generators <= reserved(s) <= cpus  # the generators reserve what the others leave


def test_auto_on_cpus_starts_fewer_generators_when_their_share_would_vanish_and_says_so_on_one_core():
    # 4 shard workers x 0.45 + the detector leave nothing for 2 generators on 2 CPUs: one, with 0.6
    s = sized({"CPU": 2.0}, "runtime.shard_worker_cpus=0.45")
    assert (s.generators, s.generator_cpus, s.shard_workers) == (1, 0.6, 2)
    s = sized({"CPU": 2.0}, "detect.enabled=false")  # no detector: its half CPU goes to the generators
    assert (s.generators, s.generator_cpus, s.detectors) == (2, 0.5, 0)
    with pytest.raises(ConfigError, match=r"^config error: runtime.num_generators=auto: .* 1 CPUs .*runtime.detector_cpus"):
        sized({"CPU": 1.0})
    assert sized({"CPU": 1.0}, "runtime.detector_cpus=0.2", "runtime.shard_worker_cpus=0.1").generator_cpus == 0.6


def test_gpus_give_each_generator_a_whole_gpu_and_a_cpu():
    s = sized({"CPU": 16.0, "GPU": 1.0})  # a local build on a GPU machine
    assert (s.generators, s.generator_gpus, s.generator_cpus, s.shard_workers) == (1, 1.0, 1.0, 2)
    cluster = {"CPU": 128.0, "GPU": 16.0}
    s = sized(cluster, "runtime.num_detectors=4", "runtime.detector_gpus=0.25")
    assert (s.generators, s.generator_gpus, s.detectors) == (15, 1.0, 4)  # 16 - 4 x 0.25, whole GPUs
    # a generator that does not compute on a GPU reserves none, and fills the cores instead
    s = sized({"CPU": 16.0, "GPU": 1.0}, "maugen.device=cpu")
    assert (s.generators, s.generator_gpus) == (16, 0.0)


def test_a_generator_cheaper_than_its_detection_gets_one_actor_of_at_most_a_cpu():
    """The puppet renderer is busy about 1 % of a build (detection is the costly stage): more of it
    would only be more processes to start."""
    for cpus, share in ((2.0, 1.0), (16.0, 1.0), (1.5, 0.5)):
        s = sized({"CPU": cpus, "GPU": 1.0}, "generator=puppet")
        assert (s.generators, s.generator_cpus, s.generator_gpus, s.shard_workers) == (1, share, 0.0, 2), cpus
    assert sized({"CPU": 16.0}, "generator=puppet", "runtime.num_generators=4").generators == 4  # a number wins


def test_a_number_wins_over_auto_and_what_does_not_fit_is_one_line():
    s = sized({"CPU": 2.0}, "runtime.num_generators=1")  # the sizing before auto: one generator, one core
    assert (s.generators, s.generator_cpus, s.shard_workers) == (1, 1.0, 2)
    assert sized({"CPU": 8.0}, "runtime.num_generators=1").generator_cpus == 7.0  # all the detector leaves
    s = sized({"CPU": 2.0}, "runtime.num_generators=2", "runtime.generator_cpus=0.6", "runtime.detector_cpus=0.3",
              "runtime.shard_worker_cpus=0.1")  # fmt: skip
    assert (s.generators, s.generator_cpus) == (2, 0.6)
    assert sized({"CPU": 4.0}, "runtime.max_shards_in_flight=3").shard_workers == 3
    assert sized({"CPU": 128.0, "GPU": 16.0}, "runtime.generator_gpus=0.5", "runtime.num_generators=3").generators == 3
    with pytest.raises(ConfigError, match=r"^config error: runtime: 4 generators, .*do not fit.*runtime.num_generators"):
        sized({"CPU": 2.0}, "runtime.num_generators=4")
    with pytest.raises(ConfigError, match=r"^config error: runtime: the actors reserve 2.5 CPUs"):
        sized({"CPU": 2.0}, "runtime.num_generators=2", "runtime.generator_cpus=1")
    with pytest.raises(ConfigError, match=r"^config error: runtime.num_generators=auto: .* 0 GPUs"):
        sized({"CPU": 8.0}, "runtime.generator_gpus=1")


def test_bad_sizing_values_are_one_line_naming_the_key():
    for key, bad in (("num_generators", "many"), ("generator_cpus", "0"), ("generator_gpus", "-1")):
        with pytest.raises(ConfigError, match=rf"^config error: runtime.{key}: give a .* or auto"):
            load_config(None, [f"runtime.{key}={bad}"])


def test_sizing_is_not_part_of_the_build_identity():
    a = load_config(None, [])
    b = load_config(None, ["runtime.num_generators=3", "runtime.generator_cpus=0.5", "runtime.generator_gpus=0"])
    assert a.identity_hash() == b.identity_hash()


def test_a_generator_actor_computes_with_the_torch_threads_it_is_given():
    """The build hands every generator actor sizing.GENERATOR_THREADS (1): more would change MAUGen's
    bytes (factory/sizing.py). tests/test_maugen_default.py checks it in a build where Ray would give more."""
    import torch

    from factory.actors import GeneratorActor
    from factory.sizing import GENERATOR_THREADS

    assert GENERATOR_THREADS == 1
    before = torch.get_num_threads()
    n = 2 if before == 1 else 1  # other than this process had
    try:
        assert GeneratorActor(load_config(None, []).model_dump(mode="json"), threads=n).threads() == n
    finally:
        torch.set_num_threads(before)


def test_a_puppet_generator_actor_imports_neither_torch_nor_diffusers():
    """It renders in numpy: an actor that imported torch and diffusers would start seconds slower."""
    code = (
        "import sys; from factory.actors import GeneratorActor; from factory.config import load_config; "
        "a = GeneratorActor(load_config(None, ['generator=puppet']).model_dump(mode='json'), threads=1); "
        "assert a.generator is not None and a.threads() == 1; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
