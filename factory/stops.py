"""Faults that stop a whole build at once, and the one line that says so.

A shard that fails is retried, then recorded in OUT/failed/, and the build goes on (exit 1).
Some faults no retry can fix and every later shard would meet too: OUT's storage refuses writes
(full, read-only, not ours), or the LLM endpoint serves grammar fallbacks instead of prompts.
Retrying those only burns time and hides the cause, so they stop the build with BuildStopped:
committed shards stay as they are, and `factory resume OUT` goes on once the cause is fixed.

Exit codes of `factory build` / `factory resume`: 0 done, 1 shards failed (resume retries them),
2 bad input (config, OUT, model files), 3 OUT's storage refuses writes, 4 too many prompts fell
back to the grammar (expand.max_fallback_share).
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
from pathlib import Path

from .actors import error_cause
from .layout import TMP_PREFIX, Layout

EXIT_STORAGE = 3
EXIT_FALLBACKS = 4

#: errno -> (what it says about the path, what the user does about it). Transient OS errors (EIO,
#: a dropped NFS handle, a connection reset) are not here: a retry may well succeed.
FATAL_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("is out of space", "free space there"),
    errno.EDQUOT: ("is over its disk quota", "free space there or raise the quota"),
    errno.EROFS: ("is on a read-only filesystem", "remount it read-write"),
    errno.EACCES: ("is not writable (permission denied)", "give this user write access to OUT"),
    errno.EPERM: ("is not writable (operation not permitted)", "give this user write access to OUT"),
}


class BuildStopped(Exception):
    """The build stopped before its end for a cause a retry cannot fix; committed shards are kept.

    `str()` is the whole message, one line: the cause, the shards committed so far (set by the
    driver once nothing writes any more) and the resume command.
    """

    def __init__(self, cause: str, fix: str, code: int, out: str) -> None:
        super().__init__(cause)
        self.cause, self.fix, self.code, self.out = cause, fix, code, out
        self.committed: int | None = None
        self.num_shards: int | None = None

    def __str__(self) -> str:
        done = f"; {self.committed}/{self.num_shards} shards committed and kept" if self.committed is not None else ""
        return f"build stopped: {self.cause}{done}; {self.fix}, then run `factory resume {self.out}`"


def fatal_os_error(err: BaseException) -> OSError | None:
    """The OSError in `err` (a shard's error as Ray carries it, or a local one, followed through
    its causes) whose errno no retry fixes; None when there is none."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err, error_cause(err)]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FATAL_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__, error_cause(e)]
    return None


def storage_stop(err: OSError, layout: Layout) -> BuildStopped:
    """BuildStopped for a write OUT's storage refused: path, errno, bytes free there."""
    what, fix = FATAL_ERRNOS[err.errno]  # type: ignore[index]
    path = str(err.filename) if err.filename else layout.out
    if posixpath.basename(path).startswith(TMP_PREFIX):  # a writer's temporary name says less than its folder
        path = posixpath.dirname(path)
    name = errno.errorcode.get(err.errno or 0, str(err.errno))
    detail = err.strerror or os.strerror(err.errno or 0)
    free = bytes_free(path) if layout.is_local else None
    where = f"; {free:,} bytes free there" if free is not None else ""
    return BuildStopped(f"{path} {what} ({name}: {detail}){where}", fix, EXIT_STORAGE, layout.out)


def bytes_free(path: str) -> int | None:
    """Free bytes on the filesystem that holds `path` (its nearest existing parent); None if unknown."""
    p = Path(path)
    try:
        while not p.exists() and p != p.parent:
            p = p.parent
        return shutil.disk_usage(p).free
    except OSError:
        return None
