"""A lock on a training workdir, so two runs never write the same checkpoints.

`<workdir>/medjax.lock` holds the host name, pid and process start time of the run that holds it. It is
created atomically (O_CREAT | O_EXCL) on local and network file systems; on object stores (gs://...),
which have no such operation, it is checked and written, which only catches runs that start apart. A lock
left by a dead process of this host is taken over (with a log line); any other lock is an error naming
its holder. The lock is removed when the run ends, however it ends short of SIGKILL.
"""

import contextlib
import json
import os
import socket

from absl import logging
from etils import epath

LOCK_NAME = "medjax.lock"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start_time: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start_time is None or _start_time(pid) in (None, start_time)


def _describe(holder: dict) -> str:
    return f"host {holder.get('host')!r}, pid {holder.get('pid')}"


def _read(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def acquire(workdir: str) -> epath.Path:
    """Creates the workdir's lock file, or raises WorkdirLockedError naming the run that holds it."""
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid())}
    text = json.dumps(me)
    local = "://" not in workdir
    for _ in range(3):
        if local:
            try:
                fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                return path
        elif not path.exists():
            path.write_text(text)
            return path
        holder = _read(path)
        if not holder:  # Being written by its creator, or unreadable.
            raise WorkdirLockedError(
                f"Workdir {workdir} is locked ({path} exists but names no holder); if no run uses it, delete it."
            )
        pid = holder.get("pid")
        if (
            holder.get("host") == me["host"]
            and isinstance(pid, int)
            and not _alive(pid, holder.get("start_time"))
        ):
            logging.warning(
                "Taking over the stale lock %s of %s, which is not running.", path, _describe(holder)
            )
            path.unlink(missing_ok=True)
            continue
        raise WorkdirLockedError(
            f"Workdir {workdir} is in use by another run ({_describe(holder)}; lock {path}). "
            "Wait for it to end, or delete the lock file if that run is gone."
        )
    raise WorkdirLockedError(f"Could not lock workdir {workdir}: {path} keeps reappearing.")


def release(path: epath.Path) -> None:
    """Removes the lock if this process still holds it."""
    if _read(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def lock(workdir: str, enabled: bool = True):
    """Holds the workdir lock for the duration of the block (`enabled=False`: no lock, e.g. non-primary
    processes of a multi-process run)."""
    if not enabled:
        yield None
        return
    path = acquire(workdir)
    try:
        yield path
    finally:
        release(path)
