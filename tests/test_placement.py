"""GPU placement (issue 7): generator counts from the cluster's resources or the config, GPU and
CPU demands checked before any actor starts, and the GPUs each actor got in its busy accounting.

The cluster GPUs here are declared to Ray (`num_gpus=2` on this CPU machine): Ray schedules and
assigns them like real ones, which is all placement needs; the puppet generator and the CPU ONNX
providers never touch a device.
"""

from __future__ import annotations

import pytest

from factory.config import ConfigError, load_config
from factory.sizing import generator_count
from factory.graph import run_build

GPU_CLUSTER = {"CPU": 128.0, "GPU": 16.0}


def test_generator_count_from_cluster_gpus_or_cpus():
    gpu = ["runtime.num_generators=auto", "runtime.generator_gpus=1", "runtime.num_detectors=4",
           "runtime.detector_gpus=0.25"]  # fmt: skip
    assert generator_count(load_config(None, gpu), GPU_CLUSTER) == 15  # 16 - 4 x 0.25, whole GPUs
    assert generator_count(load_config(None, [*gpu, "detect.enabled=false"]), GPU_CLUSTER) == 16
    assert generator_count(load_config(None, [*gpu, "runtime.generator_gpus=0.5"]), GPU_CLUSTER) == 30
    # the default, generator_gpus=auto, is 1 GPU per generator on a cluster with GPUs
    assert generator_count(load_config(None, gpu[2:]), GPU_CLUSTER) == 15
    # on CPUs with a number for generator_cpus: (CPUs - detectors) / (generator + its 2 shard workers) = (8 - 0.5) / 1.5
    assert generator_count(load_config(None, ["runtime.generator_cpus=1"]), {"CPU": 8.0}) == 5
    assert generator_count(load_config(None, ["runtime.num_generators=3"]), {"CPU": 1.0}) == 3  # as set
    with pytest.raises(ConfigError, match=r"num_generators=auto.*0 GPUs.*generator_gpus"):
        generator_count(load_config(None, gpu), {"CPU": 8.0})


def test_num_generators_rejects_other_words():
    for bad in ("all", "0", "1.5"):
        with pytest.raises(ConfigError, match=r"^config error: runtime.num_generators: give a whole number >= 1, or auto"):
            load_config(None, [f"runtime.num_generators={bad}"])


SMALL = ["generator=puppet", "build.target=40", "build.shard_size=20", "runtime.progress=false",
         "runtime.generator_cpus=0.5", "runtime.detector_cpus=0.25", "runtime.shard_worker_cpus=0.1"]  # fmt: skip


@pytest.fixture
def two_gpu_ray():
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=2, object_store_memory=100 * 1024 * 1024,
             include_dashboard=False, logging_level="WARNING")  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


def test_generators_get_whole_gpus_and_detectors_a_share(two_gpu_ray, tmp_path):
    """auto on 2 GPUs with one detector on half a GPU: 1 generator (1.5 GPUs left, whole ones only);
    each actor reports the GPU Ray gave it."""
    cfg = load_config(None, [*SMALL, "runtime.num_generators=auto", "runtime.generator_gpus=1",
                             "runtime.detector_gpus=0.5"])  # fmt: skip
    summary = run_build(cfg, str(tmp_path / "out"))
    assert summary.ok and summary.accepted == 40
    assert len(summary.generators) == 1 and len(summary.detectors) == 1
    (g,), (d,) = summary.generators, summary.detectors
    assert len(g.gpu_ids) == 1 and len(d.gpu_ids) == 1, (g, d)
    assert g.gpu_ids != d.gpu_ids  # the generator holds its GPU whole: the detector's share is on the other
    assert f"GPU {g.gpu_ids[0]})" in g.describe()


def test_more_gpus_asked_than_the_cluster_has_stops_before_any_actor(two_gpu_ray, tmp_path):
    cfg = load_config(None, [*SMALL, "runtime.num_generators=2", "runtime.generator_gpus=1",
                             "runtime.detector_gpus=0.5"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"2 generators x 1 GPU.*need 2.5 GPUs.*has 2"):
        run_build(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "shards").exists() or not list((tmp_path / "out" / "shards").iterdir())
