"""Cluster scaling: the same build on 1 and on 2 worker hosts, and how busy its actors were.

Hosts are network namespaces (tests/netns_lab.py, the cluster tests' Lab): a head h0 with 0
task CPUs, and worker hosts that offer Ray 1 CPU each. Each host's Ray processes share one CPU
cgroup capped at `--host-cpu` CPUs (`--head-cpu` for the head's GCS, dashboard and job driver),
so that every host has its own CPU as separate machines would, and the caps add up to no more
than the machine has (on 2 cores: 0.6 + 0.6 + 0.8). Without caps, three hosts on two cores
share a core and the ratio measures that contention, not scaling. `--cores` pins the worker
hosts to cores as well. The same build (`python -m factory.cli build --target N ...`, submitted
from outside with `ray job submit --working-dir`, token auth) runs first with 1 worker host, then
with 2 into a fresh OUT. Each host gets one generator actor and one detector actor (their CPU
shares are sized so that two never fit on one host) and two shard workers.

Prints, for each run: wall time (submit to end), the build's shard window (first shard
submitted to last shard finished), accepted samples/s over both; then throughput(2)/throughput(1)
and scaling efficiency = ratio / 2; and each generator and detector actor's busy fraction as the build
reports it (seconds in generate() / shard window). A measured ratio of this one run, not a
test; other load on the machine distorts it.

Needs root (ip netns, veths, a bridge, cgroups); it re-runs itself in a private network
namespace (unshare -n) so the hosts' addresses exist nowhere else. Everything is torn down at
the end by process id, also on Ctrl-C or an error.

    sudo .venv/bin/python bench/bench_cluster_scaling.py [--target 4000] [--shard-size 100] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from netns_lab import Lab, copy_sources, netns_usable  # noqa: E402

#: Per host: a generator (0.6) and a detector (0.3) fit one 1-CPU host, two generators or two
#: detectors beside a generator do not, so each host gets one of each; 0.1 left is 2 shard workers.
#: runtime.* keys do not change the corpus: both runs build the same samples.
RUNTIME = ["runtime.generator_cpus=0.6", "runtime.detector_cpus=0.3", "runtime.shard_worker_cpus=0.05",
           "runtime.progress=false"]  # fmt: skip
DEFAULT_SET = ["generator=puppet"]


@dataclass
class Run:
    hosts: int
    wall_s: float = 0.0
    status: str = ""
    accepted: int = 0
    build_s: float = 0.0
    shards_s: float = 0.0
    actors: list[str] = field(default_factory=list)  # busy lines of the generator and detector actors
    shards_per_node: dict[str, int] = field(default_factory=dict)
    cpu: dict[int, tuple[float, float]] = field(default_factory=dict)  # host -> (CPU s used, s throttled)
    log: str = ""

    def rate(self, seconds: float) -> float:
        return self.accepted / seconds if seconds > 0 else 0.0


def _reexec_in_private_netns() -> None:
    """Root in the host's namespace: run again inside a new network namespace (only loopback)."""
    if os.environ.get("MIFA_IN_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        return
    if not shutil.which("unshare"):
        sys.exit("bench_cluster_scaling: needs unshare (util-linux) to make a private network namespace")
    os.execvp("unshare", ["unshare", "-n", "env", "MIFA_IN_NETNS=1", sys.executable, *sys.argv])


def _start(lab: Lab, host: int, start: Callable[[], None], tries: int = 3) -> None:
    """Start a Ray node; on a busy machine its raylet can miss Ray's fixed 30 s registration
    deadline and `ray start` exits, so kill what is left on that host and try again."""
    for attempt in range(1, tries + 1):
        t = time.time()
        try:
            start()
        except (AssertionError, RuntimeError) as err:
            lab.kill_host(host)
            if attempt == tries:
                raise
            print(f"h{host}: {err}; retrying ({attempt}/{tries})", flush=True)
            continue
        print(f"h{host} up in {time.time() - t:.0f} s", flush=True)
        return


def _parse(run: Run, log: str) -> None:
    """The build's CLI summary: accepted samples, build seconds, shard window, busy per generator."""
    m = re.search(r"shards, (\d+)/\d+ samples \(\d+ shards were already done\) in ([\d.]+) s", log)
    if m:
        run.accepted, run.build_s = int(m[1]), float(m[2])
    m = re.search(r"shards ran ([\d.]+) s", log)
    if m:
        run.shards_s = float(m[1])
    run.actors = [ln.strip() for ln in log.splitlines() if re.match(r"\s+(generator|detector) \d+ busy ", ln)]


def _shards_per_node(out: Path) -> dict[str, int]:
    per: dict[str, int] = {}
    for p in (out / "shards").glob("*.stats.json"):
        ip = json.loads(p.read_text()).get("node_ip", "?")
        per[ip] = per.get(ip, 0) + 1
    return dict(sorted(per.items()))


def _build(lab: Lab, wd: Path, out: Path, hosts: int, a: argparse.Namespace) -> Run:
    sets = [*DEFAULT_SET, *RUNTIME, f"runtime.num_generators={hosts}", f"runtime.num_detectors={hosts}", *a.set]
    cmd = [sys.executable, "-m", "factory.cli", "build", "--target", str(a.target), "--shard-size",
           str(a.shard_size), "--out", str(out), *(x for s in sets for x in ("--set", s))]  # fmt: skip
    run = Run(hosts)
    print(f"[{hosts} worker host(s)] submitting: {' '.join(cmd[1:])}", flush=True)
    before = {h: cap.usage() for h, cap in lab.caps.items()}
    t = time.time()
    sid = lab.submit(wd, *cmd)
    try:
        run.status = lab.wait_job(sid, a.timeout)
    except AssertionError:  # still running after --timeout; the teardown stops it
        run.status = f"TIMEOUT ({a.timeout:.0f} s)"
    run.wall_s = time.time() - t
    after = {h: cap.usage() for h, cap in lab.caps.items()}
    run.cpu = {h: (after[h][0] - before.get(h, (0, 0))[0], after[h][1] - before.get(h, (0, 0))[1]) for h in after}
    run.log = lab.job_logs(sid)
    _parse(run, run.log)
    run.shards_per_node = _shards_per_node(out) if (out / "shards").is_dir() else {}
    if run.status != "SUCCEEDED":
        print(f"[{hosts} worker host(s)] job {run.status}; its log ends:\n{run.log[-3000:]}", flush=True)
    return run


def _report(runs: list[Run], a: argparse.Namespace, cores: list[int] | None) -> None:
    pins = f"worker cores {cores[:len(runs)]}" if cores else "unpinned"
    print(f"\ncluster scaling: target {a.target}, shard size {a.shard_size}, --set {' '.join(a.set) or '-'}; "
          f"CPU caps: {a.host_cpu} per worker host, {a.head_cpu} head (0 task CPUs); {pins}")  # fmt: skip
    for r in runs:
        print(f"  {r.hosts} worker host(s): {r.status}, {r.accepted} accepted | wall {r.wall_s:.1f} s -> "
              f"{r.rate(r.wall_s):.1f} samples/s | shard window {r.shards_s:.1f} s -> {r.rate(r.shards_s):.1f} "
              f"samples/s | build {r.build_s:.1f} s | shards per node {r.shards_per_node}")  # fmt: skip
        for g in r.actors or ["(no busy lines in the job's log)"]:
            print(f"      {g}")
        for h, (used, throttled) in sorted(r.cpu.items()):
            cap = a.head_cpu if h == 0 else a.host_cpu
            print(f"      h{h} ({'head' if h == 0 else 'worker'}, cap {cap} CPU): {used:.1f} CPU s = "
                  f"{used / r.wall_s / cap:.0%} of its cap over the wall, throttled {throttled:.1f} s")  # fmt: skip
    if len(runs) == 2 and all(r.status == "SUCCEEDED" and r.accepted for r in runs):
        one, two = runs
        for what, s1, s2 in (("shard window", one.shards_s, two.shards_s), ("wall", one.wall_s, two.wall_s)):
            ratio = two.rate(s2) / one.rate(s1) if one.rate(s1) else 0.0
            print(f"  throughput(2)/throughput(1) over the {what}: {ratio:.2f}; scaling efficiency {ratio / 2:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", type=int, default=4000, help="accepted samples per build")
    ap.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"extra config override for both builds (after {' '.join(DEFAULT_SET + RUNTIME)})")
    ap.add_argument("--host-cpu", type=float, default=0.6, help="CPU cap of each worker host (cgroup quota)")
    ap.add_argument("--head-cpu", type=float, default=0.8, help="CPU cap of the head host (cgroup quota)")
    ap.add_argument("--cores", default=None, help="also pin worker hosts 1 and 2 to these cores, e.g. 0,1")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one build may take")
    ap.add_argument("--start-tries", type=int, default=3, help="tries to start each Ray node (busy machines)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs and Ray logs (path printed)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_cluster_scaling: must run as root (ip netns, veth pairs, a bridge); "
                 "e.g. sudo .venv/bin/python bench/bench_cluster_scaling.py")  # fmt: skip
    _reexec_in_private_netns()
    why = netns_usable()
    if why:
        sys.exit(f"bench_cluster_scaling: cannot make network namespaces here: {why}")
    avail = sorted(os.sched_getaffinity(0))
    cores = [int(c) for c in a.cores.split(",")] if a.cores else None
    if cores is not None and (len(cores) < 2 or len(set(cores)) < 2 or not set(cores) <= set(avail)):
        sys.exit(f"bench_cluster_scaling: --cores needs 2 distinct usable cores (have {avail}, got {a.cores})")
    if 2 * a.host_cpu + a.head_cpu > len(avail) + 1e-9:
        sys.exit(f"bench_cluster_scaling: CPU caps 2 x {a.host_cpu} + {a.head_cpu} exceed the {len(avail)} cores here")

    # SIGTERM/SIGHUP end the run like Ctrl-C does: through the finally below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="mifa-scaling-"))
    # a busy machine starts Ray slowly: give the head's dashboard (Ray's default: 60 s) and the
    # workers more time than the tests do rather than fail before measuring
    os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    lab = Lab(3, secrets.token_hex(16), work)
    lab.start_timeout = 300
    runs: list[Run] = []
    error = ""
    try:
        wd = copy_sources(work / "wd")
        lab.setup()
        _start(lab, 0, lambda: lab.start_head(cpu_cap=a.head_cpu), a.start_tries)
        for hosts in (1, 2):
            pinned = str(cores[hosts - 1]) if cores else None
            start = lambda: lab.start_worker(hosts, cpus=1, cores=pinned, cpu_cap=a.host_cpu)  # noqa: B023, E731
            _start(lab, hosts, start, a.start_tries)
            runs.append(_build(lab, wd, work / f"out{hosts}", hosts, a))
            if runs[-1].status != "SUCCEEDED":
                break
    except KeyboardInterrupt:
        error = "interrupted"
    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as err:
        error = str(err)
    finally:
        lab.teardown()
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    _report(runs, a, cores)
    if error:
        sys.exit(f"bench_cluster_scaling: {error} (everything torn down)")
    if len(runs) < 2 or any(r.status != "SUCCEEDED" for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
