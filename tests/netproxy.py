"""A loopback TCP proxy whose link a test can cut: a real network fault between two processes.

:class:`CuttableProxy` listens on a free loopback port and relays each connection to a target
(PostgreSQL, typically). :meth:`CuttableProxy.cut` closes every relayed connection and, until
:meth:`CuttableProxy.restore`, closes new ones as soon as they are accepted: what a client sees
when a switch or a firewall drops its host.
"""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class CuttableProxy:
    """Relay ``127.0.0.1:<port>`` to ``target``; cut and restore the link on demand."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._relay, args=(client, upstream), daemon=True).start()

    def _relay(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        try:
            while not self._stop.is_set() and client.fileno() != -1:
                for key, _ in selector.select(timeout=0.2):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            self._close(client, upstream)

    def _close(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            if (client, upstream) in self._pairs:
                self._pairs.remove((client, upstream))
        for sock in (client, upstream):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        """Drop every relayed connection; refuse new ones until :meth:`restore`."""
        self._cut.set()
        with self._lock:
            pairs = list(self._pairs)
        for client, upstream in pairs:
            self._close(client, upstream)

    def restore(self) -> None:
        """Relay new connections again."""
        self._cut.clear()

    def close(self) -> None:
        """Stop relaying and listening."""
        self._stop.set()
        self.cut()
        self._listener.close()
        self._thread.join(5)


@contextmanager
def cuttable_proxy(target: tuple[str, int]) -> Iterator[CuttableProxy]:
    """A :class:`CuttableProxy` that is closed after the block."""
    proxy = CuttableProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
