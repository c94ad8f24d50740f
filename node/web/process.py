"""The console's process: `serve` spawns it beside the workers and replaces it if it dies.

A process of its own so that a slow page never holds up the DICOM front door (the receiving
process's interpreter lock), and so that it never imports torch (nothing in node.web does).
It serves with uvicorn on ``web.host``:``web.port`` (HTTPS with ``web.tls_cert``/``tls_key``)
and reads the same store as everything else.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from multiprocessing.process import BaseProcess
from typing import Any

from node.core.logging import configure_logging, get_logger, log_queue
from node.core.settings import Settings

log = get_logger("node.web.process")

#: Seconds between a console's death and its replacement (a port taken by another program
#: would otherwise be retried in a tight loop).
RESTART_DELAY_S = 5.0


def console_main(settings_data: dict[str, Any], parent_pid: int, queue: Any = None) -> None:
    """Entry point of the console process: serve until the parent goes away or SIGTERM."""
    from node.core.http import http_server
    from node.jobs.runner import die_with_parent
    from node.store.database import Store
    from node.web.app import create_app

    die_with_parent(parent_pid)
    set_process_name(PROCESS_NAME)
    # Out of the terminal's process group: a Ctrl-C reaches `serve`, which stops this process
    # itself (uvicorn would otherwise catch it first and the monitor would see a death).
    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    settings = Settings.model_validate(settings_data)
    configure_logging(settings.node.log_level, forward_to=queue)
    store = Store(settings.database_url, schema="check")
    web = settings.web
    # Our own lines (the audit log, "console action") say what happened, not uvicorn's.
    server = http_server(create_app(settings, store), web.host, web.port, web.tls_cert, web.tls_key)
    log.info("console listening", url=console_url(settings))
    server.run()
    store.close()


#: The console process's name in ps/top (/proc/PID/comm: 15 characters at most).
PROCESS_NAME = "mvi-node-web"


def set_process_name(name: str) -> None:
    """Name this process for ps and top (Linux; elsewhere nothing happens)."""
    import contextlib
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


def console_url(settings: Settings) -> str:
    """Where the console answers."""
    web = settings.web
    scheme = "https" if web.tls_cert else "http"
    host = f"[{web.host}]" if ":" in web.host else web.host
    return f"{scheme}://{host}:{web.port}/"


class Console:
    """The console process of a running node, replaced when it dies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._process: BaseProcess | None = None
        self._stop = threading.Event()
        # stop() and a replacement never interleave: no console is started after stop().
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    def _spawn(self) -> BaseProcess:
        process = self._context.Process(
            target=console_main,
            args=(self.settings.model_dump(mode="python"), os.getpid(), log_queue()),
            name="mvi-node-console",
            daemon=True,
        )
        process.start()
        return process

    def start(self) -> None:
        """Start the console and a thread that replaces it if it dies."""
        self._process = self._spawn()
        self._monitor = threading.Thread(target=self._watch, name="console-monitor", daemon=True)
        self._monitor.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            process = self._process
            if process is None or process.is_alive():
                continue
            log.error(
                "the console stopped; starting it again",
                exitcode=process.exitcode,
                url=console_url(self.settings),
                in_s=RESTART_DELAY_S,
            )
            if self._stop.wait(RESTART_DELAY_S):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self._process = self._spawn()

    def alive(self) -> bool:
        """Whether the console process runs."""
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the console (uvicorn finishes the requests in flight on SIGTERM)."""
        with self._lock:
            self._stop.set()
            process = self._process
        if process is None:
            return
        if process.is_alive():
            process.terminate()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join(1.0)
