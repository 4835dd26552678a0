"""No behaviour change: a fixed small build writes exactly the corpus it wrote when the digest was made.

tests/data/corpus_digest.json was written by the build below on the commit before the graph and
shard runner were reshaped (tests/corpus_digest.py says how to regenerate it after an intended
change of the output).
"""

from __future__ import annotations

import json
import os

from conftest import FAST, ROOT, factory
from corpus_digest import ARGS, INJECT, digest

DIGEST = ROOT / "tests" / "data" / "corpus_digest.json"


def test_a_fixed_build_is_byte_identical_to_the_checked_in_digest(shared_ray, tmp_path):
    """Built by two generator actors, where the digest was made with one: how many generators run
    (runtime sizing) must not change a byte."""
    out = tmp_path / "corpus"
    two = ["--set", "runtime.num_generators=2"]
    factory("build", *ARGS, *FAST, *two, "--out", str(out), env={**shared_ray, "MIFA_INJECT": INJECT}, check=True)
    got = digest(out)
    if os.environ.get("MIFA_WRITE_DIGEST"):
        DIGEST.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(DIGEST.read_text())
    assert got["build_id"] == want["build_id"]
    changed = sorted(k for k in want["files"].keys() | got["files"].keys() if want["files"].get(k) != got["files"].get(k))
    assert not changed, f"files that differ from the checked-in digest: {changed}"
    assert any(k.startswith("rejected/") for k in got["files"]), "the build kept no rejected samples"
