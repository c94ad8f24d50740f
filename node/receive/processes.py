"""More receiving processes on the node's one DICOM port.

One Python process serves every association in threads under one interpreter lock: eight
associations at once got 1.5 times one association's rate, on any number of cores. So `serve`
spawns ``node.receive_processes - 1`` more receiving processes (pre-fork, as web servers do):

- the first process binds and listens as before (a port another program holds stops the start;
  no ``SO_REUSEPORT``, so a second node cannot quietly share the port);
- each further process gets that listening socket itself (passed when it is spawned), builds the
  same AE, handlers and store, and accepts from it: the kernel gives each new connection to
  whichever process accepts it first;
- what the handlers report goes back to the first process over a queue — each stored instance's
  study (the quiet timers live there) and the counters (``/metrics`` and the closing log line
  stay whole).

Limits are each process's own: ``node.max_associations`` and ``node.max_associations_per_host``
apply per receiving process. A receiving process that dies is replaced within a second; a
connection it was serving is cut (the sender retries what was not acknowledged, and everything
acknowledged is durable); one that stops on SIGTERM (systemd stops the whole unit) is not.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections import Counter
from multiprocessing.process import BaseProcess
from typing import Any

from node.core.logging import configure_logging, get_logger, log_queue
from node.core.settings import Settings
from node.receive.receiver import ReceiverState

log = get_logger("node.receive.processes")

#: How often a receiving process sends its counters to the first one (seconds).
COUNTS_INTERVAL_S = 0.5
#: A receiving process that dies sooner than this after its start is replaced only this long
#: after its start (one that cannot start is not restarted in a tight loop).
RESTART_BACKOFF_S = 5.0
#: The name of a further receiving process in ps/top.
PROCESS_NAME = "mvi-node-recv"


def receiving_main(
    settings_data: dict[str, Any],
    listening: socket.socket,
    events: Any,
    parent_pid: int,
    log_forward: Any = None,
) -> None:
    """Entry point of a further receiving process: serve ``listening`` until told to stop."""
    from node.core.tls import server_context
    from node.jobs.runner import die_with_parent
    from node.receive.receiver import start_receiver
    from node.store.database import Store
    from node.web.process import set_process_name

    die_with_parent(parent_pid)
    set_process_name(PROCESS_NAME)
    # `serve` stops this process itself; a Ctrl-C in the terminal is for `serve` alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    settings = Settings.model_validate(settings_data)
    configure_logging(settings.node.log_level, forward_to=log_forward)
    store = Store(settings.database_url, schema="check")
    state = ReceiverState(
        settings=settings,
        store=store,
        spool_root=settings.node.data_dir / "spool",
        on_instance=lambda study_uid, own: events.put(("instance", study_uid, own)),
    )
    server = start_receiver(state, server_context(settings.security), listening=listening)
    sent: Counter[str] = Counter()
    while not stop.wait(COUNTS_INTERVAL_S):
        _send_counts(state, sent, events)
    server.shutdown()
    _send_counts(state, sent, events)
    store.close()


def _send_counts(state: ReceiverState, sent: Counter[str], events: Any) -> None:
    with state.lock:
        current = Counter(state.counters)
    delta = current - sent
    if delta:
        events.put(("counts", dict(delta)))
        sent.update(delta)


class ReceivingProcesses:
    """The further receiving processes of a node, replaced when one dies.

    ``state`` is the first process's :class:`ReceiverState`: the instances and counters the
    others report are applied to it as if its own handlers had seen them.
    """

    def __init__(
        self, settings: Settings, listening: socket.socket, state: ReceiverState, count: int
    ) -> None:
        self.settings = settings
        self.count = count
        self._listening = listening
        self._state = state
        self._context = multiprocessing.get_context("spawn")
        self._events: Any = self._context.Queue()
        self._processes: list[BaseProcess] = []
        self._started: list[float] = []
        #: No more replacements (stop() has begun).
        self._stopping = threading.Event()
        #: Every process has ended and its last reports are applied: the threads may end.
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _spawn(self, index: int) -> BaseProcess:
        process = self._context.Process(
            target=receiving_main,
            args=(
                self.settings.model_dump(mode="python"),
                self._listening,
                self._events,
                os.getpid(),
                log_queue(),
            ),
            name=f"mvi-node-receiver-{index + 2}",
            daemon=True,
        )
        process.start()
        return process

    def start(self) -> None:
        """Start the processes, the thread that applies their reports and the one that
        replaces a dead process."""
        self._processes = [self._spawn(index) for index in range(self.count)]
        self._started = [time.monotonic()] * self.count
        for target, name in ((self._apply, "receiver-events"), (self._watch, "receiver-monitor")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("receiving processes started", processes=self.count + 1)

    def _apply(self) -> None:
        while True:
            try:
                event = self._events.get(timeout=0.2)
            except queue.Empty:
                if self._finished.is_set():
                    return
                continue
            except (EOFError, OSError, ValueError):
                return
            try:
                if event[0] == "instance":
                    self._state.on_instance(event[1], event[2])
                elif event[0] == "counts":
                    with self._state.lock:
                        self._state.counters.update(event[1])
            except Exception:
                # One bad report must not leave the others' studies without quiet timers.
                log.exception("a receiving process's report could not be applied")

    def _watch(self) -> None:
        # This thread spawns the replacements and outlives them: a process dies with the thread
        # that started it (PR_SET_PDEATHSIG), so it runs until every process has ended.
        while not self._finished.wait(1.0):
            try:
                self._replace_dead()
            except Exception:
                log.exception("a receiving process could not be replaced; trying again")

    def _replace_dead(self) -> None:
        with self._lock:
            for index, process in enumerate(self._processes):
                if self._stopping.is_set():
                    return
                if process.is_alive() or process.exitcode == 0:
                    # 0: it stopped on SIGTERM (systemd stops the whole unit at once).
                    continue
                if time.monotonic() - self._started[index] < RESTART_BACKOFF_S:
                    continue  # one that dies at once is not restarted in a tight loop
                log.error(
                    "a receiving process stopped; starting another",
                    exitcode=process.exitcode,
                    process=index + 2,
                )
                self._processes[index] = self._spawn(index)
                self._started[index] = time.monotonic()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every further receiving process (associations in flight end as on a restart),
        apply what they reported last, then end the threads."""
        self._stopping.set()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)
        self._finished.set()
        for thread in self._threads:
            thread.join(timeout)
        with contextlib.suppress(OSError, ValueError):
            self._events.close()


def receive_process_count(settings: Settings) -> int:
    """How many processes receive (``node.receive_processes``; ``"auto"``: one per core, at
    most four)."""
    configured = settings.node.receive_processes
    if configured == "auto":
        # The cores this process may run on (a container's CPU set), not the machine's.
        return max(1, min(len(os.sched_getaffinity(0)), 4))
    return int(configured)


__all__ = ["ReceivingProcesses", "receive_process_count", "receiving_main"]
