"""Locks and wake-ups across the threads of one process and across processes, waiting in the
kernel.

A thread lock, then ``flock`` on a file. ``flock`` and not ``fcntl``/``lockf`` record locks: those
belong to the process, and the kernel's deadlock check, which sees processes and not threads,
refused ("Resource deadlock avoided") a thread of one receiving process waiting for a lock
another process held while another thread of that process held a second lock the other was
waiting for — no deadlock, two pairs of threads.

A :class:`Wakeup` is a counting semaphore, not a :class:`multiprocessing.Event`: an Event keeps a
count of its sleepers under a shared lock, and a process killed while it waited (the OOM killer
takes an idle worker that holds models) stays counted for ever, so the next ``set()`` blocks for
good. A semaphore is a counter in the kernel; a dead waiter leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any


class FileLock:
    """Hold with ``with``; the file is created (mode 0600) and opened when first needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> None:
        # The thread lock first: flock on the process's one descriptor would not keep out a
        # second thread of the same process.
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *_exc: object) -> None:
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        """Close the file (opened again when next held)."""
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Wakeup:
    """Tells a waiter that there is something to do; waking it twice before it looked is once.

    Parameters
    ----------
    semaphore
        A fresh semaphore with value 0: :func:`threading.Semaphore` within one process, a
        :mod:`multiprocessing` context's ``Semaphore`` across processes (then pass the
        :class:`Wakeup` to the processes it wakes when they are started).
    """

    def __init__(self, semaphore: Any) -> None:
        self._semaphore = semaphore

    def set(self) -> None:
        """Wake a waiter, now or when it next waits; never blocks."""
        self._semaphore.release()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; whether woken (the wake-ups that piled up are spent)."""
        woken = bool(self._semaphore.acquire(timeout=timeout))
        while woken and self._semaphore.acquire(False):
            pass
        return woken


__all__ = ["FileLock", "Wakeup"]
