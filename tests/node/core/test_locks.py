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
