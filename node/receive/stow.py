"""The STOW-RS receiver: ``POST /dicom-web/studies[/{StudyInstanceUID}]`` beside the DIMSE AE.

A request is answered only after each instance in it is checked, fsynced and committed by the
very code a C-STORE goes through (:func:`node.receive.receiver.store_incoming`), so a 200 means
what a C-STORE success means. In order:

1. the caller: ``Authorization: Bearer`` with one peer's ``stow_token`` (compared in constant
   time), else 401; from that peer's ``host`` when it names one (as for C-STORE), else 403;
2. the body: ``multipart/related; type="application/dicom"`` with a boundary, else 415; larger
   than ``dicomweb.max_request_mb`` (by Content-Length, or while it streams), 413;
3. the whole body is read into files under the spool's incoming folder first; a body that ends
   before its closing boundary is 400 and nothing of it is stored;
4. each part (a DICOM Part 10 file) is stored; the answer lists each in ReferencedSOPSequence or
   FailedSOPSequence with the DIMSE status as FailureReason (``0xA7xx`` out of resources,
   ``0xA9xx`` not what it claims or of another study than the URL names, ``0xCxxx`` cannot be
   understood, ``0xC122`` a transfer syntax the node does not take), with HTTP 200 (all
   stored), 202 (some), 409 (none) or 503 with Retry-After (none, for want of resources: disk
   below the floor before or while reading, too).
"""

from __future__ import annotations

import hmac
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from node.core.dicom import out_of_resources
from node.core.logging import get_logger, study_key
from node.core.settings import Settings
from node.receive.receiver import ReceiverState, store_incoming
from node.receive.spool import INCOMING, free_megabytes

log = get_logger("node.receive.stow")

ROOT = "/dicom-web"
#: The most parts one request may carry.
MAX_PARTS = 10_000
#: FailureReason for a part that is no DICOM file.
CANNOT_UNDERSTAND = 0xC000
DICOM_JSON = "application/dicom+json"


class Rejected(Exception):
    """The whole request is refused: an HTTP status and a sentence."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def caller(settings: Settings, authorization: str | None) -> str | None:
    """The peer whose ``stow_token`` the request carries, or None."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    given = token.strip().encode()
    found = None
    for name, peer in sorted(settings.peers.items()):
        expected = peer.stow_token.get_secret_value().encode()
        # Every token is compared, matched or not: the time does not tell which peer exists.
        if expected and hmac.compare_digest(expected, given):
            found = name
    return found


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/related; type="application/dicom"`` body, or 415."""
    from python_multipart.multipart import parse_options_header

    media, options = parse_options_header(content_type or "")
    kind = options.get(b"type", b"").lower()
    boundary = options.get(b"boundary", b"")
    if media.lower() != b"multipart/related" or kind != b"application/dicom" or not boundary:
        raise Rejected(
            415,
            'this receiver takes multipart/related; type="application/dicom" with a boundary',
        )
    return boundary


class PartWriter:
    """Callbacks of python-multipart's parser: each part's body into a file of its own."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[Path] = []
        self.types: list[str] = []
        self.ended = False
        self._handle: Any = None
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_header_field": self._field,
            "on_header_value": self._value,
            "on_header_end": self._header_end,
            "on_end": self._all_done,
        }

    def _begin(self) -> None:
        if len(self.files) >= MAX_PARTS:
            raise Rejected(413, f"more than {MAX_PARTS} parts in one request")
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed at the part's end)
            dir=self.folder, prefix="stow-", suffix=".part", delete=False
        )
        self._handle = handle
        self.files.append(Path(handle.name))
        self._headers = {}

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._handle.write(data[start:end])

    def _end(self) -> None:
        self._handle.close()
        self._handle = None
        self.types.append(self._headers.get(b"content-type", b"").decode("latin-1"))

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name = self._header_value = b""

    def _all_done(self) -> None:
        self.ended = True

    def discard(self) -> None:
        """Remove every part file (a refused request keeps nothing)."""
        if self._handle is not None:
            self._handle.close()
        for path in self.files:
            path.unlink(missing_ok=True)


def store_parts(
    state: ReceiverState, writer: PartWriter, study_uid: str | None, calling_ae: str
) -> tuple[list[Any], list[Any]]:
    """Store each part as a C-STORE would be; (stored items, failed items) for the answer."""
    import pydicom
    from pydicom.dataset import Dataset

    stored: list[Any] = []
    failed: list[Any] = []
    for path, part_type in zip(writer.files, writer.types, strict=True):
        item = Dataset()
        status = CANNOT_UNDERSTAND
        try:
            media = part_type.split(";")[0].strip().lower()
            meta = pydicom.filereader.read_file_meta_info(path)
            item.ReferencedSOPClassUID = str(meta.MediaStorageSOPClassUID)
            item.ReferencedSOPInstanceUID = str(meta.MediaStorageSOPInstanceUID)
            syntax = str(meta.TransferSyntaxUID)
            if media not in ("", "application/dicom"):
                status = CANNOT_UNDERSTAND
            else:
                status = store_incoming(
                    state,
                    path,
                    path.stat().st_size,
                    transfer_syntax=syntax,
                    sop_class=item.ReferencedSOPClassUID,
                    sop_instance=item.ReferencedSOPInstanceUID,
                    calling_ae=calling_ae,
                    expected_study=study_uid,
                )
        except Exception as exc:  # no file meta, a foreign file: that part cannot be understood
            log.warning("STOW-RS part not stored", error=type(exc).__name__)
        finally:
            path.unlink(missing_ok=True)
        if status == 0:
            stored.append(item)
        else:
            item.FailureReason = status
            failed.append(item)
    return stored, failed


def answer(stored: list[Any], failed: list[Any]) -> tuple[int, dict[str, Any]]:
    """The STOW-RS response (DICOM JSON) and its HTTP status."""
    from pydicom.dataset import Dataset

    response = Dataset()
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    if failed and not stored and all(out_of_resources(int(i.FailureReason)) for i in failed):
        # Out of resources only (disk below the floor…): a sender retries a 503, not a 409.
        return 503, response.to_json_dict()
    status = 200 if not failed else 409 if not stored else 202
    return status, response.to_json_dict()


def stow_app(state: ReceiverState) -> Any:
    """The receiver's Starlette application."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    settings = state.settings
    limit = settings.dicomweb.max_request_mb * 1_000_000

    async def store(request: Request) -> JSONResponse:
        started = time.monotonic()
        peer = caller(settings, request.headers.get("authorization"))
        if peer is None:
            log.warning("STOW-RS refused: no known token", client=_client(request))
            return JSONResponse(
                {"error": "a peer's stow_token is needed (Authorization: Bearer …)"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="mvi-node"'},
            )
        host = settings.peers[peer].host
        if host is not None and host != _client(request):
            # As for C-STORE: a peer that names a host calls from that address only.
            log.warning("STOW-RS refused: token used from another address", peer=peer)
            return JSONResponse(
                {"error": f"[peers.{peer}] may send from its host only"}, status_code=403
            )
        study_uid = request.path_params.get("study")
        folder = state.spool_root / INCOMING
        folder.mkdir(parents=True, exist_ok=True)
        writer = PartWriter(folder)
        try:
            await _read_body(request, writer, limit)
        except Rejected as refused:
            writer.discard()
            log.warning("STOW-RS refused", peer=peer, status=refused.status, why=refused.detail)
            retry = {"Retry-After": "60"} if refused.status == 503 else None
            return JSONResponse(
                {"error": refused.detail}, status_code=refused.status, headers=retry
            )
        calling = (settings.peers[peer].ae_title or peer)[:16]
        stored, failed = await run_in_threadpool(store_parts, state, writer, study_uid, calling)
        status, body = answer(stored, failed)
        retry = {"Retry-After": "60"} if status == 503 else None
        log.info(
            "STOW-RS request",
            peer=peer,
            status=status,
            instances=len(stored),
            failed=len(failed),
            study_key=study_key(study_uid) if study_uid else None,
            seconds=round(time.monotonic() - started, 3),
        )
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=retry)

    routes = [
        Route(f"{ROOT}/studies", store, methods=["POST"]),
        Route(f"{ROOT}/studies/{{study}}", store, methods=["POST"]),
    ]
    app = Starlette(routes=routes)
    app.state.floor_mb = settings.node.free_disk_floor_mb
    return app


async def _read_body(request: Any, writer: PartWriter, limit: int) -> None:
    """Stream the body into part files; :class:`Rejected` for a wrong type, size or end."""
    from python_multipart.multipart import MultipartParser

    boundary = boundary_of(request.headers.get("content-type"))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(
            413, f"the body is larger than dicomweb.max_request_mb ({limit // 10**6} MB)"
        )
    floor = request.app.state.floor_mb
    needed = int(declared) / 1e6 if declared is not None and declared.isdigit() else 0.0
    if free_megabytes(writer.folder) - needed < floor:
        raise Rejected(503, "free disk below node.free_disk_floor_mb; try again later")
    parser = MultipartParser(boundary, writer.callbacks())  # type: ignore[arg-type]
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise Rejected(
                    413, f"the body is larger than dicomweb.max_request_mb ({limit // 10**6} MB)"
                )
            parser.write(chunk)
        parser.finalize()
    except Rejected:
        raise
    except OSError:  # the disk, not the request: the sender should try again
        raise Rejected(503, "the body could not be written; try again later") from None
    except Exception as exc:  # the parser's own errors on a malformed body
        raise Rejected(400, f"the multipart body cannot be read: {type(exc).__name__}") from None
    if not writer.ended or not writer.files:
        raise Rejected(400, "the multipart body ends before its closing boundary")


def _client(request: Any) -> str | None:
    return request.client.host if request.client else None


class StowServer:
    """uvicorn serving :func:`stow_app` from a thread of the receiving process."""

    def __init__(self, state: ReceiverState) -> None:
        from node.core.http import http_server

        section = state.settings.dicomweb
        self._server = http_server(
            stow_app(state), section.host, section.port, section.tls_cert, section.tls_key
        )
        self._thread = threading.Thread(target=self._server.run, name="stow-rs", daemon=True)

    def start(self, timeout: float = 20.0) -> None:
        """Listen; returns once it does (or raises when it could not)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the STOW-RS receiver could not listen (dicomweb.host/port)")
            time.sleep(0.05)

    def stop(self) -> None:
        """Finish the requests in flight, then stop."""
        self._server.should_exit = True
        self._thread.join(10)
