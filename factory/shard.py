"""One shard from candidates to committed files: expand -> generate -> checks -> write.

This is the body of a small, idempotent Ray task: given the same config and shard index it
writes the same bytes, so a retry or a resume after a crash simply runs it again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from pipelines.facs import NUM_AUS, jaccard
from pipelines.prompts import make_expander
from pipelines.prompts.types import ExpansionRequest

from . import faults
from .config import FactoryConfig
from .generators import GenerationBatch, GenerationResult, validate_result
from .layout import Layout
from .plan import GRID, Plan
from .sampler import Candidate, ShardSampler
from .writer import ShardWriter, au_array

log = logging.getLogger(__name__)

#: Rejection reasons, named after the stage or check that rejects (report and stats use them).
REASONS = ("prompt_target_jaccard", "invalid_image", "label_prompt_jaccard", "over_quota")

GenerateFn = Callable[[GenerationBatch], GenerationResult]


def run_shard(
    cfg: FactoryConfig,
    index: int,
    out: str,
    generate: GenerateFn,
    build_id: str,
    attempt: int = 1,
    generator_info: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fill, write and commit shard `index`; returns its stats (the commit marker's content)."""
    t0 = time.time()
    layout = Layout(out)
    plan = Plan(cfg)
    spec = plan.shard(index)
    sampler = ShardSampler(spec, cfg)
    expander = make_expander(cfg.expand, cache_dir=layout.cache_dir)
    thr = cfg.labels.occurrence_threshold
    size = cfg.puppet.image_size
    generator_info = generator_info or {}
    gen_tag = f"{generator_info.get('name', cfg.generator)}@{generator_info.get('version', '?')}"

    rejected: Counter[str] = Counter()
    timings: Counter[str] = Counter()
    expand_stats = None
    per_au = {k: np.zeros(NUM_AUS) for k in ("target_occ", "target_int", "occ", "int")}
    cells_kept = np.zeros(GRID.size, dtype=np.int64)
    writer = ShardWriter(layout, spec.name, cfg.build.image_format, cfg.build.jpg_quality)
    try:
        while not sampler.done:
            cands = sampler.draw()
            if not cands:
                break
            passed = np.zeros(len(cands), dtype=bool)

            # expand
            t = time.perf_counter()
            faults.check("expand", index)
            reqs = [
                ExpansionRequest(
                    emotion=c.emotion, strength=c.strength, intensity=tuple(int(x) for x in c.intensity), seed=c.seed
                )
                for c in cands
            ]
            expansions, st = expander.expand_batch(reqs)
            expand_stats = st if expand_stats is None else expand_stats + st
            timings["expand"] += time.perf_counter() - t

            t = time.perf_counter()
            prompt_ok = np.array([e.jaccard >= cfg.expand.tau for e in expansions])
            rejected["prompt_target_jaccard"] += int((~prompt_ok).sum())
            timings["checks"] += time.perf_counter() - t

            # generate
            todo = np.flatnonzero(prompt_ok)
            result = None
            if len(todo):
                t = time.perf_counter()
                faults.check("generate", index)
                batch = GenerationBatch(
                    keys=[cands[i].key for i in todo],
                    seeds=np.array([cands[i].seed for i in todo], dtype=np.int64),
                    prompts=[expansions[i].text for i in todo],
                    target=np.stack([cands[i].intensity for i in todo]),
                    identities=[cands[i].identity for i in todo],
                )
                result = generate(batch)
                timings["generate"] += time.perf_counter() - t

                # checks
                t = time.perf_counter()
                faults.check("checks", index)
                valid = validate_result(result, batch, size)
                for j in np.flatnonzero(~valid):
                    log.warning("shard %s: %s has a NaN/inf or blank output; rejected", spec.name, batch.keys[j])
                rejected["invalid_image"] += int((~valid).sum())
                gen_occ = result.occurrence_prob >= 0.5
                for j, i in enumerate(todo):
                    if not valid[j]:
                        continue
                    prompt_occ = np.asarray(expansions[i].parsed) >= thr
                    if jaccard(prompt_occ, gen_occ[j]) >= cfg.checks.label_prompt_jaccard:
                        passed[i] = True
                    else:
                        rejected["label_prompt_jaccard"] += 1
                timings["checks"] += time.perf_counter() - t

            keep = sampler.record(cands, passed)
            rejected["over_quota"] += int((passed & ~keep).sum())

            # write
            t = time.perf_counter()
            faults.check("write", index)
            if result is not None:
                for j, i in enumerate(todo):
                    if keep[i]:
                        _write_sample(writer, cands[i], expansions[i], result, j, thr, gen_tag, build_id, per_au)
                        cells_kept[cands[i].cell] += 1
            timings["write"] += time.perf_counter() - t

        t = time.perf_counter()
        stats = {
            "name": spec.name,
            "index": index,
            "build_id": build_id,
            "size": spec.size,
            "candidates": sampler.drawn,
            "rejected": {r: int(rejected[r]) for r in REASONS},
            "funnel": {
                "candidates": sampler.drawn,
                "expand": sampler.drawn - int(rejected["prompt_target_jaccard"]),
                "generate_valid": sampler.drawn - int(rejected["prompt_target_jaccard"] + rejected["invalid_image"]),
                "checks": int(sampler.passed.sum()),
                "accepted": int(cells_kept.sum()),
            },
            "per_au": {k: v.tolist() for k, v in per_au.items()},
            "emotions": _counts(GRID.emotion_of, GRID.emotions, cells_kept),
            "skin_groups": _counts(GRID.skin_of, range(GRID.skin_groups), cells_kept),
            "age_groups": _counts(GRID.age_of, GRID.age_groups, cells_kept),
            "planned": {
                "emotions": _counts(GRID.emotion_of, GRID.emotions, spec.quotas),
                "skin_groups": _counts(GRID.skin_of, range(GRID.skin_groups), spec.quotas),
                "age_groups": _counts(GRID.age_of, GRID.age_groups, spec.quotas),
            },
            "expand": expand_stats.model_dump() if expand_stats is not None else {},
            "generator": gen_tag,
            "node": socket.gethostname(),
            "attempt": attempt,
        }
        if int(cells_kept.sum()) != spec.size:
            raise RuntimeError(f"shard {spec.name} kept {int(cells_kept.sum())} samples, planned {spec.size}")
        timings["write"] += time.perf_counter() - t
        stats["timings"] = {k: round(v, 4) for k, v in timings.items()} | {
            "start": round(t0, 3),
            "end": round(time.time(), 3),
        }
        return writer.commit(stats)
    except BaseException:
        writer.abort()
        raise


def _counts(keyf: Callable[[np.ndarray], np.ndarray], names: Any, counts: np.ndarray) -> dict[str, int]:
    keys = keyf(np.arange(GRID.size))
    return {str(n): int(counts[keys == i].sum()) for i, n in enumerate(names)}


def _write_sample(
    writer: ShardWriter,
    cand: Candidate,
    expansion: Any,
    result: GenerationResult,
    j: int,
    thr: int,
    gen_tag: str,
    build_id: str,
    per_au: dict[str, np.ndarray],
) -> None:
    intensity = result.intensity[j]
    occ = result.occurrence_prob[j] >= 0.5  # the generator's occurrence head (puppet: exact)
    target = cand.intensity.astype(np.int64)
    prompt_occ = np.asarray(expansion.parsed) >= thr
    scores = {
        "prompt_target_jaccard": round(float(expansion.jaccard), 6),
        "label_prompt_jaccard": round(jaccard(prompt_occ, occ), 6),
    }
    identity = cand.identity.model_dump(mode="json")
    meta = {
        "key": cand.key,
        "shard": cand.shard,
        "candidate": cand.index,
        "seed": cand.seed,
        "emotion": cand.emotion,
        "strength": cand.strength,
        "prompt": expansion.text,
        "expander": expansion.expander,
        "expand_fallback": expansion.fallback,
        "target": {"intensity": target.tolist(), "occurrence": (target >= thr).astype(int).tolist()},
        "labels": {
            "intensity": [round(float(x), 4) for x in intensity],
            "occurrence": occ.astype(int).tolist(),
            "occurrence_prob": [round(float(x), 4) for x in result.occurrence_prob[j]],
            "occurrence_threshold": thr,
        },
        "prompt_aus": list(map(int, expansion.parsed)),
        "identity": identity,
        "scores": scores,
        "provenance": {"generator": gen_tag, "build_id": build_id},
    }
    row = {
        "key": cand.key,
        "shard": cand.shard,
        "candidate": cand.index,
        "seed": cand.seed,
        "emotion": cand.emotion,
        "strength": cand.strength,
        "skin_group": cand.identity.skin_group,
        "age_group": cand.identity.age_group,
        "prompt": expansion.text,
        "expander": expansion.expander,
        "expand_fallback": expansion.fallback,
        "target_intensity": target.tolist(),
        "intensity": intensity.tolist(),
        "occurrence": occ.tolist(),
        "prompt_target_jaccard": scores["prompt_target_jaccard"],
        "label_prompt_jaccard": scores["label_prompt_jaccard"],
        "identity": _json(identity),
        "generator": gen_tag,
    }
    writer.write(cand.key, result.images[j], meta, au_array(occ, intensity), row)
    per_au["target_occ"] += target >= thr
    per_au["target_int"] += target
    per_au["occ"] += occ
    per_au["int"] += intensity


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True)
