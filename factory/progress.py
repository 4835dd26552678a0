"""Driver progress: accepted/target, shards, rate, ETA and acceptance by stage.

A rich progress bar on a terminal; periodic log lines otherwise (CI, `ray job submit` logs).
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("factory.progress")


class BuildProgress:
    def __init__(self, target: int, num_shards: int, enabled: bool = True, log_every_s: float = 10.0):
        self.target = target
        self.num_shards = num_shards
        self.enabled = enabled
        self.log_every_s = log_every_s
        self.accepted = 0
        self.shards = 0
        self.failed = 0
        self.candidates = 0
        self.rejected: dict[str, int] = {}
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

    def _rate(self) -> float:
        dt = max(time.time() - self._t0, 1e-6)
        return (self.accepted - self._start_accepted) / dt

    def _eta(self) -> str:
        """Time left at the rate so far (the bar shows its own; the log line needs one)."""
        rate, left = self._rate(), max(self.target - self.accepted, 0)
        if not left:
            return "ETA 0:00:00"
        if rate <= 0:
            return "ETA -"
        m, sec = divmod(round(left / rate), 60)
        return f"ETA {m // 60}:{m % 60:02d}:{sec:02d}"

    def _info(self) -> str:
        acc = f"{self.accepted_fraction():.0%}" if self.candidates else "-"
        failed = f" failed {self.failed}" if self.failed else ""
        return f"shards {self.shards}/{self.num_shards}{failed} | {self._rate():.1f}/s | kept {acc} of candidates"

    def accepted_fraction(self) -> float:
        return self.accepted_new() / self.candidates if self.candidates else 0.0

    def accepted_new(self) -> int:
        return self.accepted - self._start_accepted

    def shard_done(self, samples: int, candidates: int, rejected: dict[str, int]) -> None:
        self.accepted += samples
        self.shards += 1
        self.candidates += candidates
        self.rejected = dict(rejected)
        self.tick(force=True)

    def shard_failed(self) -> None:
        self.failed += 1
        self.tick(force=True)

    def tick(self, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.accepted, info=self._info())
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
