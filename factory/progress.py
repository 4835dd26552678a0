"""Driver progress: accepted/target, shards, rate, ETA and acceptance by stage.

A rich progress bar on a terminal; periodic log lines otherwise (CI, `ray job submit` logs).
Shards in flight count with what they have accepted so far (polled from their workers), so a
build of a few long shards does not sit at 0 until the first commit.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("factory.progress")


class BuildProgress:
    def __init__(
        self, target: int, num_shards: int, enabled: bool = True, log_every_s: float = 10.0, live_every_s: float = 5.0
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

    def start(self, accepted: int, shards: int) -> None:
        self.accepted, self.shards = accepted, shards
        self._start_accepted = accepted
        self._t0 = time.time()
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]build"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("build", total=self.target, completed=accepted, info=self._info())

    def _partial(self) -> tuple[int, int]:
        """(accepted, candidates) of the shards in flight, not yet committed."""
        return sum(a for a, _ in self.in_flight.values()), sum(c for _, c in self.in_flight.values())

    def _rate(self) -> float:
        dt = max(time.time() - self._t0, 1e-6)
        return (self.accepted + self._partial()[0] - self._start_accepted) / dt

    def _eta(self) -> str:
        """Time left at the rate so far (the bar shows its own; the log line needs one)."""
        rate, left = self._rate(), max(self.target - self.accepted - self._partial()[0], 0)
        if not left:
            return "ETA 0:00:00"
        if rate <= 0:
            return "ETA -"
        m, sec = divmod(round(left / rate), 60)
        return f"ETA {m // 60}:{m % 60:02d}:{sec:02d}"

    def _info(self) -> str:
        acc, cand = self._partial()
        kept = f"{self.accepted_fraction():.0%}" if self.candidates + cand else "-"
        failed = f" failed {self.failed}" if self.failed else ""
        live = f" ({acc} accepted in {len(self.in_flight)} in flight)" if self.in_flight else ""
        return f"shards {self.shards}/{self.num_shards}{failed}{live} | {self._rate():.1f}/s | kept {kept} of candidates"

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
        if self._bar is not None:
            self._bar.update(self._task, completed=self.accepted + self._partial()[0], info=self._info())
            return
        now = time.time()
        if self.enabled and (force and now - self._last_log >= 1.0 or now - self._last_log >= self.log_every_s):
            self._last_log = now
            rej = ", ".join(f"{k}={v}" for k, v in self.rejected.items() if v) or "none"
            log.info(
                "accepted %d/%d | %s | %s | rejected: %s", self.accepted, self.target, self._info(), self._eta(), rej
            )

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
