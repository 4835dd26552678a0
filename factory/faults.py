"""Fault injection for chaos tests, as wrappers around a shard's stage functions (`wrap`).

MIFA_FAULTS="write:3,generate:7" makes shard 3 fail at its write stage and shard 7 at generate,
on every attempt. It exercises the real failure path (retries, OUT/failed/, exit code, resume)
without touching the code under test; unset, it costs one dict lookup per stage. An item may
name an errno, "write:1:ENOSPC": the stage then raises that OSError (a full disk, a read-only
OUT, ...) instead of InjectedFault, so the build's handling of storage faults can be tested
without root or a real full disk.

MIFA_INJECT="blank:0.05,noise:0.05,wrong_expression:0.05" spoils that fraction of generated
samples after the generator returns (chosen by a hash of the sample key, so a re-run spoils the
same ones): `blank` makes a flat grey image, `noise` replaces it with pixel noise, and
`wrong_expression` swaps in the image of another sample of the batch whose AU set overlaps the
labels least (Jaccard <= 1/3), keeping the labels. The shard records what it spoiled in its
stats under `injected`, so tests can check each one was rejected for the right reason.

Neither touches the code under test: `wrap` returns the shard's stages with failing or spoiling
wrappers put around the ones the environment names; with neither variable set it returns them as
they are.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from core.facs import jaccard

ENV = "MIFA_FAULTS"
INJECT_ENV = "MIFA_INJECT"
STAGES = ("expand", "generate", "detect", "checks", "write")
INJECT_KINDS = ("blank", "noise", "wrong_expression")


class InjectedFault(RuntimeError):
    """Raised where MIFA_FAULTS asks for a failure."""


def parse(spec: str) -> set[tuple[str, int, str | None]]:
    """{(stage, shard, errno name or None)} of a MIFA_FAULTS value."""
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        stage, _, rest = item.partition(":")
        shard, _, code = rest.partition(":")
        if stage not in STAGES or not shard.isdigit() or (code and not isinstance(getattr(errno, code, None), int)):
            raise ValueError(
                f"{ENV}={spec!r}: items look like STAGE:SHARD or STAGE:SHARD:ERRNO with STAGE in {', '.join(STAGES)} "
                "and ERRNO a name such as ENOSPC"
            )
        out.add((stage, int(shard), code or None))
    return out


S = TypeVar("S")


def wrap(stages: S, shard: int, injected: dict[str, list[str]]) -> S:
    """`stages` (a dataclass with one callable per name in STAGES, None for a stage not run) with the
    faults MIFA_FAULTS names for this shard raising at their stage, and generate spoiling samples as
    MIFA_INJECT asks; what was spoiled is added to `injected` ({kind: keys})."""
    spec = os.environ.get(ENV, "")
    changes: dict[str, Callable[..., Any]] = {}
    for stage, s, code in sorted(parse(spec), key=str):
        fn = getattr(stages, stage)
        if s == shard and fn is not None:
            changes[stage] = _failing(stage, shard, spec, code)
    inject = os.environ.get(INJECT_ENV)
    if inject and "generate" not in changes:
        changes["generate"] = _spoiling(stages.generate, parse_inject(inject), injected)  # type: ignore[attr-defined]
    return dataclasses.replace(stages, **changes) if changes else stages  # type: ignore[type-var]


def _failing(stage: str, shard: int, spec: str, code: str | None) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        if code is not None:
            n = getattr(errno, code)
            raise OSError(n, f"{os.strerror(n)} (injected at stage {stage} of shard {shard}, {ENV}={spec})")
        raise InjectedFault(f"injected fault at stage {stage} of shard {shard} ({ENV}={spec})")

    return fail


def _spoiling(generate: Callable[[Any], Any], rates: dict[str, float], injected: dict[str, list[str]]):
    def spoiled(batch: Any) -> Any:
        result = generate(batch)
        for kind, keys in inject_samples(batch, result, rates).items():
            injected.setdefault(kind, []).extend(keys)
        return result

    return spoiled


def parse_inject(spec: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, _, rate = item.partition(":")
        try:
            r = float(rate)
        except ValueError:
            r = -1.0
        if kind not in INJECT_KINDS or not 0.0 <= r <= 1.0:
            raise ValueError(
                f"{INJECT_ENV}={spec!r}: items look like KIND:RATE with KIND in {', '.join(INJECT_KINDS)}, RATE in [0, 1]"
            )
        out[kind] = r
    return out


def _u(key: str, kind: str) -> float:
    h = hashlib.blake2b(f"{kind}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def inject_samples(batch: Any, result: Any, rates: dict[str, float]) -> dict[str, list[str]]:
    """Spoil samples of `result` in place at the given rates; returns {kind: keys spoiled}."""
    done: dict[str, list[str]] = {}
    taken: set[int] = set()
    occ = result.occurrence_prob >= 0.5
    original = result.images
    result.images = original.copy()  # arrays from the object store are read-only
    for kind in INJECT_KINDS:
        rate = rates.get(kind, 0.0)
        for j, key in enumerate(batch.keys):
            if j in taken or rate <= 0 or _u(key, kind) >= rate:
                continue
            if kind == "blank":
                result.images[j] = 128
            elif kind == "noise":
                rng = np.random.default_rng(int(_u(key, "seed") * 2**32))
                result.images[j] = rng.integers(0, 256, result.images[j].shape, dtype=np.uint8)
            else:
                overlaps = [(jaccard(occ[j], occ[m]), m) for m in range(len(batch.keys)) if m != j]
                if not overlaps:
                    continue
                best, m = min(overlaps)
                if best > 1 / 3:
                    continue
                result.images[j] = original[m]
            taken.add(j)
            done.setdefault(kind, []).append(key)
    return done
