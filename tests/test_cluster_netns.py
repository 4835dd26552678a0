"""A multi-host Ray cluster in network namespaces: node loss, link loss and head loss mid-build.

Each host is a network namespace the test creates (`ip netns add`), joined to the test's own
namespace by a veth pair on a bridge, with a private address (10.203.0.0/24) that exists only
in these namespaces. A Ray head runs in h0, workers in the others; jobs go in from outside with
`ray job submit --working-dir`. All hosts share the filesystem, which stands for shared storage.
Everything (Ray processes by pid, namespaces, veths, bridge) is torn down at the end. The hosts
are tests/netns_lab.py's Lab, which bench/bench_cluster_scaling.py uses too.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import FAST, factory, shard_stats
from netns_lab import CpuCap, Lab, copy_sources, ip, netns_usable, wait

pytestmark = pytest.mark.cluster

#: Build of the loss tests: enough shards that a kill lands mid-build, several in flight so the
#: worker gets some. runtime.* keys may differ between a build and its resume.
TARGET, SHARD = 1200, 40
LOSS_BUILD = [*FAST, "--set", "runtime.max_shards_in_flight=4"]


@pytest.fixture
def lab(tmp_path) -> Iterator[Callable[[int], Lab]]:
    """Make a Lab of N hosts (call it once); torn down at the end, even on failure."""
    if os.environ.get("MIFA_IN_NETNS") != "1":
        pytest.skip("run through tests/run.sh: the hosts' addresses must live in a private network namespace")
    why = netns_usable()
    if why:
        pytest.skip(why)
    made: list[Lab] = []

    def make(n_hosts: int) -> Lab:
        lab = Lab(n_hosts, secrets.token_hex(16), tmp_path)
        made.append(lab)
        lab.setup()
        return lab

    try:
        yield make
    finally:
        for lab in made:
            lab.teardown()


@pytest.fixture
def working_dir(tmp_path) -> Path:
    """What the job ships with `--working-dir` (see netns_lab.copy_sources)."""
    return copy_sources(tmp_path / "wd")


def _build_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factory.cli", "build", "--target", str(TARGET), "--shard-size", str(SHARD),
            "--out", str(out), *LOSS_BUILD, *extra]  # fmt: skip


def _check_corpus(out: Path) -> dict[str, dict]:
    """verify passes, every shard is whole (tar + parquet + marker, no temporary file), no key twice."""
    v = factory("verify", str(out), timeout=300)
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    stats = shard_stats(out)
    assert len(stats) == -(-TARGET // SHARD)
    shards = out / "shards"
    assert {p.stem for p in shards.glob("*.tar")} == set(stats) == {p.stem for p in shards.glob("*.parquet")}
    keys = [k for p in sorted(shards.glob("*.parquet")) for k in pq.read_table(p, columns=["key"])["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == TARGET
    # A writer killed mid-shard leaves its temporary files (never a final name). The build sweeps
    # them at its end when it lost a shard worker, but a cut-off host may still be writing then;
    # the next resume removes what is left (clean_uncommitted).
    leftovers = sorted(p.name for p in shards.iterdir() if p.name.startswith(".tmp-"))
    if leftovers:
        print("temporary files of killed writers:", leftovers)
        r = factory("resume", str(out), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not [p.name for p in shards.iterdir() if p.name.startswith(".tmp-")]
        assert shard_stats(out) == stats
    return stats


def _cluster(lab: Callable[[int], Lab]) -> Lab:
    """Head h0 (no CPUs) and two workers h1, h2 (2 CPUs each): either worker can carry the build alone."""
    cl = lab(3)
    cl.start_head()
    cl.start_worker(1)
    cl.start_worker(2)
    return cl


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_job_submit_runs_on_worker_hosts(lab, working_dir, tmp_path):
    """A job submitted from outside runs its shards on the worker hosts; the manifest names each node.

    Shard workers sit beside the generators, so the build asks for two generators, sized so that
    two never fit on one 2-CPU host: one per host, each with its own shard workers."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    two = ["runtime.num_generators=2", "runtime.generator_cpus=1.2", "runtime.detector_cpus=0.3",
           "runtime.shard_worker_cpus=0.1"]  # fmt: skip
    sid = cl.submit(working_dir, *_build_cmd(out, *[a for kv in two for a in ("--set", kv)]))
    status = cl.wait_job(sid, 300)
    assert status == "SUCCEEDED", cl.job_logs(sid)[-4000:]
    stats = _check_corpus(out)
    ips = {s["node_ip"] for s in stats.values()}
    print("shards per node:", {ip: sum(s["node_ip"] == ip for s in stats.values()) for ip in ips})
    assert ips == {cl.addr(1), cl.addr(2)}, ips
    assert all(s["attempt"] == 1 and s["node_id"] for s in stats.values())
    # the 4 shards in flight ran on 4 shard workers that lived for the whole build
    assert len({s["worker_id"] for s in stats.values()}) == 4


class Fault:
    """Strikes a worker once the build is under way: at least MIN_DONE shards committed, one of them
    by this worker, and a shard task running on it right now (so a shard is lost in flight)."""

    MIN_DONE = 3

    def __init__(self, cl: Lab, out: Path, action: Callable[[int], None], workers: tuple[int, ...] = (1, 2)):
        self.cl, self.out, self.action, self.workers = cl, out, action, workers
        self.victim: int | None = None
        self.at = 0.0
        self.done_before: dict[str, dict] = {}

    def __call__(self) -> None:
        if self.victim is not None:
            return
        done = shard_stats(self.out) if (self.out / "shards").is_dir() else {}
        if len(done) < self.MIN_DONE:
            return
        for i in self.workers:
            if any(s["node_ip"] == self.cl.addr(i) for s in done.values()) and self.cl.running_shard_task(i):
                self.at = time.time()
                self.action(i)
                self.victim = i
                self.done_before = done
                print(f"struck h{i} with {len(done)} shards committed")
                return


def _finish(cl: Lab, sid: str, out: Path, working_dir: Path, fault: Fault) -> tuple[str, bool]:
    """Run the job with the fault; it finishes on the remaining nodes, or `factory resume OUT` on
    them finishes it. Returns the build job's log and whether a resume was needed."""
    status = cl.wait_job(sid, 300, during=fault)
    logs = cl.job_logs(sid)
    if status != "SUCCEEDED":
        print(f"job {status}; resuming\n{logs[-2000:]}")
        rid = cl.submit(working_dir, sys.executable, "-m", "factory.cli", "resume", str(out))
        rstatus = cl.wait_job(rid, 300)
        assert rstatus == "SUCCEEDED", cl.job_logs(rid)[-4000:]
    return logs, status != "SUCCEEDED"


def _check_node_loss(cl: Lab, fault: Fault, stats: dict[str, dict], logs: str, dead: bool, resumed: bool) -> None:
    """Where each shard was built and how often, as the markers and the driver's log record it.

    The victim built shards before the loss and started none after it; the driver saw the shards
    it had in flight fail and re-ran them on the survivor with attempt + 1. A killed host (`dead`)
    commits nothing after the kill. A cut-off host is only partitioned: its in-flight tasks may
    still finish and commit the same bytes to the shared storage (the last marker wins), which is
    why those shards may carry the victim's node and attempt 1. A shard redone by a resume
    (the build job failed) starts again at attempt 1.
    """
    assert fault.victim is not None, "the build ended before the fault could strike (make it longer)"
    victim, survivor = cl.addr(fault.victim), cl.addr(3 - fault.victim)
    per_node = {ip: sorted(n for n, s in stats.items() if s["node_ip"] == ip) for ip in (victim, survivor)}
    print("per node:", {ip: len(v) for ip, v in per_node.items()}, "| attempts > 1:",
          {n: s["attempt"] for n, s in stats.items() if s["attempt"] > 1})  # fmt: skip
    assert per_node[victim] and len(per_node[victim]) + len(per_node[survivor]) == len(stats)
    started_after = [n for n, s in stats.items() if s["timings"]["start"] > fault.at + 1.0]
    assert started_after and all(stats[n]["node_ip"] == survivor for n in started_after)
    if dead:
        assert all(stats[n]["timings"]["end"] < fault.at for n in per_node[victim])
    failed = {m[0]: int(m[1]) for m in re.findall(r"shard (mifa-\d+) attempt (\d+) failed", logs)}
    assert failed, logs[-3000:]  # the driver saw the loss
    for name, attempt in failed.items():
        s = stats[name]
        redone = s["node_ip"] == survivor and (s["attempt"] > attempt or resumed)
        assert redone or (not dead and s["node_ip"] == victim and s["attempt"] == attempt), (name, attempt, s)
    if dead and not resumed:
        assert all(stats[n]["attempt"] >= 2 for n in failed)


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_worker_killed_mid_build(lab, working_dir, tmp_path):
    """SIGKILL every process of a worker host mid-build: its in-flight shard is redone on the other one."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, cl.kill_host)
    sid = cl.submit(working_dir, *_build_cmd(out))
    logs, resumed = _finish(cl, sid, out, working_dir, fault)
    stats = _check_corpus(out)
    _check_node_loss(cl, fault, stats, logs, dead=True, resumed=resumed)


@pytest.mark.slow
def test_worker_link_cut_mid_build(lab, working_dir, tmp_path):
    """Cut a worker host's link mid-build (its processes live on, unreachable): the head declares it
    dead after the health checks and its in-flight shard is redone on the other worker.

    Slow (about 70 s; `bash tests/run.sh -m slow`): beyond test_worker_killed_mid_build it checks
    Ray's health-check partition path; the default suite keeps its 15 minutes."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, lambda i: ip("link", "set", cl.veth(i), "down"))
    sid = cl.submit(working_dir, *_build_cmd(out))
    logs, resumed = _finish(cl, sid, out, working_dir, fault)
    assert fault.victim is not None
    # the cut-off host is gone for good: stop its processes before reading the corpus
    cl.kill_host(fault.victim)
    stats = _check_corpus(out)
    _check_node_loss(cl, fault, stats, logs, dead=False, resumed=resumed)


@pytest.mark.slow
def test_head_killed_then_resume_on_new_cluster(lab, working_dir, tmp_path):
    """SIGKILL the head (GCS, dashboard, the job's driver) mid-build; the old workers go too. A new
    cluster's `factory resume OUT` completes the same corpus and leaves the committed shards alone.

    Slow (80 s, two clusters; `bash tests/run.sh -m slow`): the default suite keeps its 15 minutes."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, lambda i: cl.kill_host(0))  # strikes the head once a worker is busy
    cl.submit(working_dir, *_build_cmd(out))
    wait(lambda: fault() or fault.victim is not None, 300, "the build to get under way")
    cl.kill_host(1)
    cl.kill_host(2)
    before = shard_stats(out)
    assert len(before) < -(-TARGET // SHARD), "the build finished before the head was killed"
    build_json = (out / "build.json").read_text()

    cl.start_head()
    cl.start_worker(1)
    cl.start_worker(2)
    rid = cl.submit(working_dir, sys.executable, "-m", "factory.cli", "resume", str(out))
    status = cl.wait_job(rid, 300)
    logs = cl.job_logs(rid)
    assert status == "SUCCEEDED", logs[-4000:]
    assert (out / "build.json").read_text() == build_json
    stats = _check_corpus(out)
    assert {n: stats[n] for n in before} == before  # committed shards were kept, not redone
    assert f"{len(before)} committed" in logs, logs[-2000:]


def test_cpu_cap_limits_and_counts_a_host(tmp_path):
    """The scaling bench's per-host CPU cap (netns_lab.CpuCap): a process that spins for 1.5 s
    under a 0.25-CPU cap gets about 0.375 CPU-s, and the group counts that and its throttling."""
    if os.geteuid() != 0:
        pytest.skip("cgroups need root")
    try:
        cap = CpuCap(f"mifa-test-{os.getpid()}", 0.25)
    except (OSError, RuntimeError) as err:
        pytest.skip(f"no writable cgroup cpu controller here: {err}")
    try:
        spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
        p = subprocess.run(cap.wrap([sys.executable, "-c", spin]), capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        used, throttled = cap.usage()
        assert 0.05 < used < 0.6, used  # uncapped it would be ~1.5 CPU-s
        assert throttled > 0.2, throttled  # ~1.1 s on an idle machine
    finally:
        cap.remove()
    assert not any(d.exists() for d in cap.dirs)
