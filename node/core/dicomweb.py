"""The node's DICOMweb client for one peer: dicomweb-client on a requests session that carries
the peer's credentials and TLS trust, with no retries of its own (the outbox and the re-query
have theirs, with backoff and give-up).

Credentials come from ``peers.NAME.username`` / ``password`` / ``token`` (the configuration or
``MVI_PEERS__NAME__PASSWORD``…) and are never logged: an answer is described by its HTTP status
and the DICOM failure reasons it names, never by the request's headers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from node.core.settings import PeerSection

if TYPE_CHECKING:
    from dicomweb_client.api import DICOMwebClient

#: Seconds to connect, and to wait for an answer (a STOW of a 200-frame SEG takes a while).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0


def web_client(
    peer: PeerSection, on_response: Callable[[Any], None] | None = None
) -> DICOMwebClient:
    """A client of ``peer.dicomweb_url`` with its authentication and certificate checks."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    if peer.dicomweb_url is None:
        raise ValueError("the peer has no dicomweb_url")
    session = requests.Session()
    # TLS verification stays on; a private CA replaces the system's store.
    session.verify = str(peer.dicomweb_ca) if peer.dicomweb_ca is not None else True
    # Proxies and credentials from ~/.netrc or the environment would bypass the peer's own.
    session.trust_env = False
    if peer.auth == "basic":
        session.auth = (peer.username or "", peer.password.get_secret_value())
    elif peer.auth == "bearer":
        session.headers["Authorization"] = f"Bearer {peer.token.get_secret_value()}"
    # STOW-RS answers in the DICOM JSON model (PS3.18 also allows XML; JSON is what we read).
    session.headers["Accept"] = "application/dicom+json"
    if on_response is not None:
        # The answer as it came: dicomweb-client hides a 202's status, and reads a body only
        # when its media type is exactly application/dicom+json.
        session.hooks["response"].append(lambda response, *args, **kwargs: on_response(response))
    client = DICOMwebClient(
        peer.dicomweb_url, session=session, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    )
    client.set_http_retry_params(retry=False)
    return client
