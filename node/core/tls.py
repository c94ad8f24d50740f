"""DICOM TLS (PS3.15 secure transport): SSL contexts for the node's AE and for its calls.

TLS 1.2 at least. As a server the node presents ``security.tls_cert`` and, when
``security.require_client_cert`` is on, accepts only callers whose certificate ``tls_ca`` signs.
As a client (``[peers.NAME] tls = true``) it verifies the peer's chain against ``tls_ca``,
checks that the certificate names the peer's ``host`` (a DNS name or an IP address in its subject
alternative names; ``tls_check_hostname = false`` for a peer whose certificate does not, which
should then be pinned) and presents its own certificate.

Pinning (``[peers.NAME] tls_fingerprint``, the SHA-256 of the peer's certificate): a chain that
``tls_ca`` signs proves only that the CA issued it, and one CA often signs every device of a
hospital. A pinned peer must present exactly that certificate: the node refuses an association
from that peer's AE title with another certificate (or none), and drops one it called.
"""

from __future__ import annotations

import hashlib
import ssl
from typing import Any

from node.core.errors import ConfigurationError
from node.core.settings import SecuritySection


class TLSConfigError(ConfigurationError):
    """The TLS files cannot be used; the message names the file and the reason."""


def _load(action: str, load: object, *paths: object) -> None:
    try:
        load(*paths)  # type: ignore[operator]
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(str(p) for p in paths if p is not None)
        raise TLSConfigError(f"cannot load {action} from {files}: {exc}") from None


def server_context(security: SecuritySection) -> ssl.SSLContext | None:
    """The AE's context, or None when TLS is not configured (plain DICOM)."""
    if security.tls_cert is None or security.tls_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(
        "the node's certificate and key",
        context.load_cert_chain,
        security.tls_cert,
        security.tls_key,
    )
    if security.tls_ca is not None:
        _load("the CA certificates", context.load_verify_locations, security.tls_ca)
    if security.require_client_cert:
        if security.tls_ca is None:
            raise TLSConfigError(
                "security.require_client_cert needs security.tls_ca to verify callers"
            )
        context.verify_mode = ssl.CERT_REQUIRED
    elif security.tls_ca is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(security: SecuritySection, *, check_hostname: bool = True) -> ssl.SSLContext:
    """The context for calling a peer marked ``tls = true`` (see the module docstring)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    if security.tls_ca is None:
        raise TLSConfigError("a peer with tls = true needs security.tls_ca to verify it")
    _load("the CA certificates", context.load_verify_locations, security.tls_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    if security.tls_cert is not None and security.tls_key is not None:
        _load(
            "the node's certificate and key",
            context.load_cert_chain,
            security.tls_cert,
            security.tls_key,
        )
    return context


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and spaces dropped).

    Raises
    ------
    ValueError
        When ``text`` is not 32 bytes in hex.
    """
    digits = text.replace(":", "").replace(" ", "").lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(
            "tls_fingerprint is the SHA-256 of the certificate, 64 hex digits "
            "(openssl x509 -noout -fingerprint -sha256 -in CERT)"
        )
    return digits


def peer_fingerprint(sock: Any) -> str | None:
    """SHA-256 of the certificate the other end of ``sock`` presented (None: no TLS or none)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else None


def association_socket(assoc: Any) -> Any:
    """The network socket under a pynetdicom association (None when it has none)."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    return getattr(transport, "socket", None)
