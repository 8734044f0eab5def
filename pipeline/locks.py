"""One writer per output: an OS file lock beside every artifact written in place.

Two runs with the same settings (two terminals, `make -j`, a script started twice)
would otherwise append to the same `.partial` file or replace each other's run
directory. `exclusive(path)` holds an exclusive lock on `<path>.lock` across the
"is it up to date?" check and the write, so the check is not racy either: the second
run waits, then finds the output finished (or resumes what the first one left).

Why the `filelock` library: it wraps the OS's own advisory locks portably (`flock`
through fcntl on POSIX, `msvcrt.locking` on Windows), and the OS releases such a
lock when the process holding it dies, whatever kills it (Ctrl-C, `kill -9`, the
OOM killer, a power cut). So there are no stale locks to clean up by hand, and no
PID files to guess about. The `.lock` file itself stays after release (deleting it
would race with a waiter that already opened it); it is empty and harmless.

Who holds a lock is written after acquiring into a sidecar, `<path>.lock.holder`
(JSON: PID, host, command line, since when), so that a waiting run can say what it
waits for in one message. The lock file itself cannot carry it: filelock 3.x
truncates it when a waiter opens it. The sidecar is removed on release; one left by
a killed holder is overwritten by the next one.

Lock order, where locks nest: compare folder, then feature file, then converted model
(`pipeline.features.runtimes`), then stage-2 run directory, then fine-tuning run
directory. A path is never locked twice by one
process (the lock is not reentrant across `exclusive` calls).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.errors import LockError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
HOLDER_SUFFIX = ".lock.holder"
#: How long a waiter gives a holder that just took the lock to write its sidecar.
_HOLDER_GRACE_SECONDS = 2.0


def lock_path(path: Path) -> Path:
    """`<path>.lock`: the file whose OS lock guards `path`; symlinks resolved, `out/` -> `out.lock`."""
    path = Path(os.path.realpath(path))
    return path.with_name(path.name + LOCK_SUFFIX)


def holder_path(path: Path) -> Path:
    """`<path>.lock.holder`: who holds the lock on `path`, while they hold it."""
    path = Path(os.path.realpath(path))
    return path.with_name(path.name + HOLDER_SUFFIX)


def is_lock_file(path: Path) -> bool:
    """Whether `path` is a lock or holder file of this module (for folder scans)."""
    return Path(path).name.endswith((LOCK_SUFFIX, HOLDER_SUFFIX))


@dataclass(frozen=True)
class Holder:
    """The process holding a lock, as it described itself on acquiring it."""

    pid: int
    host: str
    command: str
    since: str

    def describe(self) -> str:
        return f"PID {self.pid} on {self.host}, since {self.since}: {self.command}"

    @classmethod
    def me(cls) -> Holder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            command=_command_line(),
            since=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        )

    @classmethod
    def read(cls, path: Path) -> Holder | None:
        """The holder recorded for `path`, or None when there is no readable record."""
        try:
            return cls(**json.loads(holder_path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def alive(self) -> bool:
        """False only when the holder is known to be gone (same host, no such process)."""
        if self.host != socket.gethostname():
            return True
        import psutil

        return psutil.pid_exists(self.pid)


def _command_line() -> str:
    """This process's command line, read from the OS (argv is the CLI's to read)."""
    import shlex

    import psutil

    try:
        return shlex.join(psutil.Process().cmdline())
    except psutil.Error:
        return "(command line unknown)"


@contextmanager
def exclusive(
    path: Path, *, what: str = "output", poll_interval: float = 0.2, wait: bool = True
) -> Iterator[Holder | None]:
    """Holds the exclusive lock on `path` (a file or folder, existing or not) for the block.

    When another process holds it, logs one message naming the holder and waits
    until it is released (Ctrl-C stops the wait; nothing has been written yet), then
    proceeds. `what` names the artifact in that message ("feature file", ...).
    Yields this process's `Holder` record; None, after saying so, when the folder is
    read-only for this process: it cannot create, rename or delete anything there, so
    it can only find the output up to date (a shared, read-only feature cache).
    Raises `LockError` when the filesystem refuses the lock otherwise.

    `wait=False` raises `LockError` naming the holder at once instead of waiting: for a
    long-lived holder such as the review server, where waiting would hang until it is stopped.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(path)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _wait_for_holder(path)
        if not wait:
            raise LockError(
                f"{what.capitalize()} {path} is in use by another process "
                f"({holder.describe() if holder else 'holder not recorded'}); use that one, or stop it first."
            ) from None
        log.warning(
            "%s %s is being written by another run (%s); waiting for it to finish (Ctrl-C stops waiting).",
            what.capitalize(),
            path,
            holder.describe() if holder else "holder not recorded",
        )
        started = time.monotonic()
        lock.acquire(poll_interval=poll_interval)
        log.info(
            "%s %s: the other run finished after %.0f s of waiting; going on.",
            what.capitalize(),
            path,
            time.monotonic() - started,
        )
    except OSError as err:
        folder = lock_path(path).parent
        if os.access(folder, os.W_OK):
            raise LockError(
                f"Expected to lock {lock_path(path)} so that one run at a time writes {path}; the filesystem "
                f"refused ({err}). Use a folder on a filesystem with file locks (an NFS mount needs locking "
                "enabled), or fix the lock file's permissions."
            ) from err
        log.warning(
            "%s %s: its folder %s is read-only for this run, so it is not locked; this run can only "
            "find it up to date there.",
            what.capitalize(),
            path,
            folder,
        )
        yield None
        return
    try:
        me = Holder.me()
        _write_holder(path, me)
        yield me
    finally:
        holder_path(path).unlink(missing_ok=True)
        lock.release()


def _wait_for_holder(path: Path) -> Holder | None:
    """The holder's record, giving a holder that has just acquired the lock time to write it.

    A record of a process known to be gone is stale (a killed holder's, which the new
    holder has not overwritten yet) and is not reported.
    """
    deadline = time.monotonic() + _HOLDER_GRACE_SECONDS
    while True:
        holder = Holder.read(path)
        if holder is not None and holder.alive():
            return holder
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _write_holder(path: Path, holder: Holder) -> None:
    """Writes the sidecar by rename, so a waiter never reads half a record."""
    target = holder_path(path)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(holder)) + "\n")
    os.replace(tmp, target)
