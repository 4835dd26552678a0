"""Fault injection for chaos tests: make a named stage of a named shard fail on purpose.

MIFA_FAULTS="write:3,generate:7" makes shard 3 fail at its write stage and shard 7 at generate,
on every attempt. It exercises the real failure path (retries, OUT/failed/, exit code, resume)
without touching the code under test; unset, it costs one dict lookup per stage.
"""

from __future__ import annotations

import os

ENV = "MIFA_FAULTS"
STAGES = ("expand", "generate", "checks", "write")


class InjectedFault(RuntimeError):
    """Raised where MIFA_FAULTS asks for a failure."""


def parse(spec: str) -> set[tuple[str, int]]:
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        stage, _, shard = item.partition(":")
        if stage not in STAGES or not shard.isdigit():
            raise ValueError(f"{ENV}={spec!r}: items look like STAGE:SHARD with STAGE in {', '.join(STAGES)}")
        out.add((stage, int(shard)))
    return out


def check(stage: str, shard: int) -> None:
    spec = os.environ.get(ENV)
    if spec and (stage, shard) in parse(spec):
        raise InjectedFault(f"injected fault at stage {stage} of shard {shard} ({ENV}={spec})")
