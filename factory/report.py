"""`factory report OUT`: where a build stands and whether its corpus looks as planned.

Reads only build.json, the commit markers and failure records (O(shards), never the samples),
so it is fast on a million-sample corpus and safe while a build is still running.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from pipelines.facs import AUS, EMOTIONS

from .manifest import open_build
from .stages import FUNNEL_ORDER, REASONS


def build_report(out: str) -> dict[str, Any]:
    b = open_build(out)
    record, plan, state = b.record, b.plan, b.state
    stats = list(state.committed.values())
    accepted = sum(int(s["samples"]) for s in stats)
    candidates = sum(int(s["candidates"]) for s in stats)

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
            b = balance.setdefault(dim, {})
            for name, n in s[dim].items():
                b.setdefault(name, {"accepted": 0, "planned": 0})["accepted"] += int(n)
        for k, v in s.get("expand", {}).items():
            if isinstance(v, (int, float)):
                expand[k] += v
        node = by_node[s.get("node", "?")]
        node["samples"] += int(s["samples"])
        node["shards"] += 1
        node["busy_s"] += float(s["timings"]["end"] - s["timings"]["start"])
    # The plan's balance over the whole corpus (not only what is committed so far).
    summary = plan.summary()
    for dim in ("emotions", "skin_groups", "age_groups"):
        b = balance.setdefault(dim, {})
        for name, n in summary[dim].items():
            b.setdefault(name, {"accepted": 0, "planned": 0})["planned"] = int(n)

    n = max(accepted, 1)
    aus = [
        {
            "au": au,
            "target_occurrence": per_au["target_occ"][i] / n,
            "occurrence": per_au["occ"][i] / n,
            "target_mean_intensity": per_au["target_int"][i] / n,
            "mean_intensity": per_au["int"][i] / n,
        }
        for i, au in enumerate(AUS)
    ]
    if stats:
        t_start = min(s["timings"]["start"] for s in stats)
        t_end = max(s["timings"]["end"] for s in stats)
        wall = max(t_end - t_start, 1e-9)
    else:
        wall = 0.0
    committed_names = set(state.committed)
    failed = {k: v.get("error", "?") for k, v in state.failed.items() if k not in committed_names}
    return {
        "out": out,
        "build_id": record["build_id"],
        "target": plan.target,
        "accepted": accepted,
        "shards": {
            "total": plan.num_shards,
            "done": len(stats),
            "failed": len(failed),
            "pending": plan.num_shards - len(stats) - len(failed),
        },
        "failed": failed,
        "candidates": candidates,
        "acceptance_rate": accepted / candidates if candidates else None,
        "funnel": dict(funnel),
        "rejected": dict(rejected),
        "aus": aus,
        "balance": balance,
        "partial_emotions": {e: p.note for e, p in EMOTIONS.items() if p.partial},
        "expand": dict(expand),
        "throughput": {
            "samples_per_s": accepted / wall if wall else None,
            "wall_s": wall,
            "nodes": {k: dict(v) for k, v in by_node.items()},
        },
    }


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
    for c in ("AU", "planned occ.", "occurrence", "planned mean int.", "mean intensity"):
        t.add_column(c, justify="right")
    for a in rep["aus"]:
        t.add_row(
            f"AU{a['au']}",
            f"{a['target_occurrence']:.3f}",
            f"{a['occurrence']:.3f}",
            f"{a['target_mean_intensity']:.2f}",
            f"{a['mean_intensity']:.2f}",
        )
    con.print(t)
    for dim, rows in rep["balance"].items():
        t = Table(title=f"balance: {dim}")
        for c in ("group", "accepted", "planned (whole corpus)"):
            t.add_column(c, justify="right")
        for name, v in rows.items():
            t.add_row(name, str(v["accepted"]), str(v["planned"]))
        con.print(t)
    thr = rep["throughput"]
    if thr["samples_per_s"]:
        con.print(f"throughput: {thr['samples_per_s']:.1f} samples/s over {thr['wall_s']:.1f} s")
    for node, v in thr["nodes"].items():
        con.print(f"  node {node}: {v['shards']} shards, {v['samples']} samples, {v['busy_s']:.1f} shard-seconds")
    if rep["failed"]:
        t = Table(title="failed shards")
        t.add_column("shard")
        t.add_column("error")
        for k, v in rep["failed"].items():
            t.add_row(k, v)
        con.print(t)
    if rep["partial_emotions"]:
        con.print("emotions only partly expressible with DISFA's 12 AUs:")
        for e, note in rep["partial_emotions"].items():
            con.print(f"  {e}: {note}")
