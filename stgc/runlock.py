"""One writer per folder: a lock held for the whole of a training run (``stgc train``, the run folder) or a
sweep (``stgc sweep``, its results folder).

    with folder_lock(run_dir, "run"):
        ...   # a second process asking for run_dir raises FolderLockedError at once

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<folder>/.stgc.lock``. The kernel releases an flock when the
file is closed, which includes its holder dying (SIGKILL, the OOM killer), so the lock of a dead process is
free for the next writer without any staleness rule to get wrong. The file holds the holder's pid, host,
command, start time and launch key, read back to name the holder when a second writer is refused. It is
never deleted (deleting it while another process waits on it would let two processes lock two files).

Several processes of one launch (the ``deepspeed`` / ``torchrun`` / ``accelerate`` ranks, which all call
``train``) are one writer. Rank 0 takes the lock and records the launch key, the rendezvous address
``MASTER_ADDR:MASTER_PORT`` (two launches alive at once cannot share it: the second could not bind the
port). The other ranks take no lock: they check that the lock is held by their own launch, waiting up to
``RANK_WAIT_S`` for rank 0 to get there, and stop with the same message otherwise. Rank 0 of a second
launch stops at once, and the launchers then stop its other ranks.

Within one process the lock is re-entrant (a sweep evaluating a run, then ``train`` on the same folder).

Taking the lock creates the folder. When the locked block fails and left nothing but the lock file in a
folder the lock created (bad input found after the lock: a missing data path), the folder is removed
again, so that a refused command leaves no trace.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".stgc.lock"
RANK_WAIT_S = 120.0  # how long a rank > 0 waits for its rank 0 to take the lock (model loading comes first)
HOLDER_WAIT_S = 2.0  # how long a refused process waits for the holder's record (written just after locking)

# resolved folder -> (open lock file or None on ranks > 0, depth): the locks this process holds
_HELD: dict[Path, list[Any]] = {}


class FolderLockedError(ValueError):
    """Another process is writing the folder (one line naming the holder and the ways out)."""


def launch_key() -> str | None:
    """The rendezvous address of a multi-process launch (None when this process runs alone)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"{addr}:{port}" if addr and port and world > 1 else None


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0) if launch_key() is not None else 0


def read_holder(folder: str | os.PathLike) -> dict[str, Any]:
    """What the lock file of ``folder`` says about its last holder ({} when unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _refusal(folder: Path, what: str, holder: dict[str, Any]) -> FolderLockedError:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    since = holder.get("started", "?")
    command = " ".join(str(holder.get("command", "")).split())[:120]
    gone = ""
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
        # flock is held by an open file: a child the holder forked (a data-loader worker) still has it
        gone = " (that pid is gone: a process it started still holds the lock; stop that one)"
    where = "output_dir" if what == "run" else "--out folder"
    return FolderLockedError(
        f"{folder} is in use by another {what}: pid {pid} on host {host}{gone}, started {since}, running "
        f"`{command}`. A folder has one writer at a time: wait for that {what} to finish (or stop it), or "
        f"use another {where}."
    )


def _current_holder(folder: Path) -> dict[str, Any]:
    """The holder's record, once it has written it: a holder writes its record just after taking the
    lock, so a refused process may read the file in between (empty, or the previous holder's record)."""
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        holder = read_holder(folder)
        pid = holder.get("pid")
        mine = holder.get("host") == socket.gethostname()
        if isinstance(pid, int) and (not mine or _pid_alive(pid)) or time.monotonic() > deadline:
            return holder
        time.sleep(0.01)


def _try_flock(f: Any, mode: int) -> bool:
    try:
        fcntl.flock(f, mode | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _acquire(folder: Path, what: str) -> Any:
    """Rank 0 / a lone process: lock the file or raise naming the holder."""
    path = folder / LOCK_NAME
    # "a" creates the file without truncating what a holder wrote; O_CLOEXEC (Python's default) keeps
    # programs this one starts from inheriting the lock
    f = path.open("a+")
    try:
        locked = _try_flock(f, fcntl.LOCK_EX)
    except OSError as err:
        f.close()
        raise FolderLockedError(
            f"{folder}: cannot lock {path} ({err}); this file system does not support flock: put the "
            f"{what} folder on a local or NFSv4 file system."
        ) from None
    if not locked:
        f.close()
        raise _refusal(folder, what, _current_holder(folder))
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
        "launch": launch_key(),
    }
    f.seek(0)
    f.truncate()
    f.write(json.dumps(info) + "\n")
    f.flush()
    return f


def _join_launch(folder: Path, what: str, key: str) -> None:
    """A rank > 0: return once the lock file names this launch as its holder; raise if it names another
    after ``RANK_WAIT_S``. Only the file is read: probing the flock, even shared and for a moment, could
    make this launch's own rank 0 fail to take it."""
    deadline = time.monotonic() + RANK_WAIT_S
    while True:
        holder = read_holder(folder)
        if holder.get("launch") == key:
            return
        if time.monotonic() > deadline:
            if holder:
                raise _refusal(folder, what, holder)
            raise FolderLockedError(
                f"{folder}: rank 0 of this launch ({key}) did not lock the {what} folder within "
                f"{RANK_WAIT_S:.0f} s; see rank 0's error."
            )
        time.sleep(0.2)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the lock of ``folder`` (created if missing) for the ``with`` block; ``FolderLockedError`` at once
    if another process (or launch) holds it. ``what`` ("run" / "sweep") only words the message."""
    folder = Path(folder)
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _HELD:  # re-entrant within this process
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    launch = launch_key()
    if launch is not None and _rank() != 0:
        _join_launch(folder, what, launch)
        handle = None
    else:
        handle = _acquire(folder, what)
    _HELD[key] = [handle, 1]
    try:
        yield folder
    except BaseException:
        if handle is not None and created and [p.name for p in folder.iterdir()] == [LOCK_NAME]:
            # nothing was written: take back the folders this lock made (the lock file goes while still
            # held, so no other process can have taken it)
            (folder / LOCK_NAME).unlink()
            for path in created:  # innermost first
                with contextlib.suppress(OSError):
                    path.rmdir()
        raise
    finally:
        del _HELD[key]
        if handle is not None:
            handle.close()  # releases the flock


__all__ = ["FolderLockedError", "LOCK_NAME", "folder_lock", "launch_key", "read_holder"]
