"""Pre-flight: what would fail with the first patient, found before the node takes one.

A model folder that is not there, ``device = "cuda"`` on a host without CUDA, TLS files that do
not load or do not match, a data folder the node cannot write: each used to pass ``config
check`` and ``serve``'s start, and showed only when a study arrived. :func:`run_checks` looks at
each and returns one :class:`Check` per item; ``mvi-node config check --deep`` prints them and
``mvi-node serve`` refuses to start on a fatal one (one line each).

The models are loaded in a child process (spawned): the receiving process never imports torch.
A peer that does not answer C-ECHO is reported, never fatal: a PACS may be down for maintenance
while the node starts.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.settings import Settings

#: Seconds a peer has to answer the pre-flight C-ECHO (connection and association).
ECHO_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Check:
    """One pre-flight item: whether it passed, what was found, and whether a failure is fatal."""

    name: str
    ok: bool
    detail: str
    fatal: bool = True

    def line(self) -> str:
        """``ok``/``FAILED``/``warning`` and the detail, as the CLI prints it."""
        mark = "ok" if self.ok else "FAILED" if self.fatal else "warning"
        return f"{mark:7} {self.name}: {self.detail}"


def host_checks(settings: Settings) -> list[Check]:
    """The data folder, TLS files and configured model folders (no torch, no network)."""
    checks = [
        _data_folder(settings),
        *_tls(settings),
        *_dicomweb_cas(settings),
        *_model_folders(settings),
    ]
    if settings.node.log_file is not None:
        checks.append(_log_file(settings.node.log_file))
    if settings.web.enabled and settings.cluster.role != "worker":
        checks.extend(_console(settings))
    if settings.dicomweb.enabled and settings.cluster.role != "worker":
        checks.extend(_stow_receiver(settings))
    return checks


def _console(settings: Settings) -> list[Check]:
    """The console's HTTPS files (fatal: it could never start) and its port (a warning: the
    node receives without its console, which retries)."""
    web = settings.web
    checks = _https_files("console HTTPS", "web", web.tls_cert, web.tls_key)
    problem = _port_free(web.host, web.port)
    if problem is not None:
        return [
            *checks,
            Check(
                "console port",
                False,
                f"web.port {web.host}:{web.port}: {problem}; the node receives without its "
                "console until the port is free",
                fatal=False,
            ),
        ]
    return [*checks, Check("console port", True, f"{web.host}:{web.port} free")]


def _stow_receiver(settings: Settings) -> list[Check]:
    """The STOW-RS receiver's HTTPS files and port: both fatal (it runs in serve's process)."""
    section = settings.dicomweb
    checks = _https_files("STOW-RS HTTPS", "dicomweb", section.tls_cert, section.tls_key)
    problem = _port_free(section.host, section.port)
    where = f"dicomweb.port {section.host}:{section.port}"
    checks.append(
        Check(
            "STOW-RS port", problem is None, f"{where}: {problem}" if problem else f"{where} free"
        )
    )
    if not any(p.stow_token.get_secret_value() for p in settings.peers.values()):
        checks.append(
            Check(
                "STOW-RS callers",
                False,
                "no [peers.NAME] has a stow_token: every request will be refused",
                fatal=False,
            )
        )
    return checks


def _https_files(name: str, key: str, cert: Path | None, private: Path | None) -> list[Check]:
    import ssl

    if cert is None or private is None:
        return []
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, private)
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or exc
        return [Check(name, False, f"{key}.tls_cert/tls_key: {why}")]
    return [Check(name, True, f"{cert} and its key load")]


def _port_free(host: str, port: int) -> str | None:
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return str(exc.strerror or exc)
    return None


def _log_file(path: Path) -> Check:
    name = "log file"
    if not path.parent.is_dir():
        return Check(name, False, f"node.log_file: folder {path.parent} does not exist")
    target = path if path.exists() else path.parent
    if path.is_dir() or not os.access(target, os.W_OK):
        return Check(name, False, f"node.log_file: {path} is not writable by this user")
    return Check(name, True, f"{path} writable")


def _data_folder(settings: Settings) -> Check:
    folder = settings.node.data_dir
    name = "data folder"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".preflight-"):
            pass
        stats = os.statvfs(folder)
    except OSError as exc:
        return Check(name, False, f"{folder} is not writable: {exc.strerror or exc}")
    free_mb = stats.f_bavail * stats.f_frsize / 1e6
    floor = settings.node.free_disk_floor_mb
    if free_mb < floor:
        # Not fatal: the node can still deliver results and answer; the receiver refuses stores
        # with 0xA700 until space is freed, and /healthz says why.
        return Check(
            name,
            False,
            f"{folder}: {free_mb:,.0f} MB free, below node.free_disk_floor_mb = {floor}; stores "
            "will be refused (0xA700)",
            fatal=False,
        )
    return Check(name, True, f"{folder} writable, {free_mb:,.0f} MB free")


def _tls(settings: Settings) -> list[Check]:
    from node.core.errors import NodeError
    from node.core.tls import client_context, server_context

    checks = []
    security = settings.security
    if security.tls_cert is not None or security.tls_key is not None:
        try:
            server_context(security)
        except NodeError as exc:
            checks.append(Check("TLS (server)", False, str(exc)))
        else:
            checks.append(Check("TLS (server)", True, f"{security.tls_cert} and its key load"))
    for name, peer in sorted(settings.peers.items()):
        if not peer.tls:
            continue
        try:
            client_context(security, check_hostname=peer.tls_check_hostname)
        except NodeError as exc:
            checks.append(Check(f"TLS to peers.{name}", False, str(exc)))
        else:
            checks.append(Check(f"TLS to peers.{name}", True, "CA and client certificate load"))
    return checks


def _dicomweb_cas(settings: Settings) -> list[Check]:
    """Each DICOMweb peer's private CA bundle loads (else every delivery to it fails)."""
    import ssl

    checks = []
    for name, peer in sorted(settings.peers.items()):
        if peer.dicomweb_url is None or peer.dicomweb_ca is None:
            continue
        try:
            ssl.create_default_context(cafile=str(peer.dicomweb_ca))
        except (OSError, ssl.SSLError) as exc:
            why = getattr(exc, "strerror", None) or exc
            checks.append(Check(f"peers.{name}.dicomweb_ca", False, f"{peer.dicomweb_ca}: {why}"))
        else:
            checks.append(Check(f"peers.{name}.dicomweb_ca", True, f"{peer.dicomweb_ca} loads"))
    return checks


def _model_folders(settings: Settings) -> list[Check]:
    from model.checkpoint_layout import is_checkpoint_dir

    checks = []
    for key, path in (
        ("pipeline.segmenter_dir", settings.pipeline.segmenter_dir),
        ("pipeline.model_dir", settings.pipeline.model_dir),
    ):
        if path is None:
            continue
        if is_checkpoint_dir(path):
            checks.append(Check(key, True, f"{path} holds a checkpoint"))
        else:
            checks.append(
                Check(key, False, f"{path} holds no checkpoint (safetensors weights and a card)")
            )
    return checks


def model_checks(settings: Settings) -> list[Check]:
    """The device exists and the configured models load, in a spawned child process."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        rows = pool.submit(_load_models, settings.model_dump(mode="json")).result()
    return [Check(*row) for row in rows]


def _load_models(settings_data: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """In the child: resolve the device, then load each configured model on it."""
    from model.segmentation import resolve_device
    from node.analysis.models import Models, demo_fusion_dir

    settings = Settings.model_validate(settings_data)
    device = settings.pipeline.device
    try:
        resolved = resolve_device(device)
    except ValueError as exc:
        return [("device", False, f"pipeline.device = {device!r}: {exc}")]
    rows: list[tuple[str, bool, str]] = [("device", True, f"{device!r} runs on {resolved}")]
    models = Models(settings, device=device)
    try:
        segmenter = models.segmenter()
        rows.append(("segmenter", True, f"{segmenter.card.get('name', 'segmenter')} loads"))
    except Exception as exc:  # any failure to load is the finding
        rows.append(("segmenter", False, f"{type(exc).__name__}: {exc}"))
    if settings.pipeline.model_dir is None and not (demo_fusion_dir() / "model_card.json").exists():
        rows.append(("MVI model", True, "the demo model, built on the first job (about 80 s)"))
        return rows
    try:
        fusion = models.fusion()
        rows.append(("MVI model", True, f"{fusion.card.get('name', 'MVI model')} loads"))
    except Exception as exc:  # any failure to load is the finding
        rows.append(("MVI model", False, f"{type(exc).__name__}: {exc}"))
    return rows


def peer_checks(settings: Settings) -> list[Check]:
    """C-ECHO every peer with a host and a port, at once; a silent peer is a warning."""
    peers = sorted((n, p) for n, p in settings.peers.items() if p.host and p.port)
    if not peers:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(peers)) as pool:
        return list(pool.map(lambda item: _echo(settings, *item), peers))


def _echo(settings: Settings, name: str, peer: Any) -> Check:
    from node.core.dicom import SUCCESS, associate

    label = f"peers.{name}"
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    quick = settings.model_copy(
        update={
            "node": settings.node.model_copy(
                update={"acse_timeout": ECHO_TIMEOUT_S, "network_timeout": ECHO_TIMEOUT_S}
            )
        }
    )
    try:
        assoc = associate(quick, peer, ["1.2.840.10008.1.1"])
    except Exception as exc:  # TLS files, an unresolvable host: reported like a silent peer
        return Check(label, False, f"{where}: {type(exc).__name__}: {exc}", fatal=False)
    if not assoc.is_established:
        outcome = "rejected the association" if assoc.is_rejected else "did not answer"
        return Check(label, False, f"{where} {outcome}", fatal=False)
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != SUCCESS:
        return Check(label, False, f"{where}: C-ECHO answered {code}", fatal=False)
    return Check(label, True, f"{where} answers C-ECHO", fatal=False)


def run_checks(settings: Settings, *, models: bool = True, peers: bool = True) -> list[Check]:
    """Every pre-flight check (see the module docstring)."""
    checks = host_checks(settings)
    if models:
        checks += model_checks(settings)
    if peers:
        checks += peer_checks(settings)
    return checks


def fatal(checks: list[Check]) -> list[Check]:
    """The checks that stop the node from starting."""
    return [c for c in checks if c.fatal and not c.ok]
