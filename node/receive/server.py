"""The listening socket: pynetdicom's threaded server with the door kept in the node's hands.

pynetdicom's server does the TLS handshake in its accept loop, with no timeout: one idle TCP
connection from any host stopped every other caller until it went away (25 s and more). And a
connection holds a thread, and once associated a slot of ``node.max_associations``, until its
A-ASSOCIATE-RQ arrives or the ACSE timeout (30 s) passes: twelve idle sockets held every slot.

:class:`NodeServer` changes three things, all before pynetdicom sees the connection:

- the accept loop only accepts; the TLS handshake runs in the connection's own thread, bounded
  by ``node.request_timeout_s``;
- a connection that sends nothing within ``node.request_timeout_s`` is closed before any
  association (and so any slot) exists;
- one host holds at most ``node.max_associations_per_host`` connections; more are closed at
  once, so that a single caller cannot take every thread and slot from the others.

Each refusal is logged with the caller's address (no patient data exists yet) and counted.
"""

from __future__ import annotations

import select
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from node.core.logging import get_logger

log = get_logger("node.receive.server")


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, hardened at the door (module docstring).

    Parameters are pynetdicom's (through :meth:`pynetdicom.ae.ApplicationEntity.make_server`),
    with ``ssl_context`` None (pynetdicom would handshake in the accept loop), plus:

    tls
        The server TLS context, or None for plain DICOM.
    request_timeout_s
        How long a new connection may take to finish the TLS handshake and to start sending.
    max_per_host
        Connections one address may hold at once.
    count
        Called with a counter name for each refusal (the receiver's counters).
    listening
        A socket already bound and listening (a further receiving process's, passed from the
        first: :mod:`node.receive.processes`); None binds ``address`` as usual.
    """

    def __init__(
        self,
        *args: Any,
        tls: ssl.SSLContext | None = None,
        request_timeout_s: float = 10.0,
        max_per_host: int = 8,
        count: Callable[[str], None] = lambda name: None,
        listening: socket.socket | None = None,
        **kwargs: Any,
    ) -> None:
        # Read by server_bind / server_activate, which the base class calls from __init__.
        self._listening = listening
        super().__init__(*args, **kwargs)
        self.tls = tls
        self.request_timeout_s = request_timeout_s
        self.max_per_host = max_per_host
        self._count = count
        self._per_host: Counter[str] = Counter()
        self._hosts_lock = threading.Lock()

    def server_bind(self) -> None:
        """Bind, or take the listening socket given; either way accept without blocking.

        Several processes may accept from one listening socket: the one that loses the race for
        a connection must get EAGAIN at once (socketserver ignores it), not wait in accept()
        for the next one — a wait there also held up shutdown().
        """
        if self._listening is not None:
            if self.socket is not None:
                self.socket.close()
            self.socket = self._listening
            self.server_address = self._listening.getsockname()
        else:
            super().server_bind()
        if self.socket is not None:
            self.socket.settimeout(0.0)

    def server_activate(self) -> None:
        """Listen (a given socket already does)."""
        if self._listening is None:
            super().server_activate()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Accept the connection unless its host already holds ``max_per_host``."""
        host = str(client_address[0])
        with self._hosts_lock:
            if self._per_host[host] >= self.max_per_host:
                refused = True
            else:
                self._per_host[host] += 1
                refused = False
        if refused:
            self._count("connections_refused:per_host")
            log.warning(
                "connection refused: the host holds node.max_associations_per_host connections",
                address=host,
                limit=self.max_per_host,
            )
        return not refused

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: TLS handshake and the first bytes, then pynetdicom."""
        host = str(client_address[0])
        try:
            ready = self._opened(request, host)
            if ready is not None:
                super().process_request_thread(ready, client_address)
        finally:
            with self._hosts_lock:
                self._per_host[host] -= 1
                if self._per_host[host] <= 0:
                    del self._per_host[host]

    def _opened(self, request: socket.socket, host: str) -> socket.socket | None:
        """The connection, TLS done and its first bytes waiting; None when it was closed."""
        sock = request
        try:
            sock.settimeout(self.request_timeout_s)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
            waiting = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            if not waiting:
                waiting = bool(select.select([sock], [], [], self.request_timeout_s)[0])
            if not waiting:
                self._count("connections_closed:request_timeout")
                log.warning(
                    "connection closed: no association request within node.request_timeout_s",
                    address=host,
                    timeout_s=self.request_timeout_s,
                )
                self.shutdown_request(sock)
                return None
            # pynetdicom's reactor waits with select() itself.
            sock.settimeout(None)
            return sock
        except (OSError, ssl.SSLError) as exc:
            self._count("connections_closed:tls")
            log.warning(
                "connection closed: TLS handshake failed or timed out",
                address=host,
                error=type(exc).__name__,
            )
            self.shutdown_request(sock)
            return None
