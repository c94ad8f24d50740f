"""Orthanc as a real PACS on loopback for the node's tests.

:func:`running_orthanc` writes a minimal configuration into a work folder, starts the Debian
``Orthanc`` binary on free ports, waits for its REST API and always stops it again. The
:class:`Orthanc` handle drives it over REST (plain :mod:`urllib`, JSON in and out): upload studies,
register DICOM modalities at runtime, and have Orthanc push studies to them as a C-STORE SCU or
C-MOVE them through its own SCP.

Orthanc 1.10 has no bind-address options: its HTTP and DICOM servers listen on all interfaces.
``RemoteAccessAllowed: false`` limits the REST API to loopback clients; the tests themselves only
ever talk to 127.0.0.1.

Typical use from a test::

    from tests.orthanc import Orthanc, orthanc_fixture  # noqa: F401

    def test_something(orthanc: Orthanc, cohort_factory) -> None:
        orthanc.upload_folder(cohort_factory(seed=1) / "study_0001")
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, require_tool

#: Where the Debian package installs the server (``/usr/sbin`` is often not on a user's PATH).
DEBIAN_ORTHANC = Path("/usr/sbin/Orthanc")

#: How many times :func:`running_orthanc` retries when Orthanc dies at start (e.g. a port race).
START_ATTEMPTS = 3

# No proxy for loopback, whatever http_proxy / no_proxy say in the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancError(RuntimeError):
    """Orthanc failed to start, or its REST API answered with an HTTP error."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def orthanc_or_skip() -> str:
    """Path of the ``Orthanc`` executable, or stop the test (the conftest rule: fail under CI).

    ``shutil.which`` first, then the Debian location ``/usr/sbin/Orthanc``.
    """
    found = shutil.which("Orthanc")
    if found is not None:
        return found
    if DEBIAN_ORTHANC.is_file() and os.access(DEBIAN_ORTHANC, os.X_OK):
        return str(DEBIAN_ORTHANC)
    return require_tool("Orthanc", "orthanc")


def _tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Orthanc:
    """A running Orthanc server and its REST API."""

    aet: str
    dicom_port: int
    http_port: int
    storage: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    #: User and password when the configuration turned authentication on.
    credentials: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    # -- REST ---------------------------------------------------------------------------------

    def rest(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        timeout: float = 60,
    ) -> Any:
        """Call the REST API; JSON answers are decoded, others returned as bytes.

        ``body``: bytes go as ``application/octet-stream`` (a DICOM file), text as ``text/plain``
        (e.g. a UID for ``/tools/lookup``), dicts and lists as JSON. An HTTP error raises
        :class:`OrthancError` carrying Orthanc's own error description.
        """
        data: bytes | None
        headers: dict[str, str] = {}
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data, headers["Content-Type"] = body, "application/octet-stream"
        elif isinstance(body, str):
            data, headers["Content-Type"] = body.encode(), "text/plain"
        else:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        path = path if path.startswith("/") else f"/{path}"
        if self.credentials is not None:
            token = base64.b64encode(":".join(self.credentials).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        request = urllib.request.Request(
            self.url + path, data=data, method=method.upper(), headers=headers
        )
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                payload: bytes = response.read()
                content_type = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise OrthancError(
                f"Orthanc {method.upper()} {path} -> HTTP {error.code}: {detail}"
            ) from error
        if "json" in content_type:
            return json.loads(payload) if payload else None
        return payload

    # -- content --------------------------------------------------------------------------------

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """``POST /instances`` each DICOM file; returns the Orthanc instance IDs in order."""
        ids: list[str] = []
        for path in paths:
            answer = self.rest("POST", "/instances", Path(path).read_bytes())
            if answer.get("Status") not in {"Success", "AlreadyStored"}:
                raise OrthancError(f"Orthanc refused {path}: {answer}")
            ids.append(answer["ID"])
        return ids

    def upload_folder(self, folder: Path) -> list[str]:
        """Upload every ``*.dcm`` file below ``folder`` (sorted, recursive)."""
        return self.upload(sorted(Path(folder).rglob("*.dcm")))

    def studies(self) -> list[str]:
        """StudyInstanceUIDs of the studies Orthanc holds."""
        expanded = self.rest("GET", "/studies?expand")
        return [study["MainDicomTags"]["StudyInstanceUID"] for study in expanded]

    def find_study_id(self, study_instance_uid: str) -> str | None:
        """Orthanc ID of a study by StudyInstanceUID (``POST /tools/lookup``), None if absent."""
        for match in self.rest("POST", "/tools/lookup", study_instance_uid):
            if match.get("Type") == "Study":
                return str(match["ID"])
        return None

    def _study_id(self, study_instance_uid: str) -> str:
        study_id = self.find_study_id(study_instance_uid)
        if study_id is None:
            raise OrthancError(f"Orthanc holds no study {study_instance_uid}")
        return study_id

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Main DICOM tags of each instance of a study, plus its Orthanc ``ID``.

        Orthanc 1.10 indexes e.g. SOPInstanceUID, InstanceNumber, ImagePositionPatient; the order
        is Orthanc's, not sorted.
        """
        instances = self.rest("GET", f"/studies/{self._study_id(study_instance_uid)}/instances")
        return [{"ID": item["ID"], **item["MainDicomTags"]} for item in instances]

    # -- network --------------------------------------------------------------------------------

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Register (or replace) a DICOM modality at runtime: ``PUT /modalities/{name}``."""
        self.rest("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def modalities(self) -> dict[str, dict[str, Any]]:
        """The registered modalities, by name, with their AET, host and port."""
        return dict(self.rest("GET", "/modalities?expand"))

    def modality_for_aet(self, aet: str) -> str:
        """Name of the registered modality with AE title ``aet`` (or named ``aet``)."""
        known = self.modalities()
        if aet in known:
            return aet
        for name, entry in known.items():
            if entry.get("AET") == aet:
                return name
        raise OrthancError(f"no modality with AET {aet!r} is registered in Orthanc: {known}")

    def store_study_to(self, modality: str, study_instance_uid: str, timeout: float = 120) -> None:
        """Orthanc as C-STORE SCU: push a study to a registered modality, synchronously."""
        body = {
            "Resources": [self._study_id(study_instance_uid)],
            "Synchronous": True,
            "Timeout": max(1, int(timeout)),
        }
        self.rest("POST", f"/modalities/{modality}/store", body, timeout=timeout + 10)

    def move_study(
        self, study_instance_uid: str, target_aet: str, timeout: float = 120, *, cmove: bool = False
    ) -> None:
        """Send a study to the modality with AE title ``target_aet`` (which must be registered).

        By default this is what a PACS does for a C-MOVE, minus the request: a C-STORE push
        (:meth:`store_study_to`). With ``cmove=True`` it is a real C-MOVE: Orthanc registers
        itself as modality ``SELF`` and, as C-MOVE SCU, asks its own SCP to move the study to
        ``target_aet`` — the stores then come from a C-MOVE sub-operation (Move Originator AET set).
        """
        if not cmove:
            self.store_study_to(self.modality_for_aet(target_aet), study_instance_uid, timeout)
            return
        self.modality_for_aet(target_aet)  # fail early and clearly, as Orthanc's SCP would refuse
        self.add_modality("SELF", self.aet, "127.0.0.1", self.dicom_port)
        body = {
            "Level": "Study",
            "Resources": [{"StudyInstanceUID": study_instance_uid}],
            "TargetAet": target_aet,
            "Synchronous": True,
            "Timeout": max(1, int(timeout)),
        }
        self.rest("POST", "/modalities/SELF/move", body, timeout=timeout + 10)

    # -- lifetime -------------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's log, for failure messages."""
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 15) -> None:
        """Terminate Orthanc, wait, kill it if it does not exit in ``timeout`` seconds."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def _config(
    workdir: Path,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
) -> dict[str, Any]:
    """A minimal Orthanc 1.10 configuration: loopback use, no auth, everything allowed."""
    storage = workdir / "storage"
    return {
        "Name": f"mvi-test-{aet}",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "HttpDescribeErrors": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomCheckModalityHost": False,
        "DicomModalities": {
            name: [m_aet, host, int(port)] for name, (m_aet, host, port) in modalities.items()
        },
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowFindWorklist": False,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "UnknownSopClassAccepted": True,
        "DicomScpTimeout": 30,
        "DicomScuTimeout": 30,
        "StableAge": 1,
        "SaveJobs": False,
        "SynchronousCMove": True,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }


def _start(
    executable: str,
    workdir: Path,
    aet: str,
    modalities: Mapping[str, tuple[str, str, int]],
    extra: Mapping[str, Any] | None = None,
) -> Orthanc:
    """Write the configuration, start the process; does not wait for it."""
    http_port = free_port()
    dicom_port = free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config = {**_config(workdir, aet, dicom_port, http_port, modalities), **(extra or {})}
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [executable, str(config_path)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    users = config.get("RegisteredUsers") or {}
    return Orthanc(
        aet=aet,
        dicom_port=dicom_port,
        http_port=http_port,
        storage=Path(config["StorageDirectory"]),
        process=process,
        log_path=log_path,
        credentials=next(iter(users.items())) if config.get("AuthenticationEnabled") else None,
    )


def _wait_ready(server: Orthanc, timeout: float) -> bool:
    """Poll ``GET /system`` until it answers (True) or Orthanc exits (False); raise on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            server.rest("GET", "/system", timeout=2)
            return True
        except (OSError, OrthancError):
            time.sleep(0.1)
    raise OrthancError(
        f"Orthanc did not answer GET /system within {timeout} s; log tail:\n{server.log_tail()}"
    )


@contextmanager
def running_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    timeout: float = 30,
    extra: Mapping[str, Any] | None = None,
) -> Iterator[Orthanc]:
    """Run Orthanc on free loopback ports with storage under ``workdir``; stop it on exit.

    ``modalities`` maps a modality name to ``(AET, host, port)``; more can be added at runtime
    with :meth:`Orthanc.add_modality`. If Orthanc exits during start (a port taken between
    :func:`free_port` and its bind), it is started again on new ports, up to
    :data:`START_ATTEMPTS` times.
    """
    executable = orthanc_or_skip()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    server: Orthanc | None = None
    try:
        for _attempt in range(START_ATTEMPTS):
            server = _start(executable, workdir, aet, modalities or {}, extra)
            if _wait_ready(server, timeout):
                break
            server.stop()
        else:
            assert server is not None
            raise OrthancError(
                f"Orthanc exited with {server.process.returncode} at start "
                f"({START_ATTEMPTS} attempts); log tail:\n{server.log_tail()}"
            )
        yield server
    finally:
        if server is not None:
            server.stop()


@pytest.fixture(name="orthanc")
def orthanc_fixture(tmp_path: Path) -> Iterator[Orthanc]:
    """Fixture ``orthanc``: a fresh, empty Orthanc for one test.

    Import it into a test module (``from tests.orthanc import orthanc_fixture  # noqa: F401``)
    and ask for ``orthanc``.
    """
    with running_orthanc(tmp_path / "orthanc") as server:
        yield server


def restart_orthanc(server: Orthanc, timeout: float = 30) -> Orthanc:
    """Start a stopped Orthanc again on the same ports and storage (its configuration file)."""
    executable = orthanc_or_skip()
    workdir = server.log_path.parent
    with server.log_path.open("ab") as log:
        process = subprocess.Popen(
            [executable, str(workdir / "orthanc.json")],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
    again = Orthanc(
        aet=server.aet,
        dicom_port=server.dicom_port,
        http_port=server.http_port,
        storage=server.storage,
        process=process,
        log_path=server.log_path,
        credentials=server.credentials,
    )
    if not _wait_ready(again, timeout):
        raise OrthancError(f"Orthanc did not restart; log tail:\n{again.log_tail()}")
    return again


#: Orthanc's Lua hook that appends one line per received instance to a log file.
RECEIVED_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("@LOG@", "a")
  log:write(string.format("%s %s %s\\n", tostring(origin.RequestOrigin),
                          tostring(origin.RemoteAet), tostring(dicom.SOPInstanceUID)))
  log:close()
  return true
end
"""


#: Where Debian's orthanc-dicomweb puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicomweb_config(users: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Configuration keys for Orthanc's DICOMweb plugin at ``/dicom-web/`` (``users``: turn on
    HTTP basic authentication for everything, the REST API included)."""
    if not DICOMWEB_PLUGIN.exists():
        message = f"{DICOMWEB_PLUGIN} not found: apt-get install orthanc-dicomweb"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    config: dict[str, Any] = {
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
    }
    if users:
        config.update({"AuthenticationEnabled": True, "RegisteredUsers": dict(users)})
    return config


@contextmanager
def counting_orthanc(
    workdir: Path, extra: Mapping[str, Any] | None = None
) -> Iterator[tuple[Orthanc, Path]]:
    """Orthanc as in :func:`running_orthanc`, plus a log of every instance it receives.

    Yields the server and the log: one line ``<RequestOrigin> <RemoteAet> <SOPInstanceUID>`` per
    received instance. Lua scripts load only at start, so Orthanc is restarted with them.
    """
    orthanc_or_skip()
    received = workdir / "received.txt"
    script = workdir / "received.lua"
    with running_orthanc(workdir, extra=extra) as first:
        first.stop()
        script.write_text(RECEIVED_LUA.replace("@LOG@", str(received)))
        config_path = workdir / "orthanc.json"
        config = json.loads(config_path.read_text())
        config["LuaScripts"] = [str(script)]
        config_path.write_text(json.dumps(config, indent=2))
        server = restart_orthanc(first)
        try:
            yield server, received
        finally:
            server.stop()  # the context manager stops only the first process


def stores_from(received: Path, calling_ae: str) -> list[str]:
    """SOP Instance UIDs Orthanc received from ``calling_ae`` by C-STORE, one per request."""
    if not received.exists():
        return []
    lines = [line.split() for line in received.read_text().splitlines()]
    return [uid for origin, aet, uid in lines if origin == "DicomProtocol" and aet == calling_ae]
