"""`factory report OUT`: where a build stands and whether its corpus looks as planned.

Counts, funnel, rejections and throughput come from build.json, the commit markers and failure
records; label histograms, AU co-occurrence and emotion x demographic balance from the committed
shards' parquets (a few columns, reduced with numpy); sample grids from the head of a few tars.
Only shards with a valid commit marker are read (`manifest.open_build`), so the report is safe
while a build is still running, and all I/O goes through fsspec, so OUT may be s3://.
"""

from __future__ import annotations

import bisect
import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from core.facs import AUS, EMOTIONS

from .fallbacks import report_fields, report_line
from .layout import TMP_PREFIX
from .manifest import STATS_SUFFIX, Build, open_build
from .plan import GRID
from .report_data import (
    ReportError,
    SampleAggregates,
    aggregate_shards,
    identities_summary,
    leakage_summary,
    planned_crosstabs,
    similarity_threshold,
    storage_summary,
)
from .report_samples import accepted_samples, rejected_samples
from .checks import FUNNEL_ORDER, REASONS

log = logging.getLogger(__name__)

__all__ = ["ReportError", "build_report", "print_report"]

REJECTED_NOTE = (
    "Rejected candidates never enter the corpus: each shard keeps the first few of every reason "
    "(build.rejected_samples) in rejected/NAME.tar for this grid; the reason is the first check each failed."
)


def _check_markers(b: Build) -> list[str]:
    """Markers that scan() left out: unparseable ones are an error; foreign or uncommitted ones a note."""
    layout, notes = b.layout, []
    for base in layout.listdir(layout.shards_dir):
        if not base.endswith(STATS_SUFFIX) or base.startswith(TMP_PREFIX):
            continue
        name = base[: -len(STATS_SUFFIX)]
        if name in b.state.committed:
            continue
        path = layout.stats(name)
        try:
            layout.read_json(path)
        except FileNotFoundError:
            continue  # removed by a resume between listing and reading
        except (OSError, ValueError) as err:
            raise ReportError(
                f"{path} is corrupt ({err}); delete it and run `factory resume {layout.out}` to redo shard {name}"
            ) from None
        notes.append(f"{path} is not a commit marker of build {b.record['build_id']}; shard {name} counted as pending")
    return notes


def _node(s: dict[str, Any]) -> str:
    """A shard's node as the report names it: the hostname, and Ray's node IP where several share one."""
    host = str(s.get("node", "?"))
    return f"{host} ({s['node_ip']})" if s.get("node_ip") else host


def _stats_sums(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-shard stats summed: rejections, funnel, per-AU sums, marginal balance, expand, nodes."""
    rejected: dict[str, int] = defaultdict(int)
    funnel: dict[str, int] = defaultdict(int)
    per_au = {k: np.zeros(len(AUS)) for k in ("target_occ", "target_int", "occ", "int")}
    balance: dict[str, dict[str, dict[str, int]]] = {}
    expand: dict[str, Any] = defaultdict(int)
    by_node: dict[str, dict[str, float]] = defaultdict(lambda: {"samples": 0, "busy_s": 0.0, "shards": 0})
    for s in stats:
        for k, v in s["rejected"].items():
            rejected[k] += int(v)
        for k, v in s["funnel"].items():
            funnel[k] += int(v)
        for k in per_au:
            per_au[k] += np.asarray(s["per_au"][k], dtype=np.float64)
        for dim in ("emotions", "skin_groups", "age_groups"):
            d = balance.setdefault(dim, {})
            for name, n in s[dim].items():
                d.setdefault(name, {"accepted": 0, "planned": 0})["accepted"] += int(n)
        for k, v in s.get("expand", {}).items():
            if isinstance(v, (int, float)):
                expand[k] += v
        node = by_node[_node(s)]
        node["samples"] += int(s["samples"])
        node["shards"] += 1
        node["busy_s"] += float(s["timings"]["end"] - s["timings"]["start"])
    return {
        "rejected": rejected,
        "funnel": funnel,
        "per_au": per_au,
        "balance": balance,
        "expand": expand,
        "by_node": by_node,
    }


def _stats_ok(s: dict[str, Any]) -> bool:
    """Whether one marker has every field the report sums, with the right shapes."""
    try:
        int(s["samples"]) + int(s["candidates"])
        _stats_sums([s])
        _timeline([s], _build_clock([s])[0])
    except (KeyError, TypeError, ValueError):
        return False
    return True


def _build_clock(stats: list[dict[str, Any]]) -> tuple[Callable[[float], float], float]:
    """Build time: wall-clock time while at least one shard ran, so the hours between a build and its
    resume count for nothing. Returns the map from a wall-clock time to build seconds, and the total."""
    spans: list[list[float]] = []
    for a, b in sorted((float(s["timings"]["start"]), float(s["timings"]["end"])) for s in stats):
        if spans and a <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], b)
        else:
            spans.append([a, b])
    offsets = list(itertools.accumulate((b - a for a, b in spans), initial=0.0))
    starts = [a for a, _ in spans]

    def clock(t: float) -> float:
        i = bisect.bisect_right(starts, t) - 1
        return 0.0 if i < 0 else offsets[i] + min(t, spans[i][1]) - spans[i][0]

    return clock, offsets[-1]


def _timeline(stats: list[dict[str, Any]], clock: Callable[[float], float]) -> dict[str, list[list[float]]]:
    """Per node, (build seconds since the first shard started, cumulative accepted samples) at each commit."""
    nodes: dict[str, list[list[float]]] = defaultdict(list)
    for s in sorted(stats, key=lambda s: float(s["timings"]["end"])):
        pts = nodes[_node(s)]
        prev = pts[-1][1] if pts else 0
        pts.append([round(clock(float(s["timings"]["end"])), 3), prev + int(s["samples"])])
    return dict(nodes)


def _figures(
    sums: dict[str, Any], agg: SampleAggregates, cell_totals: np.ndarray, timeline: dict[str, list[list[float]]]
) -> dict[str, Any]:
    """The data behind every plot, the same for the HTML and `--json`."""
    aus = [f"AU{a}" for a in AUS]
    funnel = sums["funnel"]
    stages = [s for s in FUNNEL_ORDER if s in funnel] + [s for s in funnel if s not in FUNNEL_ORDER]
    reasons = list(REASONS) + [r for r in sums["rejected"] if r not in REASONS]
    n = max(agg.rows, 1)
    diag = np.diag(agg.cooc).astype(float)
    conditional = agg.cooc / np.where(diag > 0, diag, 1)[:, None]
    plan_es, plan_ea = planned_crosstabs(cell_totals)
    return {
        "funnel": {"stages": stages, "counts": [int(funnel[s]) for s in stages]},
        "rejections": {"reasons": reasons, "counts": [int(sums["rejected"].get(r, 0)) for r in reasons]},
        "au_occurrence": {
            "aus": aus,
            "rows": agg.rows,
            "observed": (agg.occ / n).round(6).tolist(),
            "planned": (agg.target_occ / n).round(6).tolist(),
        },
        "au_intensity": {
            "aus": aus,
            "levels": list(range(agg.int_hist.shape[1])),
            "labels": agg.int_hist.tolist(),
            "planned": agg.target_int_hist.tolist(),
        },
        "cooccurrence": {"aus": aus, "counts": agg.cooc.tolist(), "conditional": conditional.round(6).tolist()},
        "balance": {
            "emotions": list(GRID.emotions),
            "skin_groups": {
                "groups": [str(i) for i in range(GRID.skin_groups)],
                "accepted": agg.emotion_skin.tolist(),
                "planned": plan_es.tolist(),
            },
            "age_groups": {
                "groups": list(GRID.age_groups),
                "accepted": agg.emotion_age.tolist(),
                "planned": plan_ea.tolist(),
            },
        },
        "throughput": {"nodes": timeline},
    }


def _marker_totals(
    b: Build, out: str, names: list[str], stats: list[dict[str, Any]]
) -> tuple[int, int, dict[str, Any], float, dict[str, list[list[float]]]]:
    """Accepted, candidates, sums, build seconds and timeline from the markers, naming the first bad one."""
    try:
        n_accepted = sum(int(s["samples"]) for s in stats)
        candidates = sum(int(s["candidates"]) for s in stats)
        sums = _stats_sums(stats)
        clock, wall = _build_clock(stats)
        timeline = _timeline(stats, clock)
    except (KeyError, TypeError, ValueError) as err:
        bad = next(n for n, st in zip(names, stats) if not _stats_ok(st))
        raise ReportError(
            f"{b.layout.stats(bad)} lacks a field the report needs ({err!r}); it was not written by this "
            f"factory's shard runner: delete it and run `factory resume {out}` to redo shard {bad}"
        ) from None
    return n_accepted, candidates, sums, wall, timeline


def _add_planned_balance(
    balance: dict[str, dict[str, dict[str, int]]], cell_totals: np.ndarray
) -> dict[str, dict[str, dict[str, int]]]:
    """Fill in each group's planned count over the whole corpus (not only what is committed so far)."""
    cells = np.arange(GRID.size)
    for dim, keyf, groups in (
        ("emotions", GRID.emotion_of, GRID.emotions),
        ("skin_groups", GRID.skin_of, range(GRID.skin_groups)),
        ("age_groups", GRID.age_of, GRID.age_groups),
    ):
        d = balance.setdefault(dim, {})
        keys = keyf(cells)
        for i, name in enumerate(groups):
            d.setdefault(str(name), {"accepted": 0, "planned": 0})["planned"] = int(cell_totals[keys == i].sum())
    return balance


def _au_means(per_au: dict[str, np.ndarray], n_accepted: int) -> list[dict[str, Any]]:
    """Per-AU planned vs labelled occurrence rates and mean intensities over the accepted samples."""
    n = max(n_accepted, 1)
    return [
        {
            "au": au,
            "target_occurrence": per_au["target_occ"][i] / n,
            "occurrence": per_au["occ"][i] / n,
            "target_mean_intensity": per_au["target_int"][i] / n,
            "mean_intensity": per_au["int"][i] / n,
        }
        for i, au in enumerate(AUS)
    ]


def build_report(
    out: str,
    *,
    accepted: int = 0,
    rejected_per_reason: int = 0,
    images: bool = False,
    threads: int = 4,
) -> dict[str, Any]:
    """The whole report as JSON-ready data; `accepted`/`rejected_per_reason` size the sample grids."""
    b = open_build(out)
    notes = _check_markers(b)
    record, plan, state = b.record, b.plan, b.state
    names = sorted(state.committed)
    stats = [state.committed[k] for k in names]
    n_accepted, candidates, sums, wall, timeline = _marker_totals(b, out, names, stats)
    sim_threshold = similarity_threshold(record)[0]
    agg = aggregate_shards(b.layout, names, b.cfg.labels.occurrence_threshold, threads, sim_threshold)
    if agg.rows != n_accepted:
        notes.append(f"parquets hold {agg.rows} rows but the markers count {n_accepted}; run `factory verify {out}`")

    # The plan's balance over the whole corpus (not only what is committed so far).
    cell_totals = plan.totals()
    balance = _add_planned_balance(sums["balance"], cell_totals)
    aus = _au_means(sums["per_au"], n_accepted)
    failed = {k: v.get("error", "?") for k, v in state.failed.items() if k not in state.committed}
    return {
        "out": out,
        "build_id": record["build_id"],
        "target": plan.target,
        "accepted": n_accepted,
        "shards": {
            "total": plan.num_shards,
            "done": len(stats),
            "failed": len(failed),
            "pending": plan.num_shards - len(stats) - len(failed),
        },
        "failed": failed,
        "candidates": candidates,
        "acceptance_rate": n_accepted / candidates if candidates else None,
        "funnel": dict(sums["funnel"]),
        "rejected": dict(sums["rejected"]),
        "aus": aus,
        "balance": balance,
        "partial_emotions": {e: p.note for e, p in EMOTIONS.items() if p.partial},
        "expand": dict(sums["expand"]) | report_fields(b.cfg, stats),
        "identities": identities_summary(b.cfg, stats),
        "storage": storage_summary(b.cfg, stats, n_accepted),
        "training_similarity": leakage_summary(record, agg, int(sums["rejected"].get("training_similarity", 0))),
        "throughput": {
            "samples_per_s": n_accepted / wall if wall else None,
            "wall_s": wall,
            "nodes": {k: dict(v) for k, v in sums["by_node"].items()},
        },
        "figures": _figures(sums, agg, cell_totals, timeline),
        "samples": {
            "accepted": accepted_samples(b.layout, names, accepted, images),
            "rejected": rejected_samples(b.layout, state.committed, rejected_per_reason, images),
            "rejected_note": REJECTED_NOTE,
        },
        "notes": notes,
    }


def report_json(rep: dict[str, Any]) -> str:
    return json.dumps(rep, indent=1, default=float)


def _print_identities_and_storage(con: Any, rep: dict[str, Any]) -> None:
    ident, st = rep["identities"], rep["storage"]
    if ident["source"] == "pool":
        masks = ", ".join(f"{k} {v}" for k, v in sorted(ident["mask_sources"].items())) or "none"
        con.print(f"identities: pool {ident['pool']}; masks: {masks}; exemplars skipped: {len(ident['skipped_exemplars'])}")
        if ident["unbalanced_axes"]:
            con.print(
                f"[yellow]not balanced[/]: {', '.join(ident['unbalanced_axes'])} (the pool does not give them for "
                "every photo; attributes.csv or the pool's columns can)"
            )
    if st["bytes_per_sample"] is not None:
        q = f" quality {st['jpg_quality']}" if st["jpg_quality"] else ""
        retried = f"; {st['store_retries']} store requests retried" if st.get("store_retries") else ""
        size = f"{st['bytes_per_sample'] / 1e3:.1f} kB per sample ({st['image_format']}{q}, tar + parquet)"
        con.print(f"storage: {size}{retried}")


def leakage_line(leak: dict[str, Any]) -> str:
    """Identity leakage in one line: the training-similarity distribution over the accepted samples, or why
    it was not measured."""
    if not leak["measured"]:
        return f"training similarity (identity leakage): not measured: {leak['why']}"
    head = (
        f"training similarity (identity leakage; max cosine to the {leak['subjects']} MAUGen training subjects, "
        f"{leak['identity_encoder']})"
    )
    if not leak["samples"]:
        return f"{head}: no accepted sample measured yet"
    q = leak["quantiles"]
    dist = (
        f"p50 {q['p50']:.3f}, p90 {q['p90']:.3f}, p99 {q['p99']:.3f}, max {leak['max']:.3f} "
        f"over {leak['samples']:,} samples"
    )
    if leak["threshold"] is None:
        above = (
            "no threshold to count above: the identity encoder's spec has no verification threshold and "
            "checks.training_similarity is unset"
        )
    else:
        above = (
            f"{leak['above_threshold']:,} ({leak['share_above']:.1%}) above {leak['threshold']:.4f}, "
            f"{leak['threshold_source']}"
        )
    check = (
        f"check: rejects above {leak['check']} ({leak['rejected']:,} rejected)" if leak["check"] is not None
        else "check: off (checks.training_similarity unset: measured only)"
    )
    return f"{head}: {dist}; {above}; {check}"


def print_report(rep: dict[str, Any]) -> None:
    """Terminal summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console(soft_wrap=True)
    sh = rep["shards"]
    rate = rep["acceptance_rate"]
    con.print(f"[bold]{rep['out']}[/] build {rep['build_id']}")
    con.print(
        f"accepted {rep['accepted']}/{rep['target']} | shards done {sh['done']}, failed {sh['failed']}, "
        f"pending {sh['pending']} of {sh['total']}"
    )
    if rate is not None:
        con.print(f"kept {rate:.1%} of {rep['candidates']} candidates")
    con.print(f"prompts: {report_line(rep['expand'])}")
    _print_identities_and_storage(con, rep)
    con.print(leakage_line(rep["training_similarity"]), markup=False)
    t = Table(title="funnel and rejections")
    t.add_column("stage / reason")
    t.add_column("count", justify="right")
    funnel = rep["funnel"]
    for k in sorted(funnel, key=lambda k: FUNNEL_ORDER.index(k) if k in FUNNEL_ORDER else len(FUNNEL_ORDER)):
        t.add_row(k, str(funnel[k]))
    rejected = rep["rejected"]
    for k in sorted(rejected, key=lambda k: REASONS.index(k) if k in REASONS else len(REASONS)):
        t.add_row(f"rejected: {k}", str(rejected[k]))
    con.print(t)
    t = Table(title="per-AU labels vs plan (accepted samples)")
    for c in ("AU", "planned occ.", "occurrence", "planned mean int.", "mean intensity", "top co-occurring AU"):
        t.add_column(c, justify="right")
    cooc = rep["figures"]["cooccurrence"]
    cond = np.asarray(cooc["conditional"], float)
    for i, a in enumerate(rep["aus"]):
        row = cond[i].copy()
        row[i] = -1
        j = int(row.argmax())
        top = f"{cooc['aus'][j]} ({row[j]:.2f})" if row[j] > 0 else "-"
        t.add_row(
            f"AU{a['au']}",
            f"{a['target_occurrence']:.3f}",
            f"{a['occurrence']:.3f}",
            f"{a['target_mean_intensity']:.2f}",
            f"{a['mean_intensity']:.2f}",
            top,
        )
    con.print(t)
    for dim, rows in rep["balance"].items():
        t = Table(title=f"balance: {dim}")
        for c in ("group", "accepted", "planned (whole corpus)"):
            t.add_column(c, justify="right")
        for name, v in rows.items():
            t.add_row(name, str(v["accepted"]), str(v["planned"]))
        con.print(t)
    bal = rep["figures"]["balance"]
    t = Table(title="accepted: emotion x age group")
    t.add_column("emotion")
    for g in bal["age_groups"]["groups"]:
        t.add_column(g, justify="right")
    for e, row in zip(bal["emotions"], bal["age_groups"]["accepted"]):
        t.add_row(e, *map(str, row))
    con.print(t)
    thr = rep["throughput"]
    if thr["samples_per_s"]:
        con.print(f"throughput: {thr['samples_per_s']:.1f} samples/s over {thr['wall_s']:.1f} s with shards running")
    for node, v in thr["nodes"].items():
        con.print(f"  node {node}: {v['shards']} shards, {v['samples']} samples, {v['busy_s']:.1f} shard-seconds")
    if rep["failed"]:
        t = Table(title="failed shards")
        t.add_column("shard")
        t.add_column("error")
        for k, v in rep["failed"].items():
            t.add_row(k, v)
        con.print(t)
    for note in rep.get("notes", []):
        con.print(f"[yellow]note:[/] {note}")
    if rep["partial_emotions"]:
        con.print("emotions only partly expressible with DISFA's 12 AUs:")
        for e, note in rep["partial_emotions"].items():
            con.print(f"  {e}: {note}")
