"""OUT's storage refuses writes (full, read-only, not ours): one line, exit 3, committed shards kept,
nothing half-written, and after the fix `factory resume` completes the corpus byte for byte.

The full disk and the read-only OUT are real where this process may make a private mount
namespace (root, or the user namespace tests/run.sh makes): a tiny tmpfs and a read-only bind
mount, both gone when the command's namespace ends. Everywhere, `MIFA_FAULTS=write:1:ENOSPC`
raises the OSError a full disk raises at shard 1's write stage.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, ROOT, SMALL_RAY, factory
from corpus_digest import ARGS, INJECT, digest
from factory.layout import Layout
from factory.stops import EXIT_STORAGE, BuildStopped, fatal_os_error, storage_stop

DIGEST = json.loads((ROOT / "tests" / "data" / "corpus_digest.json").read_text())
ENV = {"MIFA_INJECT": INJECT}  # the digest's build (tests/corpus_digest.py)
ONE_AT_A_TIME = ["--set", "runtime.max_shards_in_flight=1"]  # shard 0 commits before shard 1 fails


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def _same_as_clean_build(out: Path) -> None:
    got = digest(out)
    assert got["build_id"] == DIGEST["build_id"]
    want = DIGEST["files"]
    changed = sorted(k for k in want.keys() | got["files"].keys() if want.get(k) != got["files"].get(k))
    assert not changed, f"files that differ from a clean build's: {changed}"


def _committed_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("mifa-000000*"))}


def _mount_ns_works(tmp: Path) -> bool:
    """Whether a private mount namespace with a tmpfs can be made here (no root outside one)."""
    d = tmp / "probe"
    d.mkdir()
    p = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {d}"], capture_output=True)
    return p.returncode == 0


def _factory_in_mount_ns(setup: str, *args: str, after: str = "") -> subprocess.CompletedProcess:
    """`factory ARGS` in a private mount namespace prepared by the shell lines `setup`; `after` runs
    there once it exits (the mounts go with the namespace). Returns factory's exit code and output."""
    env = {k: v for k, v in os.environ.items() if k not in ("MIFA_FAULTS", "MIFA_INJECT")}
    env.update(ENV)
    cmd = shlex.join([sys.executable, "-m", "factory.cli", *args])
    script = f"set -e\n{setup}\nrc=0\n{cmd} || rc=$?\n{after}\nexit $rc\n"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def partial(tmp_path_factory, shared_ray) -> tuple[Path, str]:
    """The digest's build stopped by a full disk at shard 1 (injected): (OUT, its stderr)."""
    out = tmp_path_factory.mktemp("enospc") / "out"
    env = {**shared_ray, **ENV, "MIFA_FAULTS": "write:1:ENOSPC"}
    p = factory("build", *ARGS, *FAST, *ONE_AT_A_TIME, "--out", str(out), env=env)
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    return out, p.stderr


def _copy(partial: tuple[Path, str], dest: Path) -> Path:
    shutil.copytree(partial[0], dest, symlinks=True)
    return dest


def test_out_of_space_stops_in_one_line_at_once_and_resume_is_byte_identical(partial, shared_ray, tmp_path):
    out, stderr = partial
    line = _last_line(stderr)
    assert line.startswith(f"build stopped: {out} is out of space (ENOSPC: No space left on device"), line
    assert "bytes free there; 1/3 shards committed and kept; free space there, then run " in line, line
    assert line.endswith(f"`factory resume {out}`") and "Traceback" not in stderr, stderr[-3000:]
    assert "retrying" not in stderr  # a full disk is not retried
    rec = json.loads((out / "failed" / "mifa-000001.json").read_text())
    assert rec["attempts"] == 1 and rec["error"].startswith("OSError: [Errno 28]"), rec
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "mifa-000000.parquet", "mifa-000000.stats.json", "mifa-000000.tar",
    ]  # fmt: skip  (nothing of shard 1, not even a temporary file)
    assert not list(out.rglob(".tmp-*"))

    out = _copy(partial, tmp_path / "out")
    kept = _committed_files(out)
    p = factory("resume", str(out), *SMALL_RAY, env={**shared_ray, **ENV})
    assert p.returncode == 0, p.stderr[-3000:]
    assert {k: v for k, v in _committed_files(out).items() if k in kept} == kept
    _same_as_clean_build(out)


def test_read_only_out_stops_in_one_line_and_the_driver_survives_its_failed_record(partial, tmp_path):
    """shards/, rejected/ and failed/ read-only (a real EROFS): the worker cannot write its shard and
    the driver cannot write failed/; one line, exit 3; the resume after remounting finishes the corpus."""
    if not _mount_ns_works(tmp_path):
        pytest.skip("no private mount namespace here (needs root or a user namespace)")
    out = _copy(partial, tmp_path / "out")
    before = (out / "failed" / "mifa-000001.json").read_bytes()
    ro = "\n".join(
        f"mount --bind {out / d} {out / d}\nmount -o remount,bind,ro {out / d}"
        for d in ("shards", "rejected", "failed")
    )
    p = _factory_in_mount_ns(ro, "resume", str(out), *SMALL_RAY)
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    line = _last_line(p.stderr)
    assert line.startswith(f"build stopped: {out}/shards is on a read-only filesystem (EROFS: Read-only file system); ")
    assert line.endswith(f"1/3 shards committed and kept; remount it read-write, then run `factory resume {out}`"), line
    assert "Traceback" not in p.stderr and "could not write the failure record" in p.stderr, p.stderr[-3000:]
    assert (out / "failed" / "mifa-000001.json").read_bytes() == before

    p = factory("resume", str(out), *SMALL_RAY, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    _same_as_clean_build(out)


@pytest.mark.slow  # the default suite stays under 15 min; `bash tests/run.sh -m slow` runs it
def test_a_really_full_disk_stops_in_one_line_and_leaves_no_half_written_file(partial, tmp_path):
    """OUT on a tmpfs with room for less than one more shard: the resume meets a real ENOSPC."""
    if not _mount_ns_works(tmp_path):
        pytest.skip("no private mount namespace here (needs root or a user namespace)")
    src, full, kept = partial[0], tmp_path / "full", tmp_path / "kept"
    full.mkdir()
    used = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    size = used + 200_000  # a shard's tar alone is about 380 kB
    setup = f"mount -t tmpfs -o size={size} tmpfs {full}\ncp -a {src}/. {full}/"
    p = _factory_in_mount_ns(setup, "resume", str(full), *SMALL_RAY, *ONE_AT_A_TIME, after=f"cp -a {full}/. {kept}/")
    assert p.returncode == EXIT_STORAGE, p.stderr[-3000:]
    line = _last_line(p.stderr)
    assert line.startswith(f"build stopped: {full} is out of space (ENOSPC: No space left on device)"), line
    assert "1/3 shards committed and kept; free space there, then run `factory resume" in line, line
    free = int(line.split("; ")[1].split(" bytes free")[0].replace(",", ""))
    assert 0 <= free < 200_000, line
    assert "Traceback" not in p.stderr and "retrying" not in p.stderr, p.stderr[-3000:]
    assert not list(kept.rglob(".tmp-*")), "a temporary file of the failed shard was left on the full disk"
    assert _committed_files(kept) == _committed_files(src)


def test_only_faults_no_retry_fixes_stop_the_build(tmp_path):
    """ENOSPC, EDQUOT, EROFS, EACCES and EPERM stop; a transient EIO or a plain error is retried.
    A shard's error reaches the driver inside Ray's RayTaskError, and may be chained."""
    import ray.exceptions

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        err = OSError(code, "x", str(tmp_path / "f"))
        wrapped = ray.exceptions.RayTaskError("run", "Traceback ...", err)
        assert fatal_os_error(wrapped) is err
        try:
            try:
                raise err
            except OSError as inner:
                raise RuntimeError("while committing") from inner
        except RuntimeError as chained:
            assert fatal_os_error(chained) is err
    for other in (OSError(errno.EIO, "I/O error"), ConnectionResetError(errno.ECONNRESET, "reset"), ValueError("x")):
        assert fatal_os_error(ray.exceptions.RayTaskError("run", "", other)) is None
    assert isinstance(OSError(errno.EACCES, "x"), PermissionError)  # what s3fs raises for AccessDenied

    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "shards"))
    stop = storage_stop(denied, Layout(str(tmp_path)))
    stop.committed, stop.num_shards = 2, 5
    assert isinstance(stop, BuildStopped) and stop.code == EXIT_STORAGE
    assert str(stop).startswith(
        f"build stopped: {tmp_path}/shards is not writable (permission denied) (EACCES: Permission denied); "
    )
    assert str(stop).endswith(
        f"bytes free there; 2/5 shards committed and kept; give this user write access to OUT, then run "
        f"`factory resume {tmp_path}`"
    )
    assert "\n" not in str(stop)
