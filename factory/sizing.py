"""How many actors a build runs and what each reserves: the runtime config's numbers, and `auto` sized
from the Ray cluster's CPUs and GPUs.

The rule (`size_runtime`), a pure function of the config and the cluster's resources:

- generator_gpus=auto: 1 GPU per generator when the cluster has a whole GPU and the generator uses
  one (generator=maugen, maugen.device not cpu), else 0;
- num_generators=auto, generators on GPUs: the whole GPUs left beside the detectors' shares, one
  generator each (as before `auto` covered CPUs);
- num_generators=auto, generators on CPUs with generator_cpus=auto: one generator per core when
  generating is the costly stage (`fills_cores`: MAUGen, busy 95 % of a one-generator build while
  its shards spent 98 % of their time in generate), so the cores go to generators and the detector
  and the shard workers run in the gaps; one generator for a generator that costs less than its
  detection (the puppet renderer: busy 1 %; more of them would only be more processes);
- generator_cpus=auto: 1 CPU beside a GPU; on CPUs, an even share of what the detectors and the
  shard workers leave, so that every actor fits and the generators together reserve the rest (at
  most 1 CPU for a generator that does not fill cores: it computes on one thread).

A number in the config always wins. Every generator runs ONE torch intra-op thread, whatever CPU
share it reserves (GENERATOR_THREADS): a core more goes to one generator more, never to a thread
more, because the thread count changes MAUGen's bytes (its reductions split differently: 4 pixel
values of 3 samples differed between 1 and 2 threads), and a runtime key must not change what a
shard holds. The number of generators cannot: a candidate's seed comes from its shard and its place
there, and a generator draws each sample's noise from that seed (factory/generators.py), so a
shard's bytes do not depend on which generator ran it, nor on how many ran.

Sizing counts the cluster's total CPUs: on a CPU-only cluster of several hosts, set the numbers
(per-host packing of fractional shares is Ray's, and a share that fits no host waits).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from .config import AUTO, ConfigError, FactoryConfig
from .generators import generator_class

log = logging.getLogger(__name__)

#: Shard workers per generator when runtime.max_shards_in_flight is unset: one fills its next round
#: while the other waits on the generator, so the generator never waits on a shard's other stages.
WORKERS_PER_GENERATOR = 2

#: The smallest CPU share auto gives a generator: below it, auto starts one generator fewer.
MIN_GENERATOR_CPUS = 0.05

#: torch intra-op threads of every generator actor (module docstring: more change MAUGen's bytes).
GENERATOR_THREADS = 1

_EPS = 1e-9


@dataclass(frozen=True)
class Sizing:
    """The actors of one build and what each asks Ray for (every `auto` resolved)."""

    generators: int
    generator_cpus: float
    generator_gpus: float
    detectors: int  # 0 with detect off
    detector_cpus: float
    detector_gpus: float
    shard_workers: int
    shard_worker_cpus: float

    def describe(self) -> str:
        """One log line: what runs and what it reserves."""

        def n(count: int, what: str) -> str:
            return f"{count} {what}{'' if count == 1 else 's'}"

        gpu = f" + {self.generator_gpus:g} GPU" if self.generator_gpus else ""
        det_gpu = f" + {self.detector_gpus:g} GPU" if self.detector_gpus else ""
        return (
            f"{n(self.generators, 'generator actor')} x {self.generator_cpus:g} CPU{gpu} ({GENERATOR_THREADS} torch "
            f"thread each), {n(self.detectors, 'detector actor')} x {self.detector_cpus:g} CPU{det_gpu}, "
            f"{n(self.shard_workers, 'shard worker')} x {self.shard_worker_cpus:g} CPU"
        )


def detectors_ask(cfg: FactoryConfig) -> tuple[float, float]:
    """(CPUs, GPUs) the detector actors hold for the whole build (none with detect off)."""
    rt = cfg.runtime
    if not cfg.detect.enabled:
        return 0.0, 0.0
    return rt.num_detectors * rt.detector_cpus, rt.num_detectors * rt.detector_gpus


def uses_gpu(cfg: FactoryConfig) -> bool:
    """Whether the configured generator computes on a GPU when it is given one."""
    return cfg.generator == "maugen" and cfg.maugen.device != "cpu"


def generator_gpus(cfg: FactoryConfig, resources: dict[str, float]) -> float:
    """runtime.generator_gpus, or for auto: 1 on a cluster with a GPU for a generator that uses it, else 0."""
    g = cfg.runtime.generator_gpus
    if g != AUTO:
        return float(g)
    return 1.0 if resources.get("GPU", 0.0) >= 1.0 - _EPS and uses_gpu(cfg) else 0.0


def shard_workers(cfg: FactoryConfig, generators: int) -> int:
    return cfg.runtime.max_shards_in_flight or WORKERS_PER_GENERATOR * generators


def _cpu_share(cfg: FactoryConfig, generators: int, cpus: float) -> float:
    """Each generator's even share of the CPUs the detectors and shard workers leave (rounded down to
    1/1000, well above Ray's resource precision, so that the sum never exceeds the cluster)."""
    det_cpus, _ = detectors_ask(cfg)
    left = cpus - det_cpus - shard_workers(cfg, generators) * cfg.runtime.shard_worker_cpus
    return math.floor(left / generators * 1000 + _EPS) / 1000


def generator_count(cfg: FactoryConfig, resources: dict[str, float]) -> int:
    """runtime.num_generators, or for `auto` as many generators as the cluster holds (module docstring)."""
    rt = cfg.runtime
    if rt.num_generators != AUTO:
        return int(rt.num_generators)
    det_cpus, det_gpus = detectors_ask(cfg)
    cpus = resources.get("CPU", 0.0)
    gpus_each = generator_gpus(cfg, resources)
    if gpus_each > 0:
        kind, left, per = "GPU", resources.get("GPU", 0.0) - det_gpus, gpus_each
        fix = "runtime.generator_gpus / runtime.detector_gpus"
    elif rt.generator_cpus != AUTO:
        kind, left, per = "CPU", cpus - det_cpus, rt.generator_cpus + WORKERS_PER_GENERATOR * rt.shard_worker_cpus
        fix = "runtime.generator_cpus"
    else:  # one generator per core (a costly one), each with a share of what the others leave
        n = int(cpus + _EPS) if generator_class(cfg).fills_cores else 1
        while n > 1 and _cpu_share(cfg, n, cpus) < MIN_GENERATOR_CPUS:
            n -= 1
        if n >= 1 and _cpu_share(cfg, n, cpus) >= MIN_GENERATOR_CPUS:
            return n
        workers = shard_workers(cfg, 1) * rt.shard_worker_cpus
        raise ConfigError(
            f"config error: runtime.num_generators=auto: the Ray cluster has {cpus:g} CPUs and the detectors "
            f"({det_cpus:g}) and shard workers ({workers:g}) leave less than {MIN_GENERATOR_CPUS:g} for a generator; "
            "lower runtime.detector_cpus / runtime.shard_worker_cpus, or add CPUs (runtime.num_cpus)"
        )
    n = int(left / per + _EPS)
    if n < 1:
        raise ConfigError(
            f"config error: runtime.num_generators=auto: the Ray cluster has {resources.get(kind, 0.0):g} {kind}s, "
            f"{max(left, 0.0):g} left beside the detectors, and a generator needs {per:g}; add {kind}s or lower {fix}"
        )
    return n


def size_runtime(cfg: FactoryConfig, resources: dict[str, float]) -> Sizing:
    """Every `auto` of runtime resolved against the cluster's resources ({"CPU": n, "GPU": m})."""
    rt = cfg.runtime
    n = generator_count(cfg, resources)
    gpus = generator_gpus(cfg, resources)
    if rt.generator_cpus != AUTO:
        cpus = float(rt.generator_cpus)
    elif gpus > 0:
        cpus = 1.0
    else:
        cpus = _cpu_share(cfg, n, resources.get("CPU", 0.0))
        if not generator_class(cfg).fills_cores:
            cpus = min(cpus, 1.0)
        if cpus < MIN_GENERATOR_CPUS:  # only with a number for num_generators or max_shards_in_flight
            raise ConfigError(
                f"config error: runtime: {n} generators, the detectors and {shard_workers(cfg, n)} shard workers do "
                f"not fit the Ray cluster's {resources.get('CPU', 0.0):g} CPUs; lower runtime.num_generators (or set "
                "it to auto) / runtime.max_shards_in_flight / runtime.detector_cpus / runtime.shard_worker_cpus, "
                "or add CPUs"
            )
    if gpus == 0 and resources.get("GPU", 0.0) >= 1.0 and uses_gpu(cfg):
        log.warning(
            "runtime.generator_gpus=0 on a cluster with GPUs: the %d generator actors reserve none, yet MAUGen "
            "(maugen.device=%s) uses any GPU it sees; set runtime.generator_gpus=auto or maugen.device=cpu",
            n,
            cfg.maugen.device,
        )
    return Sizing(
        generators=n,
        generator_cpus=cpus,
        generator_gpus=gpus,
        detectors=rt.num_detectors if cfg.detect.enabled else 0,
        detector_cpus=rt.detector_cpus,
        detector_gpus=rt.detector_gpus,
        shard_workers=shard_workers(cfg, n),
        shard_worker_cpus=rt.shard_worker_cpus,
    )


def check_resources(cfg: FactoryConfig, sizing: Sizing, resources: dict[str, float]) -> None:
    """Actors hold their CPUs and GPUs for the whole build: ones that do not fit wait forever, and
    actors that leave no CPU for a shard worker run nothing."""
    rt = cfg.runtime
    det_cpus, det_gpus = detectors_ask(cfg)
    total = float(resources.get("CPU", 0.0))
    actors = sizing.generators * sizing.generator_cpus + det_cpus
    gpus = sizing.generators * sizing.generator_gpus + det_gpus
    if actors + rt.shard_worker_cpus > total + _EPS:
        raise ConfigError(
            f"config error: runtime: the actors reserve {actors:g} CPUs and a shard worker {rt.shard_worker_cpus:g}, "
            f"but the Ray cluster has {total:g}; lower runtime.generator_cpus / runtime.num_generators (or set them to auto) / "
            "runtime.detector_cpus / runtime.num_detectors, or add CPUs"
        )
    have = float(resources.get("GPU", 0.0))
    if gpus > have + _EPS:
        raise ConfigError(
            f"config error: runtime: {sizing.generators} generators x {sizing.generator_gpus:g} GPU and the detectors' "
            f"shares need {gpus:g} GPUs, but the Ray cluster has {have:g}; lower runtime.num_generators (or set it "
            "to auto) / runtime.generator_gpus / runtime.detector_gpus, or add GPU nodes"
        )
