"""A multi-host Ray cluster in network namespaces: node loss, link loss and head loss mid-build.

Each host is a network namespace the test creates (`ip netns add`), joined to the test's own
namespace by a veth pair on a bridge, with a private address (10.203.0.0/24) that exists only
in these namespaces. A Ray head runs in h0, workers in the others; jobs go in from outside with
`ray job submit --working-dir`. All hosts share the filesystem, which stands for shared storage.
Everything (Ray processes by pid, namespaces, veths, bridge) is torn down at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import FAST, ROOT, factory

pytestmark = pytest.mark.cluster

RAY = str(Path(sys.executable).with_name("ray"))
NET = "10.203.0"
GCS_PORT, DASH_PORT = 6379, 8265
# A cut link sends no FIN or RST: only timeouts notice it. The head declares a silent node dead
# after ~4 s of missed health checks (default ~30 s); a raylet that lost its head gives up after
# 15 s (default 60 s); and gRPC keepalive pings every 3 s fail the driver's call into a task on
# the cut-off node. Without the keepalive the GCS marks the node dead but the driver's in-flight
# shard tasks there stay RUNNING and the build hangs (seen here: > 5 min; cf. ray-project/ray#44692).
# Set for every `ray start`, so the job's driver (a child of the head) inherits them too.
RAY_FAST_FAILURE = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "15",
    "RAY_grpc_client_keepalive_time_ms": "3000",
    "RAY_grpc_client_keepalive_timeout_ms": "3000",
    "RAY_grpc_keepalive_time_ms": "3000",
    "RAY_grpc_keepalive_timeout_ms": "3000",
}
#: Build of the loss tests: enough shards that a kill lands mid-build, several in flight so the
#: worker gets some. runtime.* keys may differ between a build and its resume.
TARGET, SHARD = 1200, 40
LOSS_BUILD = [*FAST, "--set", "runtime.max_shards_in_flight=4"]


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


class Lab:
    """Hosts h0..hN-1 (network namespaces) on one bridge; Ray nodes started and killed per host."""

    def __init__(self, n_hosts: int, token: str, workdir: Path):
        self.prefix = f"mifa{os.getpid() % 10_000_000}"  # <= 15 chars for every interface name
        self.token = token
        self.workdir = workdir
        self.bridge = f"{self.prefix}br"
        self.hosts = [f"{self.prefix}h{i}" for i in range(n_hosts)]
        self.procs: dict[str, list[subprocess.Popen]] = {h: [] for h in self.hosts}
        self.created: list[str] = []  # namespaces, for teardown
        self.starts = 0

    def setup(self) -> None:
        """Bridge in the test's namespace; per host a namespace, a veth pair, lo and eth0 up."""
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{NET}.254/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.hosts):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
            self.created.append(ns)
            veth, peer = self.veth(i), f"{self.prefix}p{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("link", "set", peer, "name", "eth0", ns=ns)
            _ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)

    def veth(self, i: int) -> str:
        return f"{self.prefix}v{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{NET}.{i + 1}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.addr(0)}:{DASH_PORT}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **RAY_FAST_FAILURE}
        for k in ("RAY_ADDRESS", "MIFA_FAULTS", "MIFA_INJECT"):
            env.pop(k, None)
        return env

    def _start(self, i: int, cpus: int, args: list[str]) -> None:
        self.starts += 1
        # short, per-start temp dir: Ray's unix socket paths must stay under ~107 characters
        tmp = Path(f"/tmp/{self.prefix}/{self.starts}")
        tmp.mkdir(parents=True)
        cmd = ["ip", "netns", "exec", self.hosts[i], RAY, "start", "--block", f"--node-ip-address={self.addr(i)}",
               f"--num-cpus={cpus}", "--object-store-memory=120000000", "--disable-usage-stats",
               f"--temp-dir={tmp}", *args]  # fmt: skip
        with open(self.workdir / f"ray-h{i}-{self.starts}.log", "wb") as log:
            p = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[self.hosts[i]].append(p)

    def start_head(self) -> None:
        # no CPUs on the head: it runs the GCS, the dashboard and the job drivers; all work goes to workers
        self._start(0, 0, ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                        f"--dashboard-host={self.addr(0)}", f"--dashboard-port={DASH_PORT}"])  # fmt: skip
        _wait(lambda: _connects(self.addr(0), DASH_PORT) and self.alive_nodes() is not None, 120, "the Ray dashboard")

    def start_worker(self, i: int) -> None:
        self._start(i, 2, [f"--address={self.addr(0)}:{GCS_PORT}"])
        _wait(lambda: self.addr(i) in (self.alive_nodes() or []), 120, f"worker h{i} joining")

    def api(self, path: str, timeout: float = 10) -> Any:
        """GET from the dashboard's HTTP API with the cluster token."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def alive_nodes(self) -> list[str] | None:
        """IPs of the nodes the head counts alive (None while the API does not answer)."""
        try:
            rows = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return None
        return [r["node_ip"] for r in rows if r.get("state") == "ALIVE"]

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.hosts[i]], capture_output=True, text=True, timeout=30)
        return [int(x) for x in out.stdout.split()]

    def running_shard_task(self, i: int) -> bool:
        """A Ray worker of host i is executing a shard task right now (Ray sets its process title)."""
        for pid in self.pids(i):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_shard_task"):
                    return True
            except OSError:
                continue
        return False

    def kill_host(self, i: int) -> None:
        """SIGKILL every process in host i's namespace (and the `ray start` groups we started there)."""
        for _ in range(5):
            pids = self.pids(i)
            for p in self.procs[self.hosts[i]]:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for p in self.procs[self.hosts[i]]:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            if not self.pids(i):
                break
            time.sleep(0.5)
        self.procs[self.hosts[i]] = []

    def teardown(self) -> None:
        for i in range(len(self.hosts)):
            if self.hosts[i] in self.created:
                self.kill_host(i)
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # takes its veth peer along
        for i in range(len(self.hosts)):
            _ip("link", "del", self.veth(i), check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(f"/tmp/{self.prefix}", ignore_errors=True)

    # jobs ---------------------------------------------------------------------------------------

    def submit(self, working_dir: Path, *cmd: str) -> str:
        """`ray job submit --no-wait` from the test's namespace (outside every host); returns the id."""
        sid = f"mifa-{secrets.token_hex(4)}"
        p = subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--no-wait", "--submission-id", sid,
             "--working-dir", str(working_dir), "--", *cmd],
            env=self.env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return sid

    def job_status(self, sid: str) -> str | None:
        try:
            return self.api(f"/api/jobs/{sid}")["status"]
        except (OSError, ValueError, KeyError):
            return None

    def job_logs(self, sid: str) -> str:
        try:
            return self.api(f"/api/jobs/{sid}/logs", timeout=30)["logs"]
        except (OSError, ValueError, KeyError) as err:
            return f"(no logs: {err})"

    def wait_job(self, sid: str, timeout: float, during: Callable[[], None] | None = None) -> str:
        """Poll the job's status until it ends; `during` runs between polls (the fault injector)."""
        deadline = time.time() + timeout
        status = None
        while time.time() < deadline:
            status = self.job_status(sid)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            if during is not None:
                during()
            time.sleep(0.5)
        raise AssertionError(f"job {sid} still {status} after {timeout:.0f} s\n{self.job_logs(sid)[-4000:]}")


def _connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _netns_usable() -> str | None:
    """Why named network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    name = f"mifaprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        return f"ip netns add failed: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    return None


@pytest.fixture
def lab(tmp_path) -> Iterator[Callable[[int], Lab]]:
    """Make a Lab of N hosts (call it once); torn down at the end, even on failure."""
    if os.environ.get("MIFA_IN_NETNS") != "1":
        pytest.skip("run through tests/run.sh: the hosts' addresses must live in a private network namespace")
    why = _netns_usable()
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
    """What the job ships with `--working-dir`: the tracked sources of the three packages only
    (the repo with its .venv would be GBs); the job's driver and tasks import this copy."""
    wd = tmp_path / "wd"
    files = subprocess.run(["git", "ls-files", "factory", "pipelines", "detectors"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, wd / f)
    return wd


def _build_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "factory.cli", "build", "--target", str(TARGET), "--shard-size", str(SHARD),
            "--out", str(out), *LOSS_BUILD, *extra]  # fmt: skip


def _stats(out: Path) -> dict[str, dict]:
    return {p.name[: -len(".stats.json")]: json.loads(p.read_text()) for p in (out / "shards").glob("*.stats.json")}


def _check_corpus(out: Path) -> dict[str, dict]:
    """verify passes, every shard is whole (tar + parquet + marker, no temporary file), no key twice."""
    v = factory("verify", str(out), timeout=300)
    assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
    stats = _stats(out)
    assert len(stats) == -(-TARGET // SHARD)
    shards = out / "shards"
    assert {p.stem for p in shards.glob("*.tar")} == set(stats) == {p.stem for p in shards.glob("*.parquet")}
    keys = [k for p in sorted(shards.glob("*.parquet")) for k in pq.read_table(p, columns=["key"])["key"].to_pylist()]
    assert len(keys) == len(set(keys)) == TARGET
    # A writer killed mid-shard leaves its temporary files (never a final name); the build that
    # redid the shard elsewhere does not remove them, the next resume does (clean_uncommitted).
    leftovers = sorted(p.name for p in shards.iterdir() if p.name.startswith(".tmp-"))
    if leftovers:
        print("temporary files of killed writers:", leftovers)
        r = factory("resume", str(out), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not [p.name for p in shards.iterdir() if p.name.startswith(".tmp-")]
        assert _stats(out) == stats
    return stats


def _cluster(lab: Callable[[int], Lab]) -> Lab:
    """Head h0 (no CPUs) and two workers h1, h2 (2 CPUs each): either worker can carry the build alone."""
    cl = lab(3)
    cl.start_head()
    cl.start_worker(1)
    cl.start_worker(2)
    return cl


def test_job_submit_runs_on_worker_hosts(lab, working_dir, tmp_path):
    """A job submitted from outside runs its shards on the worker hosts; the manifest names each node."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    sid = cl.submit(working_dir, *_build_cmd(out))
    status = cl.wait_job(sid, 300)
    assert status == "SUCCEEDED", cl.job_logs(sid)[-4000:]
    stats = _check_corpus(out)
    ips = {s["node_ip"] for s in stats.values()}
    print("shards per node:", {ip: sum(s["node_ip"] == ip for s in stats.values()) for ip in ips})
    assert ips == {cl.addr(1), cl.addr(2)}, ips
    assert all(s["attempt"] == 1 and s["node_id"] for s in stats.values())


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
        done = _stats(self.out) if (self.out / "shards").is_dir() else {}
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


def test_worker_killed_mid_build(lab, working_dir, tmp_path):
    """SIGKILL every process of a worker host mid-build: its in-flight shard is redone on the other one."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, cl.kill_host)
    sid = cl.submit(working_dir, *_build_cmd(out))
    logs, resumed = _finish(cl, sid, out, working_dir, fault)
    stats = _check_corpus(out)
    _check_node_loss(cl, fault, stats, logs, dead=True, resumed=resumed)


def test_worker_link_cut_mid_build(lab, working_dir, tmp_path):
    """Cut a worker host's link mid-build (its processes live on, unreachable): the head declares it
    dead after the health checks and its in-flight shard is redone on the other worker."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, lambda i: _ip("link", "set", cl.veth(i), "down"))
    sid = cl.submit(working_dir, *_build_cmd(out))
    logs, resumed = _finish(cl, sid, out, working_dir, fault)
    assert fault.victim is not None
    # the cut-off host is gone for good: stop its processes before reading the corpus
    cl.kill_host(fault.victim)
    stats = _check_corpus(out)
    _check_node_loss(cl, fault, stats, logs, dead=False, resumed=resumed)


def test_head_killed_then_resume_on_new_cluster(lab, working_dir, tmp_path):
    """SIGKILL the head (GCS, dashboard, the job's driver) mid-build; the old workers go too. A new
    cluster's `factory resume OUT` completes the same corpus and leaves the committed shards alone."""
    cl = _cluster(lab)
    out = tmp_path / "out"
    fault = Fault(cl, out, lambda i: cl.kill_host(0))  # strikes the head once a worker is busy
    cl.submit(working_dir, *_build_cmd(out))
    _wait(lambda: fault() or fault.victim is not None, 300, "the build to get under way")
    cl.kill_host(1)
    cl.kill_host(2)
    before = _stats(out)
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
