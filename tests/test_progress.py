"""The ETA a user watches: from the build's own rate, smoothed, and checked against a real build's polls.

tests/data/progress_trace.jsonl is the progress trace of a real default build (MAUGen, 2 cores):
    factory build --target 160 --shard-size 40 --out OUT --set runtime.progress_trace=TRACE
every update the driver made (each poll of the shards in flight, each commit, the ticks before
the first sample); each line holds the time, the samples accepted (committed + in flight) and the target.
"""

from __future__ import annotations

import json

from conftest import ROOT

from factory.progress import EtaModel, format_eta

TRACE = ROOT / "tests" / "data" / "progress_trace.jsonl"


def _replay(records: list[dict]) -> list[tuple[float, int, float | None]]:
    """(t, accepted, ETA shown) for every update of a recorded build."""
    target = records[0]["target"]
    model = EtaModel(target, start_accepted=records[0]["accepted"], t0=records[0]["t"])
    return [(r["t"], r["accepted"], model.update(r["t"], r["accepted"])) for r in records]


def test_a_real_build_s_eta_stays_within_a_quarter_of_the_truth_and_never_jumps():
    records = [json.loads(line) for line in TRACE.read_text().splitlines()]
    target = records[0]["target"]
    t_end = next(r["t"] for r in records if r["accepted"] >= target)
    duration = t_end - records[0]["t"]
    shown = _replay(records)
    checked, worst = 0, 0.0
    for t, accepted, eta in shown:
        true = t_end - t
        if accepted < 0.1 * target or t >= t_end:
            continue
        assert eta is not None
        # within 25 % of the time left; in the last seconds, where any estimate's relative error
        # grows without bound, within 2 % of the build's duration
        err = abs(eta - true)
        assert err <= max(0.25 * true, 0.02 * duration), (t - records[0]["t"], accepted, eta, true)
        checked += 1
        worst = max(worst, err / true)
    assert checked >= 20, checked
    # no jump of more than 2x between consecutive updates, beyond the time that passed between them
    # (at a constant rate an ETA of 10 s reads 5 s five seconds later: that is no jump)
    timed = [(t, eta) for t, _, eta in shown if eta]
    for (ta, a), (tb, b) in zip(timed, timed[1:]):
        aged = a - (tb - ta)
        if aged > 0:
            assert 0.5 <= b / aged <= 2.0, (a, b, tb - ta)
    print(f"{checked} updates checked, worst relative error {worst:.3f}")


def test_eta_is_exact_at_a_constant_rate_and_holds_still_through_a_burst():
    m = EtaModel(100, t0=0.0)
    assert m.update(0.0, 0) is None and m.update(5.0, 0) is None  # nothing accepted yet: unknown
    assert abs(m.update(10.0, 10) - 90.0) < 1e-9  # 10 per 10 s: 90 left take 90 s
    for t in range(20, 100, 10):
        assert abs(m.update(float(t), t) - (100 - t)) < 1e-6
    m = EtaModel(1000, t0=0.0)
    m.update(100.0, 100)  # 900 s left
    burst = m.update(105.0, 400)  # a poll finds three shards far along: the raw ETA drops to ~160 s
    assert 900 / 1.5 - 5 <= burst < 895  # it moves, by at most max_step
    assert m.update(1000.0, 1000) == 0.0 and format_eta(0.0) == "ETA 0:00:00" and format_eta(None) == "ETA -"
    assert format_eta(3725.4) == "ETA 1:02:05"
