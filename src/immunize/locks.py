"""Locks that keep two processes out of one run directory, and out of one cache entry being built.

Both are ``fcntl.flock`` locks on a small file. The kernel drops such a lock when its process dies,
so a ``kill -9`` never leaves a stale lock (a left-over *file* is harmless: locking it succeeds).
The file holds the holder's pid, host and start time, for the message of whoever finds it locked.

- ``run_lock(directory)``: the directory is this run's. A second process fails at once, with one
  line naming the holder. In a distributed job only rank 0 takes it (the other ranks work under it).
- ``cache_lock(target, what)``: building a shared cache entry (trained judges, a converted model,
  task files). A second process waits, saying once whom it waits for; it then re-checks the cache
  and reuses what the first built.

Within one process both are re-entrant: a nested lock on a path this process holds only counts
(``flock`` on a second descriptor of the same file would refuse the process itself). A lock on
another path is another file, so an ``immunize run`` holding its run directory never blocks the
defence and attack runners that lock their own directories inside it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from immunize.errors import ImmunizeError

log = logging.getLogger(__name__)

LOCK_FILE = ".immunize.lock"

# Lock files this process holds, with how many nested holds each has.
_held: dict[Path, int] = {}


class _Busy(Exception):
    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


@contextmanager
def run_lock(directory: str | Path, option: str = "--output_dir") -> Iterator[None]:
    """Hold ``directory`` (made if missing) for this run; another process holding it fails at once.

    Folders made here are removed again if the run leaves them empty, so a run that fails before
    writing anything leaves nothing behind.
    """
    from immunize.distributed import is_main

    directory = Path(directory)
    if not is_main():
        yield
        return
    with _made(directory, option):
        try:
            with _locked(directory / LOCK_FILE, wait=None):
                yield
        except _Busy as busy:
            raise ImmunizeError(f"{option} {directory}: in use by {busy.holder}; "
                                f"wait for it or choose another {option}") from None


@contextmanager
def cache_lock(target: str | Path, what: str) -> Iterator[None]:
    """Hold the right to build ``target`` (a cache entry); waits while another process builds it.

    The lock file sits beside ``target`` (``.NAME.lock``): builders replace ``target`` whole.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)

    def say(holder: str) -> None:
        log.warning("waiting for %s building %s", holder, what)

    with _locked(target.parent / f".{target.name}.lock", wait=say):
        yield


@contextmanager
def _made(directory: Path, option: str) -> Iterator[None]:
    from immunize.io import check_output_dir

    # Every runner takes its lock before loading anything: an unusable place fails here, at once.
    check_output_dir(directory, option)
    made = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ImmunizeError(f"{option} {directory}: cannot create it ({err.strerror or err})") from None
    try:
        yield
    finally:
        for path in made:
            try:
                path.rmdir()
            except OSError:  # not empty: the run wrote something, keep it (and its parents)
                break


@contextmanager
def _locked(path: Path, wait: Callable[[str], None] | None) -> Iterator[None]:
    key = path.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    fd = _acquire(path, wait)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        # Removed while still locked: a waiter then finds its file gone and locks the new one
        # (removed after unlocking, a waiter could hold a file nobody else sees).
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, wait: Callable[[str], None] | None) -> int:
    """A descriptor holding the lock on ``path``; busy: ``wait(holder)`` then block, or raise ``_Busy``."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ImmunizeError(f"{path}: cannot create the lock file ({err.strerror or err})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait is None:
                    raise _Busy(_holder(fd)) from None
                wait(_holder(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _is_current(fd, path):
                _write_holder(fd)
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # the previous holder removed this file on release: lock the one now there


def _is_current(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)


def _holder(fd: int, patience: float = 1.0) -> str:
    """Who holds the lock, from its file. A holder writes it right after locking, so an empty or
    partial record is read again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            return f"pid {record['pid']} on host {record['host']} (since {record['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.01)
