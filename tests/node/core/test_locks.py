"""Specification of the lock held across threads and processes (receiving processes, requery)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from node.core.locks import FileLock
from tests.nodeproc import wait_for

HOLDER = """
import sys, time
from pathlib import Path
from node.core.locks import FileLock
lock, marks = FileLock(Path(sys.argv[1])), Path(sys.argv[2])
with lock:
    (marks / "held").touch()
    while not (marks / "go").exists():
        time.sleep(0.01)
    (marks / "released").touch()
"""


def test_another_process_waits_until_the_holder_lets_go(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "lock"), str(tmp_path)])
    try:
        wait_for(lambda: (tmp_path / "held").exists(), timeout=30)
        lock = FileLock(tmp_path / "lock")
        acquired = threading.Event()

        def take() -> None:
            with lock:
                # Only once the holder has let go.
                assert (tmp_path / "released").exists()
                acquired.set()

        taker = threading.Thread(target=take)
        taker.start()
        assert not acquired.wait(0.3), "taken while another process held it"
        (tmp_path / "go").touch()
        taker.join(30)
        assert acquired.is_set()
    finally:
        holder.wait(30)


def test_threads_of_one_process_take_turns(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "lock")
    inside = 0
    most = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, most
        for _ in range(200):
            with lock:
                with guard:
                    inside += 1
                    most = max(most, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most == 1
    lock.close()
    with lock:  # opened again after close
        pass


def test_a_wakeup_outlives_a_waiter_that_was_killed() -> None:
    """A worker killed while it waited (the OOM killer, kill -9) must not leave the wake-up
    stuck for the processes that remain, as a multiprocessing.Event's sleeper count did."""
    import multiprocessing
    import os
    import signal

    from node.core.locks import Wakeup

    context = multiprocessing.get_context("spawn")
    wakeup = Wakeup(context.Semaphore(0))
    waiter = context.Process(target=_wait_long, args=(wakeup,), daemon=True)
    waiter.start()
    try:
        wait_for(lambda: waiter.pid is not None and _sleeping(waiter.pid), timeout=60)
        assert waiter.pid is not None
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.join(30)
        assert waiter.exitcode == -signal.SIGKILL
        wakeup.set()
        wakeup.set()
        assert wakeup.wait(5), "set before the wait: woken at once"
        assert not wakeup.wait(0.1), "two wake-ups before looking are one"
    finally:
        if waiter.is_alive():
            waiter.kill()


def _wait_long(wakeup: object) -> None:
    wakeup.wait(600)  # type: ignore[attr-defined]


def _sleeping(pid: int) -> bool:
    # Blocked in the semaphore's wait: state S with the wait channel in a futex.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        wchan = Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "S" and "futex" in wchan
