"""Hosts in network namespaces for multi-host Ray: the cluster tests and the scaling bench share it.

Each host is a network namespace (`ip netns add`), joined to the caller's namespace by a veth
pair on a bridge, with a private address (10.203.0.0/24) that exists only in these namespaces.
A Ray head runs in h0 (no task CPUs), workers in the others, all with token auth; jobs go in
from outside with `ray job submit --working-dir`. All hosts share the filesystem, which stands
for shared storage. `Lab.teardown()` removes everything (Ray processes by pid, namespaces,
veths, bridge). Needs root (ip netns). Imports nothing of pytest, so bench/ can use it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

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


def runs_a_shard(pid: int) -> bool:
    """Process `pid` is a shard worker executing a shard task right now (Ray titles the process
    `ray::ShardWorker.run` while the call runs, `ray::ShardWorker` between calls)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ShardWorker.run")
    except OSError:
        return False


class CpuCap:
    """A CPU cgroup capped at `cpus` CPUs (CFS quota over a 100 ms period), with its CPU use:
    cgroup v2 (`cpu.max`) where the cpu controller is on the unified tree, else v1's `cpu`
    hierarchy for the cap and `cpuacct` for the usage. A command run through `wrap()` (and every
    child it forks) is capped and counted; `remove()` deletes the groups once they are empty."""

    PERIOD_US = 100_000

    def __init__(self, name: str, cpus: float):
        quota = max(1000, int(cpus * self.PERIOD_US))
        v2 = Path("/sys/fs/cgroup")
        controllers = v2 / "cgroup.controllers"
        self.v2 = controllers.is_file() and "cpu" in controllers.read_text().split()
        if self.v2:
            self.dirs = [v2 / name]
            self.dirs[0].mkdir(exist_ok=True)
            (self.dirs[0] / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            return
        cpu, acct = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct")
        if not (cpu / "cpu.cfs_quota_us").is_file():
            raise RuntimeError("no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us) to cap a host's CPU")
        self.dirs = [cpu / name] + ([acct / name] if (acct / "cpuacct.usage").is_file() else [])
        for d in self.dirs:
            d.mkdir(exist_ok=True)
        (self.dirs[0] / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
        (self.dirs[0] / "cpu.cfs_quota_us").write_text(str(quota))

    def wrap(self, cmd: list[str]) -> list[str]:
        """`cmd` run by a shell that first moves itself into the group(s)."""
        files = " ".join(f'"{d / "cgroup.procs"}"' for d in self.dirs)
        return ["sh", "-c", f'for f in {files}; do echo $$ > "$f" || exit 1; done; exec "$@"', "sh", *cmd]

    def usage(self) -> tuple[float, float]:
        """(CPU seconds used, seconds throttled by the cap) since the group was made."""
        stat = dict(ln.split() for ln in (self.dirs[0] / "cpu.stat").read_text().splitlines() if ln.strip())
        if self.v2:
            return int(stat["usage_usec"]) / 1e6, int(stat.get("throttled_usec", 0)) / 1e6
        used = int((self.dirs[1] / "cpuacct.usage").read_text()) / 1e9 if len(self.dirs) > 1 else float("nan")
        return used, int(stat.get("throttled_time", 0)) / 1e9

    def remove(self, timeout: float = 10) -> None:
        """rmdir the group(s) once their processes are gone (the kernel refuses before)."""
        end = time.time() + timeout
        for d in self.dirs:
            while d.exists():
                try:
                    d.rmdir()
                except OSError:
                    if time.time() > end:
                        left = (d / "cgroup.procs").read_text().split()
                        raise RuntimeError(f"cgroup {d} still has processes: {left}") from None
                    time.sleep(0.2)


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`ip ARGS` here, or inside namespace `ns`; a failure raises with ip's message when `check`."""
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    return p


class Lab:
    """Hosts h0..hN-1 (network namespaces) on one bridge; Ray nodes started and killed per host."""

    #: seconds a head's dashboard or a joining worker may take to come up
    start_timeout: float = 120

    def __init__(self, n_hosts: int, token: str, workdir: Path):
        self.prefix = f"mifa{os.getpid() % 10_000_000}"  # <= 15 chars for every interface name
        self.token = token
        self.workdir = workdir
        self.bridge = f"{self.prefix}br"
        self.hosts = [f"{self.prefix}h{i}" for i in range(n_hosts)]
        self.procs: dict[str, list[subprocess.Popen]] = {h: [] for h in self.hosts}
        self.created: list[str] = []  # namespaces, for teardown
        self.caps: dict[int, CpuCap] = {}  # host -> its CPU cap (made by _start), removed at teardown
        self.starts = 0

    def setup(self) -> None:
        """Bridge in the test's namespace; per host a namespace, a veth pair, lo and eth0 up."""
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{NET}.254/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.hosts):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
            self.created.append(ns)
            veth, peer = self.veth(i), f"{self.prefix}p{i}"
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
            ip("link", "set", "lo", "up", ns=ns)
            ip("link", "set", peer, "name", "eth0", ns=ns)
            ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)

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

    def _start(
        self, i: int, cpus: int, args: list[str], cores: str | None = None, cpu_cap: float | None = None
    ) -> None:
        """`ray start --block` in host i; with `cores` (a taskset list such as "1") every process of
        that Ray node (raylet, workers, actors, tasks) inherits that CPU affinity; with `cpu_cap`
        they share one cgroup capped at that many CPUs, as if host i had that much CPU."""
        self.starts += 1
        # short, per-start temp dir: Ray's unix socket paths must stay under ~107 characters
        tmp = Path(f"/tmp/{self.prefix}/{self.starts}")
        tmp.mkdir(parents=True)
        pin = ["taskset", "-c", cores] if cores is not None else []
        cmd = ["ip", "netns", "exec", self.hosts[i], *pin, RAY, "start", "--block", f"--node-ip-address={self.addr(i)}",
               f"--num-cpus={cpus}", "--object-store-memory=120000000", "--disable-usage-stats",
               f"--temp-dir={tmp}", *args]  # fmt: skip
        if cpu_cap is not None:
            if i not in self.caps:
                self.caps[i] = CpuCap(f"{self.prefix}h{i}", cpu_cap)
            cmd = self.caps[i].wrap(cmd)
        with open(self.workdir / f"ray-h{i}-{self.starts}.log", "wb") as log:
            p = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[self.hosts[i]].append(p)

    def start_head(self, cores: str | None = None, cpu_cap: float | None = None) -> None:
        # no CPUs on the head: it runs the GCS, the dashboard and the job drivers; all work goes to workers
        self._start(0, 0, ["--head", f"--port={GCS_PORT}", "--include-dashboard=true",
                        f"--dashboard-host={self.addr(0)}", f"--dashboard-port={DASH_PORT}"], cores, cpu_cap)  # fmt: skip
        self._wait_up(0, lambda: connects(self.addr(0), DASH_PORT) and self.addr(0) in (self.alive_nodes() or []),
                      "the Ray dashboard and the head node")  # fmt: skip

    def start_worker(self, i: int, cpus: int = 2, cores: str | None = None, cpu_cap: float | None = None) -> None:
        self._start(i, cpus, [f"--address={self.addr(0)}:{GCS_PORT}"], cores, cpu_cap)
        self._wait_up(i, lambda: self.addr(i) in (self.alive_nodes() or []), f"worker h{i} joining")

    def _wait_up(self, i: int, cond: Callable[[], bool], what: str) -> None:
        """Wait for `cond`; fail at once, naming its log, if host i's `ray start --block` exits first
        (a node that misses Ray's startup deadlines on a busy machine exits, it does not hang)."""
        p = self.procs[self.hosts[i]][-1]

        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"`ray start` on h{i} exited ({p.returncode}) before {what}; see "
                                   f"{self.workdir / f'ray-h{i}-{self.starts}.log'}")  # fmt: skip
            return cond()

        wait(up, self.start_timeout, what)

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
        """A shard worker of host i is executing a shard task right now."""
        return any(runs_a_shard(pid) for pid in self.pids(i))

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
            ip("link", "del", self.veth(i), check=False)
        ip("link", "del", self.bridge, check=False)
        shutil.rmtree(f"/tmp/{self.prefix}", ignore_errors=True)
        for cap in self.caps.values():
            cap.remove()
        self.caps = {}

    # jobs ---------------------------------------------------------------------------------------

    def submit(self, working_dir: Path, *cmd: str) -> str:
        """`ray job submit --no-wait` from the test's namespace (outside every host); returns the id."""
        sid = f"mifa-{secrets.token_hex(4)}"
        p = subprocess.run(
            [RAY, "job", "submit", "--address", self.dashboard, "--no-wait", "--submission-id", sid,
             "--working-dir", str(working_dir), "--", *cmd],
            env=self.env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if p.returncode != 0:
            raise RuntimeError(f"ray job submit exited {p.returncode}\n{p.stdout[-3000:]}{p.stderr[-3000:]}")
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


def connects(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def netns_usable() -> str | None:
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


def copy_sources(wd: Path) -> Path:
    """What a job ships with `--working-dir`: the tracked sources of the three packages only
    (the repo with its .venv would be GBs); the job's driver and tasks import this copy."""
    files = subprocess.run(["git", "ls-files", "factory", "pipelines", "detectors"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        (wd / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, wd / f)
    return wd
