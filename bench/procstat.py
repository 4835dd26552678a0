"""The CPU use and run queue of a process tree, read from /proc (Linux), for the benches' load figures.

A build on an embedded local Ray is one process tree: the driver, the Ray processes it starts
(GCS, raylet) and the raylet's workers (the actors). `TreeSampler` samples, every `every_s`
seconds, the tree's CPU seconds, its threads that are running or runnable (state R: what the
kernel's load average counts, but of this tree alone) and /proc/loadavg (the whole machine: other
users' processes count there too), so that a bench can quote them over the window its shards ran.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str] | None:
    """Fields of a /proc stat file after the command name (which may hold spaces), or None if gone."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat_fields(d / "stat")
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far (their own threads)."""
    total = 0
    for pid in pids:
        f = _stat_fields(Path(f"/proc/{pid}/stat"))
        if f is not None:
            total += int(f[11]) + int(f[12])  # utime, stime
    return total / _TICK


def cpu_by_name(root: int, names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of the processes in `root`'s tree whose command name is one of `names`
    (/proc's comm, at most 15 characters: "gcs_server", "raylet"), summed by name."""
    out = dict.fromkeys(names, 0.0)
    for pid in tree(root):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if name in out:
            out[name] += cpu_seconds([pid])
    return out


def thread_states(pids: list[int], exclude: int | None = None) -> tuple[int, int]:
    """(threads running or waiting for a CPU, processes stopped by a signal) of the processes now,
    leaving out thread id `exclude` (the sampler itself, running while it reads)."""
    runnable = stopped = 0
    for pid in pids:
        f = _stat_fields(Path(f"/proc/{pid}/stat"))
        stopped += f is not None and f[0] in ("T", "t")
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue
        for t in tasks:
            if t.name == str(exclude):
                continue
            f = _stat_fields(t / "stat")
            runnable += f is not None and f[0] == "R"
    return runnable, stopped


def loadavg_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have spent busy so far (/proc/stat: all but idle and iowait),
    less what SCHED_IDLE processes used (they run only on CPUs nothing else wants)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(f[:8]) - f[3] - f[4]) / _TICK  # user nice system idle iowait irq softirq steal
    idle_class = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat_fields(d / "stat")
            if st is not None and len(st) > 38 and st[38] == "5":  # policy SCHED_IDLE
                idle_class += int(st[11]) + int(st[12])
    return busy - idle_class / _TICK


@dataclass
class Sample:
    t: float
    cpu_s: float
    runnable: int
    loadavg: float
    machine_s: float
    stopped: int  # processes of the tree stopped by a signal (SIGSTOP from outside: the run is not comparable)


@dataclass
class Window:
    """The tree's load over a time window."""

    seconds: float
    cores_busy: float  # CPU seconds of the tree over the window's seconds
    others_busy: float  # other processes' CPU seconds (SCHED_IDLE ones aside) over the window's seconds
    run_queue: float  # mean runnable threads of the tree (its own load average, arithmetic)
    loadavg_end: float  # /proc/loadavg (1 min, whole machine) at the window's end
    loadavg_max: float
    stopped_s: float  # seconds in which some process of the tree was stopped by a signal

    def describe(self) -> str:
        return (
            f"over {self.seconds:.0f} s: the build's processes kept {self.cores_busy:.2f} cores busy, its run queue "
            f"(running + runnable threads) averaged {self.run_queue:.2f}; other processes (SCHED_IDLE aside) kept "
            f"{self.others_busy:.2f} cores busy; machine load average (1 min, all processes) {self.loadavg_end:.2f} at the end, "
            f"{self.loadavg_max:.2f} at most"
            + (f"; STOPPED by a signal for about {self.stopped_s:.0f} s: not comparable" if self.stopped_s else "")
        )


class TreeSampler(threading.Thread):
    """Samples the tree of `root` (default: this process) every `every_s` seconds until stop()."""

    def __init__(self, root: int | None = None, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s = root or os.getpid(), every_s
        self.samples: list[Sample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        me = threading.get_native_id()
        while not self._stop_event.is_set():
            pids = tree(self.root)
            runnable, stopped = thread_states(pids, me)
            self.samples.append(
                Sample(time.time(), cpu_seconds(pids), runnable, loadavg_1min(), machine_busy_seconds(), stopped)
            )
            self._stop_event.wait(self.every_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def window(self, t0: float, t1: float) -> Window | None:
        """The load between t0 and t1 (epoch seconds); None when fewer than two samples fall in it."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        return Window(
            seconds=b.t - a.t,
            cores_busy=(b.cpu_s - a.cpu_s) / (b.t - a.t),
            others_busy=((b.machine_s - a.machine_s) - (b.cpu_s - a.cpu_s)) / (b.t - a.t),
            run_queue=sum(s.runnable for s in inside) / len(inside),
            loadavg_end=b.loadavg,
            loadavg_max=max(s.loadavg for s in inside),
            # a process of the tree seen stopped, or a gap of over 10 s in the samples (this one stopped too)
            stopped_s=sum(b.t - a.t for a, b in zip(inside, inside[1:]) if a.stopped or b.stopped or b.t - a.t > 10.0),
        )
