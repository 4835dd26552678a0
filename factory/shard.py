"""One shard from candidates to committed files: expand -> generate -> detect -> checks -> write.

This is the body of a small, idempotent Ray task: given the same config and shard index it
writes the same bytes, so a retry or a resume after a crash simply runs it again.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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
from .stages import FUNNEL, REASONS
from .writer import DETECT_COLUMNS, ShardWriter, au_array

if TYPE_CHECKING:
    from detectors.panel import Detection

log = logging.getLogger(__name__)

#: Keys of rejected samples kept per reason in the stats (examples for reports and tests).
REJECTED_EXAMPLES = 200

GenerateFn = Callable[[GenerationBatch], GenerationResult]
DetectFn = Callable[[np.ndarray], "Detection"]


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
    on_round: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Fill, write and commit shard `index`; returns its stats (the commit marker's content).

    `node` (Ray's node id and IP, and the shard worker's actor id, when run on Ray) goes into the
    stats next to the hostname: several Ray nodes may share one hostname (containers, network
    namespaces). `on_round(accepted, candidates)` hears the counts so far after every round, for
    the driver's progress while a long shard is still filling.
    """
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

    if cfg.detect.enabled and detect is None:
        raise ValueError("detect.enabled is true but no detect stage was given to run_shard")
    rejected: Counter[str] = Counter()
    examples: dict[str, list[str]] = {r: [] for r in REASONS}
    injected_keys: dict[str, list[str]] = {}

    kept: Counter[str] = Counter()

    def reject(
        reason: str,
        cand: Candidate,
        expansion: Any,
        result: GenerationResult | None = None,
        j: int = -1,
        **scores: float,
    ) -> None:
        """Count a rejection under its reason; keep its key, and the first few whole, for inspection."""
        rejected[reason] += 1
        if len(examples[reason]) < REJECTED_EXAMPLES:
            examples[reason].append(cand.key)
        if kept[reason] < cfg.build.rejected_samples:
            kept[reason] += 1
            meta, image = _rejected_sample(reason, cand, expansion, result, j, scores, thr, gen_tag, build_id)
            writer.keep_rejected(cand.key, meta, image)

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
            for i in np.flatnonzero(~prompt_ok):
                reject("prompt_target_jaccard", cands[i], expansions[i], prompt_target_jaccard=expansions[i].jaccard)
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
                for kind, keys in faults.inject_samples(batch, result).items():
                    injected_keys.setdefault(kind, []).extend(keys)
                timings["generate"] += time.perf_counter() - t

                valid = validate_result(result, batch, size)
                for j in np.flatnonzero(~valid):
                    log.warning("shard %s: %s has a NaN/inf or blank output; rejected", spec.name, batch.keys[j])

                # detect: AU detectors, consensus, realism (on the valid images only)
                det = None
                if cfg.detect.enabled and valid.any():
                    t = time.perf_counter()
                    faults.check("detect", index)
                    det = detect(np.ascontiguousarray(result.images[valid]))
                    timings["detect"] += time.perf_counter() - t
                det_row = np.cumsum(valid) - 1  # batch position -> row of `det`

                # checks, in REASONS order
                t = time.perf_counter()
                faults.check("checks", index)
                gen_occ = result.occurrence_prob >= 0.5
                for j, i in enumerate(todo):
                    cand, exp = cands[i], expansions[i]
                    if not valid[j]:
                        reject("invalid_image", cand, exp, result, j)
                        continue
                    if det is not None and det.realism is not None and det.realism[det_row[j]] < cfg.checks.realism:
                        reject("realism", cand, exp, result, j, realism=det.realism[det_row[j]])
                        continue
                    prompt_occ = np.asarray(exp.parsed) >= thr
                    lp = jaccard(prompt_occ, gen_occ[j])
                    if lp < cfg.checks.label_prompt_jaccard:
                        reject("label_prompt_jaccard", cand, exp, result, j, label_prompt_jaccard=lp)
                        continue
                    if det is not None:
                        c, r = det.consensus, det_row[j]
                        lc = label_consensus_jaccard(gen_occ[j], c.occurrence[r], c.agree[r])
                        if lc < cfg.checks.label_consensus_jaccard:
                            reject("label_consensus_jaccard", cand, exp, result, j, label_consensus_jaccard=lc)
                            continue
                    passed[i] = True
                timings["checks"] += time.perf_counter() - t

            keep = sampler.record(cands, passed)
            row_of = {int(i): j for j, i in enumerate(todo)}  # candidate -> row of `result`
            for i in np.flatnonzero(passed & ~keep):
                reject("over_quota", cands[i], expansions[i], result, row_of[int(i)])

            # write
            t = time.perf_counter()
            faults.check("write", index)
            if result is not None:
                for j, i in enumerate(todo):
                    if keep[i]:
                        d = (det, int(det_row[j])) if det is not None else None
                        _write_sample(writer, cands[i], expansions[i], result, j, d, thr, gen_tag, build_id, per_au)
                        cells_kept[cands[i].cell] += 1
            timings["write"] += time.perf_counter() - t
            if on_round is not None:
                on_round(int(cells_kept.sum()), sampler.drawn)

        t = time.perf_counter()
        stats = {
            "name": spec.name,
            "index": index,
            "build_id": build_id,
            "size": spec.size,
            "candidates": sampler.drawn,
            "rejected": {r: int(rejected[r]) for r in REASONS},
            "rejected_examples": {r: v for r, v in examples.items() if v},
            "funnel": _funnel(sampler.drawn, rejected, int(sampler.passed.sum()), int(cells_kept.sum())),
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
            "detect": {"enabled": cfg.detect.enabled, "min_agree": cfg.detect.min_agree},
            "node": socket.gethostname(),
            **(node or {}),
            "attempt": attempt,
        }
        if injected_keys:
            stats["injected"] = injected_keys
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


def label_consensus_jaccard(occ: np.ndarray, consensus_occ: np.ndarray, agree: np.ndarray) -> float:
    """Jaccard of the generator's labels and the detectors' consensus over the agreed AUs only.

    AUs the detectors do not agree on carry no evidence either way, so they are left out of both
    sets (both empty: 1.0, as for every Jaccard here).
    """
    return jaccard(occ & agree, consensus_occ & agree)


def _counts(keyf: Callable[[np.ndarray], np.ndarray], names: Any, counts: np.ndarray) -> dict[str, int]:
    keys = keyf(np.arange(GRID.size))
    return {str(n): int(counts[keys == i].sum()) for i, n in enumerate(names)}


def _write_sample(
    writer: ShardWriter,
    cand: Candidate,
    expansion: Any,
    result: GenerationResult,
    j: int,
    det: tuple[Detection, int] | None,
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
    consensus_meta = None
    row_det: dict[str, Any] = dict.fromkeys(DETECT_COLUMNS)
    if det is not None:
        d, r = det
        c = d.consensus
        c_occ, c_int, agree = c.occurrence[r], c.intensity[r], c.agree[r]
        scores["label_consensus_jaccard"] = round(label_consensus_jaccard(occ, c_occ, agree), 6)
        if d.realism is not None:
            scores["realism"] = round(float(d.realism[r]), 6)
        raw = d.raw(r)
        consensus_meta = {
            "occurrence": c_occ.astype(int).tolist(),
            "intensity": [None if np.isnan(x) else round(float(x), 4) for x in c_int],
            "agree": agree.astype(int).tolist(),
            "votes": c.votes[r].astype(int).tolist(),
            "coverage": c.coverage.astype(int).tolist(),
            "min_agree": c.k,
        }
        row_det = {
            "consensus_occurrence": c_occ.tolist(),
            "consensus_intensity": [None if np.isnan(x) else float(x) for x in c_int],
            "consensus_agree": agree.tolist(),
            "realism": scores.get("realism"),
            "label_consensus_jaccard": scores["label_consensus_jaccard"],
            "detectors": _json(raw),
        }
    identity = cand.identity.model_dump(mode="json")
    meta = _candidate_meta(cand, expansion, thr) | {
        "labels": _labels_meta(intensity, result.occurrence_prob[j], thr),
        "consensus": consensus_meta,
        "detectors": json.loads(row_det["detectors"]) if row_det["detectors"] else None,
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
        **row_det,
    }
    writer.write(cand.key, result.images[j], meta, au_array(occ, intensity), row)
    per_au["target_occ"] += target >= thr
    per_au["target_int"] += target
    per_au["occ"] += occ
    per_au["int"] += intensity


def _candidate_meta(cand: Candidate, expansion: Any, thr: int) -> dict[str, Any]:
    """KEY.json's account of a candidate before generation: who, what was asked, and the prompt."""
    target = cand.intensity.astype(np.int64)
    return {
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
        "prompt_aus": list(map(int, expansion.parsed)),
        "identity": cand.identity.model_dump(mode="json"),
    }


def _labels_meta(intensity: np.ndarray, occurrence_prob: np.ndarray, thr: int) -> dict[str, Any]:
    """The generator's labels as KEY.json keeps them (occurrence: its head's probability >= 0.5)."""
    return {
        "intensity": [round(float(x), 4) for x in intensity],
        "occurrence": (occurrence_prob >= 0.5).astype(int).tolist(),
        "occurrence_prob": [round(float(x), 4) for x in occurrence_prob],
        "occurrence_threshold": thr,
    }


def _rejected_sample(
    reason: str,
    cand: Candidate,
    expansion: Any,
    result: GenerationResult | None,
    j: int,
    scores: dict[str, float],
    thr: int,
    gen_tag: str,
    build_id: str,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """KEY.json of a kept rejected candidate (as an accepted sample's, plus `reason`) and its image, if any."""
    meta = _candidate_meta(cand, expansion, thr) | {
        "reason": reason,
        "scores": {k: round(float(v), 6) for k, v in scores.items()},
        "provenance": {"generator": gen_tag, "build_id": build_id},
    }
    image = None
    if result is not None and j >= 0:
        inten, prob = result.intensity[j], result.occurrence_prob[j]
        if np.isfinite(inten).all() and np.isfinite(prob).all():
            meta["labels"] = _labels_meta(inten, prob, thr)
        img = result.images[j]
        if img.dtype == np.uint8:  # a NaN image (float) has nothing to show
            image = img
    return meta, image


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
