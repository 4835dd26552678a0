"""Orchestration at scale, simulated: what the driver, Ray and the store spend per shard and per sample
when generating costs next to nothing, at 40, 400 and 4,000 shards (docs/scale.md reads it).

Each size is one build on a fresh embedded local Ray, in its own Python process (so the driver's
memory is that build's alone), with the exact puppet renderer at `--image-size` as the generator
(a few ms an image: the orchestration is what is left), the
shipped detectors on, `--shard-size` samples a shard and rounds of 2 x that many candidates, on
many actors for the machine: `--generators` generator actors, one detector actor and `--workers`
shard workers, their CPU shares sized to fit `--cpus`. It prints, per size:

- driver CPU: the driver process's CPU seconds over the shard window (all its threads, Ray's core
  worker included; `BuildSummary.driver_cpu_s`) per shard and per sample; and the marginal cost,
  (CPU at this size - CPU at the smallest) / (shards more), which leaves out what does not grow;
- GCS and raylet: their CPU seconds over the whole run per shard (start-up included), and marginal
  (which still holds their periodic work over the longer run: --micro measures it per second);
- scheduling latency, from the stats markers: `dispatch`, from the driver handing a shard out to
  its worker starting it (timings.submitted -> start), of a worker's second and later shards (its
  first, `cold`, waits for the worker to import the shard code: shown apart), and `turnaround`,
  from a worker finishing a shard to it starting its next (end -> next start: the commit's writes,
  the result's way back, the driver's bookkeeping and the next dispatch), median and 95th percentile;
- object store: bytes and objects created in plasma per sample (Ray inlines arguments and results
  under 100 KiB in its RPCs instead: at 64 px nothing reaches plasma);
- driver memory: resident MiB when the first shard went out and when the last came back;
- the cores other processes kept busy meanwhile (SCHED_IDLE ones aside): what this run shared.

Then how each grows from the smallest size to the largest. `--micro` adds the driver's own costs
that grow with shards in flight rather than shards: one `ray.wait` over N pending results, and one
small actor call (a progress poll) from submit to result, for N up to 4,000. `--s3` counts the
requests a build makes of an S3 store (a moto server behind tests/s3_fault_proxy.py's counting
proxy; moto[server] is in the test extra) at `--s3-shards` sizes, per shard and marginal.

Run it in a private network namespace, as the tests do:

    unshare -rn bash -c 'ip link set lo up; python bench/bench_orchestration.py --micro --s3'
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from procstat import cpu_by_name, cpu_seconds, machine_busy_seconds, tree  # noqa: E402

RAY_PROCS = ("gcs_server", "raylet")


def build_sets(a: argparse.Namespace, shards: int) -> list[str]:
    """The config of one size: the puppet generator, detectors on, many actors for --cpus; a generous
    candidate budget (a shard that ran out of it would fail the run; it changes no shard that fills)."""
    fixed = a.generators * a.generator_cpus + a.detector_cpus
    worker_cpus = int((a.cpus - fixed) / a.workers * 1000) / 1000
    if worker_cpus <= 0:
        sys.exit(f"bench_orchestration: {a.workers} shard workers do not fit {a.cpus} CPUs beside the model actors")
    return [
        "generator=puppet", f"puppet.image_size={a.image_size}", "build.max_oversample=50",
        f"build.target={shards * a.shard_size}", f"build.shard_size={a.shard_size}",
        f"plan.candidate_batch={2 * a.shard_size}", "runtime.progress=false",
        f"runtime.num_generators={a.generators}", f"runtime.generator_cpus={a.generator_cpus}",
        f"runtime.detector_cpus={a.detector_cpus}", f"runtime.max_shards_in_flight={a.workers}",
        f"runtime.shard_worker_cpus={worker_cpus}", *a.set,
    ]  # fmt: skip


def _plasma() -> tuple[int, int]:
    """(bytes, objects) created in the object store so far, over all nodes."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    st = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return int(st.cumulative_created_bytes), int(st.cumulative_created_objects)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def latencies(stats: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per shard: dispatch (submitted -> start; `cold`: a worker's first shard, which imports the shard
    code first), turnaround (end -> the same worker's next start) and duration (start -> end)."""
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        by_worker.setdefault(s.get("worker_id", ""), []).append(s)
    out: dict[str, list[float]] = {"dispatch": [], "cold": [], "turnaround": [], "duration": []}
    for runs in by_worker.values():
        runs.sort(key=lambda s: s["timings"]["start"])
        for k, s in enumerate(runs):
            t = s["timings"]
            if "submitted" in t:
                out["cold" if k == 0 else "dispatch"].append(t["start"] - t["submitted"])
            out["duration"].append(t["end"] - t["start"])
        out["turnaround"] += [b["timings"]["start"] - a["timings"]["end"] for a, b in zip(runs, runs[1:])]
    return out


def one(a: argparse.Namespace, shards: int) -> dict[str, Any]:
    """One build of `shards` shards on a fresh local Ray (this process is its driver)."""
    import ray

    from factory.config import load_config
    from factory.graph import run_build

    out = a.out or tempfile.mkdtemp(prefix=f"mifa-orch-{shards}-")
    cfg = load_config(None, build_sets(a, shards))
    ray.init(address="local", num_cpus=a.cpus, object_store_memory=a.object_store_mb * 2**20,
             include_dashboard=False, logging_level=logging.ERROR)  # fmt: skip
    try:
        me = os.getpid()
        ray_cpu0, plasma0 = cpu_by_name(me, RAY_PROCS), _plasma()
        t0, machine0, mine0 = time.time(), machine_busy_seconds(), cpu_seconds(tree(me))
        s = run_build(cfg, out, new_build=True)
        ray_cpu1, plasma1 = cpu_by_name(me, RAY_PROCS), _plasma()
        # other processes' CPU over the build (SCHED_IDLE ones aside): how much this run had to share
        others = (machine_busy_seconds() - machine0 - (cpu_seconds(tree(me)) - mine0)) / (time.time() - t0)
    finally:
        ray.shutdown()
    if not s.ok:
        sys.exit(f"bench_orchestration: the {shards}-shard build failed: {s.failed}")
    stats = [json.loads(p.read_text()) for p in (Path(out) / "shards").glob("*.stats.json")]
    lat = latencies(stats)
    return {
        "shards": s.committed,
        "samples": s.accepted,
        "candidates": s.candidates,
        "wall_s": s.seconds,
        "window_s": s.shards_seconds,
        "driver_cpu_s": s.driver_cpu_s,
        "driver_rss_mb": list(s.driver_rss_mb),
        "ray_cpu_s": {k: ray_cpu1[k] - ray_cpu0[k] for k in RAY_PROCS},
        "plasma_bytes": plasma1[0] - plasma0[0],
        "plasma_objects": plasma1[1] - plasma0[1],
        "others_cores": others,
        "latency_s": {k: [_pct(v, 0.5), _pct(v, 0.95), max(v, default=float("nan"))] for k, v in lat.items()},
        "out": out,
    }


def micro(sizes: list[int], actors: int = 16, calls: int = 2000) -> dict[str, Any]:
    """The driver's per-call costs that grow with shards in flight: ray.wait over N pending refs, and
    one small actor call (like a progress poll of a shard worker) from submit to result; and what the
    GCS and the raylet spend to start one actor (a build starts generators + detectors + workers)."""
    import ray

    @ray.remote(num_cpus=0)
    class Holder:
        def hold(self, seconds: float) -> None:
            time.sleep(seconds)

    @ray.remote(num_cpus=0)
    class Echo:
        def live(self) -> tuple[int, int, dict[str, int]]:
            return (3, 40, {"requests": 40})

        def array(self, nbytes: int) -> Any:
            import numpy as np

            return np.zeros(nbytes, np.uint8)  # over 100 KiB: into the object store

    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False,
             logging_level=logging.ERROR)  # fmt: skip
    out: dict[str, Any] = {"wait": []}
    try:
        me = os.getpid()
        before, t = cpu_by_name(me, RAY_PROCS), time.perf_counter()
        echoes = [Echo.remote() for _ in range(actors)]
        ray.get([e.live.remote() for e in echoes])
        after = cpu_by_name(me, RAY_PROCS)
        out["actor_start"] = {k: (after[k] - before[k]) / actors for k in RAY_PROCS} | {
            "wall_s": (time.perf_counter() - t) / actors, "actors": actors}
        time.sleep(2.0)  # then what they spend per second with these actors alive and idle
        before, t = cpu_by_name(me, RAY_PROCS), time.perf_counter()
        time.sleep(10.0)
        after = cpu_by_name(me, RAY_PROCS)
        out["idle_cpu_per_s"] = {k: (after[k] - before[k]) / (time.perf_counter() - t) for k in RAY_PROCS}
        t, c = time.perf_counter(), time.process_time()
        ray.get([echoes[i % len(echoes)].live.remote() for i in range(calls)])
        out["call_cpu_ms"] = (time.process_time() - c) / calls * 1e3
        out["call_wall_ms"] = (time.perf_counter() - t) / calls * 1e3
        out["plasma"] = []
        for nbytes in (256 * 2**10, 4 * 2**20):  # does the raylet (its plasma store) pay per object or per byte?
            objects = 100
            before, c = cpu_by_name(me, RAY_PROCS), time.process_time()
            for k in range(objects):
                ray.get(echoes[k % len(echoes)].array.remote(nbytes))
            after = cpu_by_name(me, RAY_PROCS)
            out["plasma"].append({"bytes": nbytes, "raylet_ms": (after["raylet"] - before["raylet"]) / objects * 1e3,
                                  "driver_ms": (time.process_time() - c) / objects * 1e3})  # fmt: skip
        for n in sizes:
            h = Holder.remote()
            refs = [h.hold.remote(3600.0 if i == 0 else 0.0) for i in range(n)]  # all wait behind the first
            time.sleep(0.5)
            reps = 200
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                ready, _ = ray.wait(refs, num_returns=1, timeout=0)
                assert not ready
            out["wait"].append({"pending": n, "wall_ms": (time.perf_counter() - t) / reps * 1e3,
                                "cpu_ms": (time.process_time() - c) / reps * 1e3})  # fmt: skip
            ray.kill(h)
    finally:
        ray.shutdown()
    return out


def s3_requests(a: argparse.Namespace, sizes: list[int]) -> list[dict[str, Any]]:
    """Requests by kind that builds of `sizes` shards make of a moto S3 server (through a counting proxy)."""
    from moto.server import ThreadedMotoServer
    from s3_fault_proxy import S3FaultProxy

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    rows = []
    try:
        with S3FaultProxy(f"http://127.0.0.1:{port}") as proxy:
            env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url}  # fmt: skip
            import s3fs

            s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=proxy.url).mkdir("bench")
            for n in sizes:
                proxy.requests.clear()
                child(a, n, env, out=f"s3://bench/orch-{n}")
                rows.append({"shards": n, "requests": dict(Counter(_s3_kind(m, p) for m, p in proxy.requests))})
    finally:
        server.stop()
    return rows


def _s3_kind(method: str, path: str) -> str:
    """The S3 API call an HTTP request is (path-style: /bucket/key?query)."""
    query = path.partition("?")[2]
    if method == "PUT":
        return "UploadPart" if "partNumber=" in query else "PutObject"
    if method == "POST":
        return "CompleteMultipartUpload" if "uploadId=" in query else (
            "CreateMultipartUpload" if "uploads" in query else "DeleteObjects" if "delete" in query else "POST")
    if method == "GET":
        return "ListMultipartUploads" if "uploads" in query else (
            "ListObjects" if "list-type" in query or "prefix=" in query else "GetObject")
    return {"HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method, method)


def child(a: argparse.Namespace, shards: int, env: dict[str, str] | None = None, out: str | None = None) -> dict:
    """Run one size in a fresh Python process; its last stdout line is the JSON of `one`."""
    cmd = [sys.executable, __file__, "--one", str(shards), *_forward(a)] + (["--out", out] if out else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"bench_orchestration: the {shards}-shard run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward(a: argparse.Namespace) -> list[str]:
    args = [f"--shard-size={a.shard_size}", f"--workers={a.workers}", f"--generators={a.generators}",
            f"--generator-cpus={a.generator_cpus}", f"--detector-cpus={a.detector_cpus}", f"--cpus={a.cpus}",
            f"--image-size={a.image_size}", f"--object-store-mb={a.object_store_mb}"]  # fmt: skip
    return args + [f"--set={kv}" for kv in a.set]


def report(rows: list[dict[str, Any]]) -> None:
    """One column per size, one row per measure, and how it grows from the first size to the last."""
    base, last = rows[0], rows[-1]

    def marginal(r: dict[str, Any], get: Any) -> float:
        more = r["shards"] - base["shards"]
        return (get(r) - get(base)) / more if more > 0 else float("nan")

    def ms(x: float) -> str:
        return f"{x * 1e3:.2f}"

    lat = lambda r, k, q: r["latency_s"][k][q]  # noqa: E731
    measures: list[tuple[str, Any, str]] = [  # (name, value of a row, how the last compares with the first)
        ("samples (candidates)", lambda r: f"{r['samples']} ({r['candidates']})", ""),
        ("wall s (shard window s)", lambda r: f"{r['wall_s']:.1f} ({r['window_s']:.1f})", ""),
        ("shards/s over the window", lambda r: f"{r['shards'] / r['window_s']:.2f}", ""),
        ("driver CPU ms/shard", lambda r: ms(r["driver_cpu_s"] / r["shards"]), "ratio"),
        ("driver CPU ms/sample", lambda r: ms(r["driver_cpu_s"] / r["samples"]), "ratio"),
        ("driver CPU ms/shard, marginal", lambda r: ms(marginal(r, lambda x: x["driver_cpu_s"])), ""),
        ("GCS CPU ms/shard (run)", lambda r: ms(r["ray_cpu_s"]["gcs_server"] / r["shards"]), "ratio"),
        ("GCS CPU ms/shard, marginal", lambda r: ms(marginal(r, lambda x: x["ray_cpu_s"]["gcs_server"])), ""),
        ("raylet CPU ms/shard (run)", lambda r: ms(r["ray_cpu_s"]["raylet"] / r["shards"]), "ratio"),
        ("raylet CPU ms/shard, marginal", lambda r: ms(marginal(r, lambda x: x["ray_cpu_s"]["raylet"])), ""),
        ("dispatch ms p50/p95", lambda r: f"{ms(lat(r, 'dispatch', 0))}/{ms(lat(r, 'dispatch', 1))}", "ratio"),
        ("dispatch ms, cold, p50", lambda r: ms(lat(r, "cold", 0)), ""),
        ("turnaround ms p50/p95", lambda r: f"{ms(lat(r, 'turnaround', 0))}/{ms(lat(r, 'turnaround', 1))}", "ratio"),
        ("shard duration ms p50", lambda r: ms(lat(r, "duration", 0)), "ratio"),
        ("plasma bytes/sample", lambda r: f"{r['plasma_bytes'] / r['samples']:.0f}", ""),
        ("plasma objects/shard", lambda r: f"{r['plasma_objects'] / r['shards']:.1f}", ""),
        ("driver MiB first -> last shard", lambda r: f"{r['driver_rss_mb'][0]:.0f} -> {r['driver_rss_mb'][1]:.0f}",
         "delta"),
        ("other processes' cores busy", lambda r: f"{r['others_cores']:.2f}", ""),
    ]  # fmt: skip
    width = max(len(m[0]) for m in measures)
    head = "".join(f"{str(r['shards']) + ' shards':>18}" for r in rows)
    print(f"{'':<{width}}{head}   {base['shards']} -> {last['shards']}")
    for name, get, grow in measures:
        cells = "".join(f"{get(r):>18}" for r in rows)
        g = ""
        if grow == "ratio" and last is not base:
            a, b = (float(get(x).split("/")[0]) for x in (base, last))
            g = f"x{b / a:.2f}" if a > 0 else ""
        elif grow == "delta" and last is not base:
            d = [r["driver_rss_mb"][1] - r["driver_rss_mb"][0] for r in (base, last)]
            g = f"{d[1] - d[0]:+.1f} MiB growth"
        print(f"{name:<{width}}{cells}   {g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="40,400,4000", help="comma-separated build sizes in shards")
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=16, help="shard workers (runtime.max_shards_in_flight)")
    ap.add_argument("--generators", type=int, default=2)
    ap.add_argument("--generator-cpus", type=float, default=0.25)
    ap.add_argument("--detector-cpus", type=float, default=0.25)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    ap.add_argument("--image-size", type=int, default=64, choices=(64, 128, 256))
    ap.add_argument("--object-store-mb", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--micro", action="store_true", help="also the driver's costs per shard in flight")
    ap.add_argument("--s3", action="store_true", help="also count S3 requests (moto server)")
    ap.add_argument("--s3-shards", default="10,40")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one size, JSON on stdout
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the moto server's request lines
    if a.one is not None:
        print(json.dumps(one(a, a.one)))
        return

    sizes = [int(x) for x in a.shards.split(",")]
    print(f"orchestration: puppet generator at {a.image_size} px, detectors on, {a.shard_size} "
          f"samples a shard; {a.generators} generator actors, 1 detector actor, {a.workers} shard workers on a local "
          f"Ray of {a.cpus} CPUs; --set {' '.join(a.set) or '-'}")  # fmt: skip
    rows = []
    for n in sizes:
        rows.append(child(a, n))
        r = rows[-1]
        print(f"  {n} shards: {r['samples']} samples ({r['candidates']} candidates) in {r['wall_s']:.1f} s", flush=True)
    report(rows)
    if a.micro:
        m = micro([40, 400, 4000])
        st = m["actor_start"]
        print(f"driver per shard in flight: one small actor call (a progress poll) {m['call_cpu_ms']:.3f} ms of driver "
              f"CPU ({m['call_wall_ms']:.3f} ms wall each, {2000} in a batch); ray.wait(num_returns=1) over N pending: "
              + ", ".join(f"N={w['pending']} {w['wall_ms']:.3f} ms ({w['cpu_ms']:.3f} ms CPU)" for w in m["wait"]))
        print("one object through the object store (an actor's result, read by the driver): " + ", ".join(
            f"{o['bytes'] / 2**10:.0f} KiB: raylet {o['raylet_ms']:.2f} ms CPU, driver {o['driver_ms']:.2f} ms CPU"
            for o in m["plasma"]))  # fmt: skip
        idle = m["idle_cpu_per_s"]
        print(f"starting an actor ({st['actors']} at once): GCS {st['gcs_server'] * 1e3:.1f} ms CPU, raylet "
              f"{st['raylet'] * 1e3:.1f} ms CPU, {st['wall_s'] * 1e3:.0f} ms wall each; with them alive and idle, "
              f"GCS {idle['gcs_server'] * 1e3:.1f} ms CPU/s, raylet {idle['raylet'] * 1e3:.1f} ms CPU/s")  # fmt: skip
    if a.s3:
        s3 = s3_requests(a, [int(x) for x in a.s3_shards.split(",")])
        kinds = sorted({k for r in s3 for k in r["requests"]})
        print("S3 requests of a build (moto), by kind: " + ", ".join(
            f"{r['shards']} shards: " + " ".join(f"{k}={r['requests'].get(k, 0)}" for k in kinds) for r in s3))  # fmt: skip
        lo, hi = s3[0], s3[-1]
        if hi["shards"] > lo["shards"]:
            per = {k: (hi["requests"].get(k, 0) - lo["requests"].get(k, 0)) / (hi["shards"] - lo["shards"]) for k in kinds}
            print(f"  marginal per shard: {sum(per.values()):.1f} requests: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in per.items() if v))  # fmt: skip


if __name__ == "__main__":
    main()
