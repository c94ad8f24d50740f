"""DICOM TLS (PS3.15 secure transport): SSL contexts for the node's AE and for its calls.

TLS 1.2 at least. As a server the node presents ``security.tls_cert`` and, when
``security.require_client_cert`` is on, accepts only callers whose certificate ``tls_ca`` signs.
As a client (``[peers.NAME] tls = true``) it verifies the peer's chain against ``tls_ca`` and
presents its own certificate. Host names are not checked: DICOM peers are configured by address
and their certificates rarely name it; the chain and the AE title policy identify them.
"""

from __future__ import annotations

import ssl

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


def client_context(security: SecuritySection) -> ssl.SSLContext:
    """The context for calling a peer marked ``tls = true``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
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
