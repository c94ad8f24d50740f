"""Specification of the node's listening socket: idle and greedy callers cannot lock others out.

Raw TCP sockets play the hostile callers; DCMTK's echoscu and pynetdicom the honest ones.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import require_tool
from tests.nodeproc import NODE_AET, SCU_AET, dcmtk_env, running_node, wait_for

OTHER_AET = "OTHER_SCU"


def echoscu(port: int) -> subprocess.CompletedProcess[str]:
    """DCMTK's C-ECHO from 127.0.0.1; a caller that hangs counts as a failure."""
    tool = require_tool("echoscu", "dcmtk")
    command = [tool, "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", str(port)]
    try:
        return subprocess.run(command, capture_output=True, text=True, env=dcmtk_env(), timeout=20)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", "echoscu hung")


def echo_from(address: str, port: int, ae_title: str = SCU_AET) -> bool:
    """pynetdicom's C-ECHO from the local address ``address`` (any 127.x.y.z is loopback)."""
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET, bind_address=(address, 0))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


@contextmanager
def idle_connections(
    port: int, count: int, source: str = "127.0.0.1"
) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to the node that never send a byte."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            sock.settimeout(15)
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_the_node(sock: socket.socket) -> bool:
    """Whether the node closed this connection (end of stream or reset within the timeout)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_closed_before_they_hold_an_association_slot(tmp_path: Path) -> None:
    # Two slots; six callers that connect and say nothing used to hold them for the ACSE
    # timeout (30 s), and every honest caller was rejected meanwhile.
    extra = {"node": {"max_associations": 2, "request_timeout_s": 2}}
    with running_node(tmp_path, extra) as node:
        with idle_connections(node.port, 6) as idle:
            echo = echoscu(node.port)
            assert echo.returncode == 0, echo.stderr
            assert all(closed_by_the_node(sock) for sock in idle)
        assert node.log().count("no association request within node.request_timeout_s") == 6
        assert node.process.poll() is None


def test_one_host_cannot_hold_every_connection(tmp_path: Path) -> None:
    # The greedy host is 127.0.0.3: the harness's own readiness probes come from 127.0.0.1.
    extra = {
        "node": {"max_associations_per_host": 2, "request_timeout_s": 30},
        "peers": {
            "greedy": {"ae_title": SCU_AET, "host": "127.0.0.3"},
            "other": {"ae_title": OTHER_AET, "host": "127.0.0.2"},
        },
    }
    with running_node(tmp_path, extra) as node:
        with idle_connections(node.port, 2, source="127.0.0.3"):
            with idle_connections(node.port, 1, source="127.0.0.3") as (third,):
                assert closed_by_the_node(third), "a third connection from the host is refused"
            assert not echo_from("127.0.0.3", node.port)
            # Another host is not held up by this one.
            assert echo_from("127.0.0.2", node.port, OTHER_AET)
        # Once the host's connections are gone, it is served again.
        assert wait_for(lambda: echo_from("127.0.0.3", node.port), timeout=15)
        assert "node.max_associations_per_host" in node.log()
