"""The node's HTTP servers (the console, the STOW-RS receiver): uvicorn, configured once.

Both answer for themselves: no uvicorn access lines (the node logs what happened), no Server
header, and the client address is the connection's own — never taken from X-Forwarded-For,
which any local process could set (the console reads it only from ``web.trusted_proxies``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn


def http_server(
    app: Any, host: str, port: int, tls_cert: Path | None, tls_key: Path | None
) -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``host:port``, HTTPS when both files are given."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)
