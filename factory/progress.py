"""Driver progress: accepted/target, shards, rate, ETA and acceptance by stage.

A rich progress bar on a terminal; periodic log lines otherwise (CI, `ray job submit` logs); both
show the same ETA, from `EtaModel`. Shards in flight count with what they have accepted so far
(polled from their workers), so a build of a few long shards does not sit at 0 until the first
commit. `runtime.progress_trace` appends every update to a JSONL file, from which
tests/test_progress.py replays a real build's polls.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .fallbacks import FallbackCount

log = logging.getLogger("factory.progress")


class EtaModel:
    """Time left from the build's own rate, smoothed so that it holds still.

    The rate is accepted samples per second over the whole run (the shards in flight counted as
    they report), not over the last few seconds: a poll that finds a shard further along, or a
    commit, moves it little. Each update turns the rate into a predicted finish time and moves the
    shown finish time a share `alpha` of the way there; against the previous ETA less the time since
    (what it would read had nothing changed), the new one may shrink or grow by at most a factor
    `max_step` (a guard, not the model). Shown before any sample is accepted: nothing (`None`).
    """

    def __init__(self, target: int, start_accepted: int = 0, t0: float | None = None, alpha: float = 0.15,
                 max_step: float = 1.5):
        self.target, self.start_accepted = target, start_accepted
        self.t0 = time.time() if t0 is None else t0
        self.alpha, self.max_step = alpha, max_step
        self.finish: float | None = None  # the smoothed predicted finish time
        self.eta: float | None = None
        self.t: float | None = None  # time of the last update

    def update(self, t: float, accepted: int) -> float | None:
        """Seconds left as of time t with `accepted` samples (committed + in flight); None: unknown yet."""
        left = max(self.target - accepted, 0)
        done = accepted - self.start_accepted
        if left == 0:
            self.finish, self.eta, self.t = t, 0.0, t
            return 0.0
        if done <= 0 or t <= self.t0:
            return self.eta
        raw = t + left * (t - self.t0) / done
        self.finish = raw if self.finish is None else self.finish + self.alpha * (raw - self.finish)
        eta = max(self.finish - t, 0.0)
        aged = None if self.eta is None or self.t is None else self.eta - (t - self.t)
        if aged is not None and aged > 0 and eta > 0:
            eta = min(max(eta, aged / self.max_step), aged * self.max_step)
            self.finish = t + eta
        self.eta, self.t = eta, t
        return eta


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    m, sec = divmod(round(seconds), 60)
    return f"ETA {m // 60}:{m % 60:02d}:{sec:02d}"


class BuildProgress:
    """What the driver shows while a build runs (see the module docstring)."""

    def __init__(
        self,
        target: int,
        num_shards: int,
        enabled: bool = True,
        log_every_s: float = 10.0,
        live_every_s: float = 5.0,
        trace: str | None = None,
    ):
        self.target = target
        self.num_shards = num_shards
        self.enabled = enabled
        self.log_every_s = log_every_s
        self.accepted = 0
        self.shards = 0
        self.failed = 0
        self.candidates = 0
        self.rejected: dict[str, int] = {}
        self.in_flight: dict[int, tuple[int, int]] = {}  # shard index -> (accepted, candidates) so far
        self.live_every_s = live_every_s
        self._last_live = 0.0
        self._t0 = time.time()
        self._start_accepted = 0
        self._last_log = 0.0
        self._bar = None
        self._task = None
        self._busy: list[str] = []
        self._eta = EtaModel(target)
        self._eta_text = format_eta(None)
        self._seen: tuple[int, int, float] | None = None  # the counts the ETA was last updated on
        self._trace = trace
        self._fallbacks = ""  # share of this run's prompts that fell back to the grammar (LLM expander only)

    def start(self, accepted: int, shards: int) -> None:
        self.accepted, self.shards = accepted, shards
        self._start_accepted = accepted
        self._t0 = time.time()
        self._eta = EtaModel(self.target, accepted, self._t0)
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]build"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("{task.fields[eta]}"),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                "build", total=self.target, completed=accepted, info=self._info(), eta=format_eta(None)
            )

    def _partial(self) -> tuple[int, int]:
        """(accepted, candidates) of the shards in flight, not yet committed."""
        return sum(a for a, _ in self.in_flight.values()), sum(c for _, c in self.in_flight.values())

    def _rate(self) -> float:
        dt = max(time.time() - self._t0, 1e-6)
        return (self.accepted + self._partial()[0] - self._start_accepted) / dt

    def _update_eta(self) -> str:
        """Feed the ETA model the counts now (committed + in flight); the same text for the bar and the log."""
        now, accepted = time.time(), self.accepted + self._partial()[0]
        eta = self._eta.update(now, accepted)
        if self._trace:
            with open(self._trace, "a") as f:
                f.write(json.dumps({"t": round(now, 3), "accepted": accepted, "target": self.target,
                                    "committed": self.accepted, "in_flight": self._partial()[0]}) + "\n")
        return format_eta(eta)

    def _info(self) -> str:
        acc, cand = self._partial()
        kept = f"{self.accepted_fraction():.0%}" if self.candidates + cand else "-"
        failed = f" failed {self.failed}" if self.failed else ""
        live = f" ({acc} accepted in {len(self.in_flight)} in flight)" if self.in_flight else ""
        return (
            f"shards {self.shards}/{self.num_shards}{failed}{live} | {self._rate():.1f}/s | kept {kept} of candidates"
            f"{self._fallbacks}"
        )

    def prompts(self, seen: FallbackCount) -> None:
        """This run's prompt fallbacks, shown once any prompt was asked: a
        user who asked for LLM prompts sees at once when the grammar stands in for them."""
        if seen.share is not None:
            self._fallbacks = f" | prompts fell back {seen.share:.0%}"

    def accepted_fraction(self) -> float:
        """Accepted / candidates this run, the shards in flight included."""
        acc, cand = self._partial()
        total = self.candidates + cand
        return (self.accepted_new() + acc) / total if total else 0.0

    def accepted_new(self) -> int:
        return self.accepted - self._start_accepted

    def live_due(self) -> bool:
        """Whether it is time to poll the shards in flight again."""
        return self.enabled and time.time() - self._last_live >= self.live_every_s

    def live(self, shards: dict[int, tuple[int, int]]) -> None:
        """Counts so far of the shards in flight (index -> (accepted, candidates)); a shard that did not
        answer keeps its last counts."""
        self._last_live = time.time()
        self.in_flight.update(shards)

    def shard_done(self, samples: int, candidates: int, rejected: dict[str, int], index: int | None = None) -> None:
        self.in_flight.pop(index, None)
        self.accepted += samples
        self.shards += 1
        self.candidates += candidates
        self.rejected = dict(rejected)
        self.tick(force=True)

    def shard_failed(self, index: int | None = None) -> None:
        """A shard attempt failed: what it had accepted is gone (a retry starts it over)."""
        self.in_flight.pop(index, None)
        self.failed += 1
        self.tick(force=True)

    def shard_retried(self, index: int) -> None:
        self.in_flight.pop(index, None)

    def tick(self, force: bool = False) -> None:
        """Redraw the bar, or log a line every log_every_s; the ETA moves only when counts may have
        (a commit, a poll of the shards in flight)."""
        if not self.enabled:
            return
        if force or self._eta.eta is None or self._changed():
            self._eta_text = self._update_eta()
        eta = self._eta_text
        if self._bar is not None:
            self._bar.update(self._task, completed=self.accepted + self._partial()[0], info=self._info(), eta=eta)
            return
        now = time.time()
        if force and now - self._last_log >= 1.0 or now - self._last_log >= self.log_every_s:
            self._last_log = now
            rej = ", ".join(f"{k}={v}" for k, v in self.rejected.items() if v) or "none"
            log.info("accepted %d/%d | %s | %s | rejected: %s", self.accepted, self.target, self._info(), eta, rej)

    def _changed(self) -> bool:
        seen = (self.accepted, self._partial()[0], self._last_live)
        changed = seen != self._seen
        self._seen = seen
        return changed

    def actors_busy(self, lines: list[str]) -> None:
        """The generator and detector actors' busy accounting (ActorBusy.describe()), logged by stop()."""
        self._busy = list(lines)

    def stop(self) -> None:
        """End the bar; then one final line, and one per generator and detector actor with its busy
        fraction (logged even with progress off: it says whether the generators were starved)."""
        if self._bar is not None:
            self._bar.stop()
        if self.enabled:
            log.info("build ended: accepted %d/%d | %s", self.accepted, self.target, self._info())
        for line in self._busy:
            log.info("%s", line)
