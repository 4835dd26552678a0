"""Random targets for the round-trip tests and the prompt benchmark.

Not the factory's sampler (which balances quotas per shard): these mix emotion-plausible AUs from
the prototypes with random extra AUs at every level 1..5, so that every phrase and intensity word
of the grammar gets exercised.
"""

from __future__ import annotations

import numpy as np

from core.facs import EMOTIONS, NUM_AUS, STRENGTHS, au_index
from pipelines.prompts.types import ExpansionRequest


def random_requests(n: int, seed: int = 0, extra_au_rate: float = 0.2) -> list[ExpansionRequest]:
    """`n` requests with a random emotion, strength and 12-vector, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    names = list(EMOTIONS)
    reqs: list[ExpansionRequest] = []
    for _ in range(n):
        emotion = names[int(rng.integers(len(names)))]
        strength = 0 if emotion == "neutral" else int(rng.integers(1, len(STRENGTHS) + 1))
        v = np.zeros(NUM_AUS, dtype=np.int64)
        if strength:
            lo, hi = STRENGTHS[strength][1]
            for au in EMOTIONS[emotion].core:
                v[au_index(au)] = rng.integers(lo, hi + 1)
            for au in EMOTIONS[emotion].optional:
                if rng.random() < 0.5:
                    v[au_index(au)] = rng.integers(2, 5)
        extra = (v == 0) & (rng.random(NUM_AUS) < extra_au_rate)
        v[extra] = rng.integers(1, 6, size=int(extra.sum()))
        reqs.append(ExpansionRequest(emotion=emotion, strength=strength, intensity=v, seed=int(rng.integers(2**62))))
    return reqs
