"""A lock held across the threads of one process and across processes, waiting in the kernel.

A thread lock, then ``flock`` on a file. ``flock`` and not ``fcntl``/``lockf`` record locks: those
belong to the process, and the kernel's deadlock check, which sees processes and not threads,
refused ("Resource deadlock avoided") a thread of one receiving process waiting for a lock
another process held while another thread of that process held a second lock the other was
waiting for — no deadlock, two pairs of threads.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


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


__all__ = ["FileLock"]
