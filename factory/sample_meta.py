"""What a candidate becomes on disk: KEY.json, the parquet row and the AU array of an accepted
sample, and KEY.json of a kept rejected one (docs/design.md, output layout)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


from .candidate import Candidate
from .writer import DETECT_COLUMNS, au_array


def accepted_sample(
    cand: Candidate, thr: int, gen_tag: str, build_id: str
) -> tuple[dict[str, Any], bytes, dict[str, Any]]:
    """(KEY.json, KEY.au.npy, parquet row) of an accepted candidate."""
    spec, expansion, intensity, occ = cand.spec, cand.expansion, cand.intensity, cand.occurrence
    target = spec.intensity.astype(np.int64)
    scores = {  # measured by the checks that passed it (factory/checks.py)
        "prompt_target_jaccard": round(float(cand.scores["prompt_target_jaccard"]), 6),
        "label_prompt_jaccard": round(float(cand.scores["label_prompt_jaccard"]), 6),
    }
    consensus_meta = None
    row_det: dict[str, Any] = dict.fromkeys(DETECT_COLUMNS)
    d = cand.detection
    if d is not None:
        c_occ, c_int, agree = d.occurrence, d.intensity, d.agree
        scores["label_consensus_jaccard"] = round(float(cand.scores["label_consensus_jaccard"]), 6)
        if d.realism is not None:
            scores["realism"] = round(float(d.realism), 6)
        if d.training_similarity is not None:
            scores["training_similarity"] = round(float(d.training_similarity), 6)
        consensus_meta = {
            "occurrence": c_occ.astype(int).tolist(),
            "intensity": [None if np.isnan(x) else round(float(x), 4) for x in c_int],
            "agree": agree.astype(int).tolist(),
            "votes": d.votes.astype(int).tolist(),
            "coverage": d.coverage.astype(int).tolist(),
            "min_agree": d.min_agree,
        }
        row_det = {
            "consensus_occurrence": c_occ.tolist(),
            "consensus_intensity": [None if np.isnan(x) else float(x) for x in c_int],
            "consensus_agree": agree.tolist(),
            "realism": scores.get("realism"),
            "label_consensus_jaccard": scores["label_consensus_jaccard"],
            "detectors": _json(d.raw()),
            "training_similarity": scores.get("training_similarity"),
        }
    meta = candidate_meta(cand, thr) | {
        "labels": labels_meta(intensity, cand.occurrence_prob, thr),
        "consensus": consensus_meta,
        "detectors": json.loads(row_det["detectors"]) if row_det["detectors"] else None,
        "scores": scores,
        "provenance": {"generator": gen_tag, "build_id": build_id},
    }
    if cand.exemplar is not None and cand.exemplar.mask_source != "puppet":
        meta["exemplar"] = {"mask_source": cand.exemplar.mask_source}
    row = {
        **_who(cand),
        "skin_group": spec.identity.skin_group,
        "age_group": spec.identity.age_group,
        **_prompt(cand),
        "target_intensity": target.tolist(),
        "intensity": intensity.tolist(),
        "occurrence": occ.tolist(),
        "prompt_target_jaccard": scores["prompt_target_jaccard"],
        "label_prompt_jaccard": scores["label_prompt_jaccard"],
        "identity": _json(spec.identity.model_dump(mode="json")),
        "generator": gen_tag,
        **row_det,
    }
    return meta, au_array(occ, intensity), row


def rejected_sample(cand: Candidate, thr: int, gen_tag: str, build_id: str) -> tuple[dict[str, Any], np.ndarray | None]:
    """KEY.json of a kept rejected candidate (as an accepted sample's, plus `reason` and the score of
    the check it failed) and its image, if it was generated and is not a NaN image."""
    reason = cand.fate
    scores = {reason: cand.scores[reason]} if reason in cand.scores else {}
    meta = candidate_meta(cand, thr) | {
        "reason": reason,
        "scores": {k: round(float(v), 6) for k, v in scores.items()},
        "provenance": {"generator": gen_tag, "build_id": build_id},
    }
    image = None
    if cand.generated:
        inten, prob = cand.intensity, cand.occurrence_prob
        if np.isfinite(inten).all() and np.isfinite(prob).all():
            meta["labels"] = labels_meta(inten, prob, thr)
        if cand.image.dtype == np.uint8:  # a NaN image (float) has nothing to show
            image = cand.image
    return meta, image


def candidate_meta(cand: Candidate, thr: int) -> dict[str, Any]:
    """KEY.json's account of a candidate before generation: who, what was asked, and the prompt."""
    spec, expansion = cand.spec, cand.expansion
    target = spec.intensity.astype(np.int64)
    return {
        **_who(cand),
        **_prompt(cand),
        "target": {"intensity": target.tolist(), "occurrence": (target >= thr).astype(int).tolist()},
        "prompt_aus": list(map(int, expansion.parsed)),
        "identity": spec.identity.model_dump(mode="json"),
    }


def _who(cand: Candidate) -> dict[str, Any]:
    s = cand.spec
    return {"key": s.key, "shard": s.shard, "candidate": s.index, "seed": s.seed, "emotion": s.emotion, "strength": s.strength}


def _prompt(cand: Candidate) -> dict[str, Any]:
    e = cand.expansion
    return {"prompt": e.text, "expander": e.expander, "expand_fallback": e.fallback}


def labels_meta(intensity: np.ndarray, occurrence_prob: np.ndarray, thr: int) -> dict[str, Any]:
    """The generator's labels as KEY.json keeps them (occurrence: its head's probability >= 0.5)."""
    return {
        "intensity": [round(float(x), 4) for x in intensity],
        "occurrence": (occurrence_prob >= 0.5).astype(int).tolist(),
        "occurrence_prob": [round(float(x), 4) for x in occurrence_prob],
        "occurrence_threshold": thr,
    }


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
