"""One shard from candidates to committed files: draw -> expand -> exemplars -> generate -> detect -> checks -> write.

This is the body of a small, idempotent shard task: given the same config and shard index it
writes the same bytes, so a retry or a resume after a crash simply runs it again. Each round
draws candidate specs from the shard's own seeded stream (factory/sampler.py), carries them as
Candidate records (factory/candidate.py) through the stage functions (`Stages`; factory/faults.py
wraps them for chaos tests), judges them with the build's ordered checks (factory/checks.py) and
writes the kept ones; `ShardLedger` keeps the shard's counts for its stats marker.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from core.facs import NUM_AUS
from pipelines.prompts import make_expander
from pipelines.prompts.types import ExpansionRequest

from . import faults
from .candidate import ACCEPTED, Candidate, SampleDetection
from .checks import FUNNEL, OVER_QUOTA, REASONS, first_failure
from .config import FactoryConfig
from .generators import GenerationBatch, GenerationResult, prompt_budget, validate_result
from .identities import identity_source
from .layout import Layout
from .plan import GRID, Plan, ShardSpec
from .sample_meta import accepted_sample, rejected_sample
from .sampler import ShardSampler
from .writer import ShardWriter

if TYPE_CHECKING:
    from detectors.panel import Detection
    from pipelines.prompts.types import Expansion, ExpandStats

log = logging.getLogger(__name__)

#: Keys of rejected samples kept per reason in the stats (examples for reports and tests).
REJECTED_EXAMPLES = 200

GenerateFn = Callable[[GenerationBatch], GenerationResult]
DetectFn = Callable[[np.ndarray], "Detection"]


@dataclass
class Stages:
    """The stage functions of one shard, one per name in faults.STAGES (detect: None when off)."""

    expand: Callable[[list[ExpansionRequest]], tuple[list[Expansion], ExpandStats]]
    exemplars: Callable[[list[Candidate]], None] | None  # None: the generator needs none
    generate: GenerateFn
    detect: DetectFn | None
    checks: Callable[[list[Candidate]], None]
    write: Callable[[list[Candidate]], None]


def run_shard(
    cfg: FactoryConfig,
    index: int,
    out: str,
    generate: GenerateFn,
    build_id: str,
    attempt: int = 1,
    generator_info: dict[str, str] | None = None,
    detect: DetectFn | None = None,
    node: dict[str, str] | None = None,
    on_round: Callable[[int, int, dict[str, Any]], None] | None = None,
    submitted: float | None = None,
) -> dict[str, Any]:
    """Fill, write and commit shard `index`; returns its stats (the commit marker's content).

    `node` (Ray's node id and IP, and the shard worker's actor id, when run on Ray) goes into the
    stats next to the hostname: several Ray nodes may share one hostname (containers, network
    namespaces). `on_round(accepted, candidates, expand)` hears the counts so far after every round
    (expand: the expander's stats as JSON), for the driver's progress and its fallback rule while a
    long shard is still filling. `submitted`: when the driver handed the shard out (epoch seconds), kept
    in the stats' timings beside its start and end, so that scheduling latency can be read from them.
    """
    t0 = time.time()
    if cfg.detect.enabled and detect is None:
        raise ValueError("detect.enabled is true but no detect stage was given to run_shard")
    layout = Layout(out)
    spec = Plan(cfg).shard(index)
    info = generator_info or {}
    gen_tag = f"{info.get('name', cfg.generator)}@{info.get('version', '?')}"
    size = int(info.get("image_size", cfg.puppet.image_size))
    sampler = ShardSampler(spec, cfg, size)
    expander = make_expander(cfg.expand, cache_dir=layout.cache_dir, budget=prompt_budget(cfg))
    writer = ShardWriter(layout, spec.name, cfg.build.image_format, cfg.build.jpg_quality)
    try:
        ledger = ShardLedger(cfg, spec, writer, gen_tag, build_id)
        exemplars = ledger.exemplar_reader(size) if info.get("needs_exemplars", cfg.generator != "puppet") else None
        stages = faults.wrap(
            Stages(expander.expand_batch, exemplars, generate, detect, ledger.judge, ledger.write),
            index,
            ledger.injected,
        )
        while not sampler.done:
            specs = sampler.draw()
            if not specs:
                break
            cands = [Candidate(s) for s in specs]
            _run_round(cands, stages, cfg, ledger, size)
            passed = np.array([c.fate is None for c in cands], dtype=bool)
            keep = sampler.record(specs, passed)
            for c, ok, kept in zip(cands, passed, keep):
                if kept:
                    c.fate = ACCEPTED
                elif ok:
                    c.fate = OVER_QUOTA
                    ledger.reject(c)
            with ledger.timed("write"):
                stages.write([c for c in cands if c.fate == ACCEPTED])
            if on_round is not None:
                expand = ledger.expand_stats.model_dump() if ledger.expand_stats is not None else {}
                on_round(ledger.accepted, sampler.drawn, expand)
        t = time.perf_counter()
        ledger.skipped_exemplars.update(sampler.skipped_exemplars)
        stats = ledger.stats(sampler, attempt, node)
        ledger.timings["write"] += time.perf_counter() - t
        stats["timings"] = {k: round(v, 4) for k, v in ledger.timings.items()} | {
            "start": round(t0, 3),
            "end": round(time.time(), 3),
        }
        if submitted is not None:
            stats["timings"]["submitted"] = round(submitted, 3)
        return writer.commit(stats)
    except BaseException:
        writer.abort()
        raise


def _run_round(cands: list[Candidate], stages: Stages, cfg: FactoryConfig, ledger: ShardLedger, size: int) -> None:
    """Expand, read exemplars, generate and detect one round's candidates and judge them; rejected
    ones get their fate."""
    with ledger.timed("expand"):
        expansions, st = stages.expand([_request(c) for c in cands])
    ledger.expand_stats = st if ledger.expand_stats is None else ledger.expand_stats + st
    with ledger.timed("checks"):
        for c, e in zip(cands, expansions):
            c.expansion = e
            if first_failure(c, cfg, after="expand") is not None:
                ledger.reject(c)
    todo = [c for c in cands if c.fate is None]
    if todo and stages.exemplars is not None:
        with ledger.timed("exemplars"):
            stages.exemplars(todo)
        for c in todo:
            if first_failure(c, cfg, after="exemplar") is not None:
                ledger.reject(c)
        todo = [c for c in todo if c.fate is None]
    if not todo:
        return
    with ledger.timed("generate"):
        batch = GenerationBatch(
            keys=[c.key for c in todo],
            seeds=np.array([c.spec.seed for c in todo], dtype=np.int64),
            prompts=[c.expansion.text for c in todo],
            target=np.stack([c.spec.intensity for c in todo]),
            identities=[c.spec.identity for c in todo],
            exemplars=np.stack([c.exemplar.image for c in todo]) if stages.exemplars is not None else None,
            masks=np.stack([c.exemplar.mask for c in todo]) if stages.exemplars is not None else None,
        )
        result = stages.generate(batch)
    valid = validate_result(result, batch, size)
    for j, c in enumerate(todo):
        c.image, c.intensity, c.occurrence_prob = result.images[j], result.intensity[j], result.occurrence_prob[j]
        c.valid = bool(valid[j])
        if not c.valid:
            log.warning("shard %s: %s has a NaN/inf or blank output; rejected", ledger.spec.name, c.key)
    if cfg.detect.enabled and valid.any():
        with ledger.timed("detect"):
            det = stages.detect(np.ascontiguousarray(result.images[valid]))
        rows = np.cumsum(valid) - 1  # batch position -> row of `det`
        for j in np.flatnonzero(valid):
            todo[j].detection = SampleDetection.of(det, int(rows[j]))
    with ledger.timed("checks"):
        stages.checks(todo)


def _request(c: Candidate) -> ExpansionRequest:
    s = c.spec
    return ExpansionRequest(emotion=s.emotion, strength=s.strength, intensity=tuple(int(x) for x in s.intensity), seed=s.seed)


class ShardLedger:
    """A shard's accounts: rejections by reason (and the first few kept whole), what was written, per-AU
    sums, plan cells filled, stage timings, expander counters and injected spoils; its stats marker."""

    def __init__(self, cfg: FactoryConfig, spec: ShardSpec, writer: ShardWriter, gen_tag: str, build_id: str):
        self.cfg, self.spec, self.writer, self.gen_tag, self.build_id = cfg, spec, writer, gen_tag, build_id
        self.thr = cfg.labels.occurrence_threshold
        self.rejected: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {r: [] for r in REASONS}
        self.kept_rejected: Counter[str] = Counter()
        self.timings: Counter[str] = Counter()
        self.expand_stats: ExpandStats | None = None
        self.per_au = {k: np.zeros(NUM_AUS) for k in ("target_occ", "target_int", "occ", "int")}
        self.cells_kept = np.zeros(GRID.size, dtype=np.int64)
        self.kept_by: dict[str, Counter[str]] = {k: Counter() for k in ("emotions", "skin_groups", "age_groups")}
        self.injected: dict[str, list[str]] = {}
        self.identities = identity_source(cfg)
        self.mask_sources: Counter[str] = Counter()
        self.skipped_exemplars: Counter[str] = Counter()  # why each unusable exemplar was passed over -> times

    @property
    def accepted(self) -> int:
        return int(self.cells_kept.sum())

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - t

    def reject(self, cand: Candidate) -> None:
        """Count a rejection under its fate; keep its key, and the first few whole, for inspection."""
        reason = cand.fate
        self.rejected[reason] += 1
        if len(self.examples[reason]) < REJECTED_EXAMPLES:
            self.examples[reason].append(cand.key)
        if self.kept_rejected[reason] < self.cfg.build.rejected_samples:
            self.kept_rejected[reason] += 1
            meta, image = rejected_sample(cand, self.thr, self.gen_tag, self.build_id)
            self.writer.keep_rejected(cand.key, meta, image)

    def exemplar_reader(self, size: int) -> Callable[[list[Candidate]], None]:
        """The exemplar stage: each candidate's exemplar and mask from the identity source, at `size`."""

        def read(cands: list[Candidate]) -> None:
            for c, ex in zip(cands, self.identities.exemplars([c.spec.identity for c in cands], size)):
                c.exemplar = ex
                if ex.error is not None:
                    self.skipped_exemplars[ex.error] += 1
                    log.warning("shard %s: %s: exemplar skipped (%s)", self.spec.name, c.key, ex.error)
                else:
                    self.mask_sources[ex.mask_source] += 1

        return read

    def judge(self, cands: list[Candidate]) -> None:
        """The checks that need the generated sample, in order; each rejection is counted."""
        for c in cands:
            if first_failure(c, self.cfg, after="detect") is not None:
                self.reject(c)

    def write(self, cands: list[Candidate]) -> None:
        for c in cands:
            meta, au, row = accepted_sample(c, self.thr, self.gen_tag, self.build_id)
            self.writer.write(c.key, c.image, meta, au, row)
            target = c.spec.intensity.astype(np.int64)
            self.per_au["target_occ"] += target >= self.thr
            self.per_au["target_int"] += target
            self.per_au["occ"] += c.occurrence
            self.per_au["int"] += c.intensity
            self.cells_kept[c.spec.cell] += 1
            ident = c.spec.identity
            self.kept_by["emotions"][c.spec.emotion] += 1
            self.kept_by["skin_groups"][_group(ident.skin_group)] += 1
            self.kept_by["age_groups"][_group(ident.age_group)] += 1

    def stats(self, sampler: ShardSampler, attempt: int, node: dict[str, str] | None) -> dict[str, Any]:
        """The stats marker's content, less the timings; a shard that kept other than its size is an error."""
        spec = self.spec
        stats = {
            "name": spec.name,
            "index": spec.index,
            "build_id": self.build_id,
            "size": spec.size,
            "candidates": sampler.drawn,
            "rejected": {r: int(self.rejected[r]) for r in REASONS},
            "rejected_examples": {r: v for r, v in self.examples.items() if v},
            "funnel": _funnel(sampler.drawn, self.rejected, int(sampler.passed.sum()), self.accepted),
            "per_au": {k: v.tolist() for k, v in self.per_au.items()},
            **{dim: self._kept(dim, names) for dim, names in _AXES.items()},
            "planned": {
                "emotions": _counts(GRID.emotion_of, GRID.emotions, spec.quotas),
                "skin_groups": _counts(GRID.skin_of, range(GRID.skin_groups), spec.quotas),
                "age_groups": _counts(GRID.age_of, GRID.age_groups, spec.quotas),
            },
            "expand": self.expand_stats.model_dump() if self.expand_stats is not None else {},
            "generator": self.gen_tag,
            "detect": {"enabled": self.cfg.detect.enabled, "min_agree": self.cfg.detect.min_agree},
            "node": socket.gethostname(),
            **(node or {}),
            "attempt": attempt,
        }
        if self.injected:
            stats["injected"] = self.injected
        if self.identities.kind != "puppet":
            stats["identities"] = {
                "source": self.identities.kind,
                "unbalanced_axes": self.identities.unbalanced_axes(),
                "mask_sources": dict(sorted(self.mask_sources.items())),
                "skipped_exemplars": _skipped(self.skipped_exemplars),
            }
        if self.accepted != spec.size:
            raise RuntimeError(f"shard {spec.name} kept {self.accepted} samples, planned {spec.size}")
        return stats


    def _kept(self, dim: str, names: Any) -> dict[str, int]:
        """Accepted samples per group of one plan axis, by each sample's own identity (a pool entry
        without that attribute counts as `unknown`)."""
        counts = self.kept_by[dim]
        out = {str(n): int(counts[str(n)]) for n in names}
        if counts["unknown"]:
            out["unknown"] = int(counts["unknown"])
        return out


_AXES: dict[str, Any] = {"emotions": GRID.emotions, "skin_groups": range(GRID.skin_groups), "age_groups": GRID.age_groups}


def _skipped(errors: Counter[str]) -> dict[str, dict[str, Any]]:
    """{exemplar name: {why, times}} of the pool exemplars passed over (errors read "NAME: why")."""
    out: dict[str, dict[str, Any]] = {}
    for err, n in errors.most_common(REJECTED_EXAMPLES):
        name, _, why = err.partition(": ")
        out[name] = {"why": why, "times": int(n)}
    return out


def _group(value: Any) -> str:
    return "unknown" if value is None else str(value)


def _funnel(drawn: int, rejected: Counter[str], passed: int, accepted: int) -> dict[str, int]:
    """Samples left after each stage, in graph order (each check removes its rejections)."""
    out = {}
    left = drawn
    for stage, reason in FUNNEL:
        left -= int(rejected[reason]) if reason else 0
        out[stage] = left
    out["checks"] = passed
    out["accepted"] = accepted
    return out


def _counts(keyf: Callable[[np.ndarray], np.ndarray], names: Any, counts: np.ndarray) -> dict[str, int]:
    keys = keyf(np.arange(GRID.size))
    return {str(n): int(counts[keys == i].sum()) for i, n in enumerate(names)}
