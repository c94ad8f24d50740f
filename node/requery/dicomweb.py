"""Re-query over DICOMweb: QIDO-RS to find studies and series, WADO-RS to retrieve a study.

Used for a peer whose results go by DICOMweb (``dicomweb_url`` and no port, or
``deliver_by = "dicomweb"``). The decisions are the DIMSE path's
(:func:`node.requery.retrieve.decide_candidates`); a retrieved instance goes through the
receiver's own checks and durable write (:func:`node.receive.receiver.store_incoming`), one at
a time as WADO-RS streams them, and is recorded with the peer as its sender.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from node.core.dicomweb import web_client
from node.core.logging import get_logger
from node.core.settings import PeerSection, Settings
from node.requery.retrieve import RequeryError, RequeryOptions
from node.store.database import Store

log = get_logger("node.requery.dicomweb")

#: Answers asked for per QIDO-RS request, and the most one search may return.
PAGE = 200
MAX_ANSWERS = 20_000

STUDY_FIELDS = ["StudyDate", "StudyDescription", "ModalitiesInStudy"]
SERIES_FIELDS = [
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "NumberOfSeriesRelatedInstances",
]


class Qido:
    """QIDO-RS searches of one peer, answers as pydicom datasets (what C-FIND gives)."""

    def __init__(self, peer_name: str, peer: PeerSection) -> None:
        self.peer_name = peer_name
        self.client = web_client(peer)

    def studies(self, options: RequeryOptions) -> list[Dataset]:
        """The studies of the date range (and modality)."""
        # The modality is checked on the answers (decide_candidates), not sent as a filter:
        # Orthanc 1.10's plugin drops the connection on ModalitiesInStudy with other keys.
        filters: dict[str, Any] = {"StudyDate": f"{options.since:%Y%m%d}-{options.until:%Y%m%d}"}
        return self._search(
            "studies",
            lambda offset: self.client.search_for_studies(
                search_filters=filters, fields=STUDY_FIELDS, limit=PAGE, offset=offset
            ),
        )

    def series(self, study_uid: str) -> list[Dataset]:
        """The series of one study."""
        return self._search(
            "series",
            lambda offset: self.client.search_for_series(
                study_instance_uid=study_uid, fields=SERIES_FIELDS, limit=PAGE, offset=offset
            ),
        )

    def _search(self, what: str, page_at: Any) -> list[Dataset]:
        """Every page of a search (``limit``/``offset``), within :data:`MAX_ANSWERS`.

        Paged here rather than by dicomweb-client, which asks until a page comes back empty:
        a server that ignores ``offset`` would be asked forever.
        """
        import requests

        found: list[Dataset] = []
        seen: set[str] = set()
        where = f"QIDO-RS ({what}) to {self.peer_name}"
        while True:
            try:
                page = page_at(len(found)) or []
                datasets = [Dataset.from_json(answer) for answer in page]
            except requests.HTTPError as error:
                status = error.response.status_code if error.response is not None else "?"
                raise RequeryError(f"{where}: HTTP {status}") from None
            except requests.RequestException as error:
                raise RequeryError(f"{where}: {type(error).__name__}") from None
            except (ValueError, TypeError, KeyError) as error:  # not the DICOM JSON model
                raise RequeryError(f"{where}: an answer that cannot be read ({error})") from None
            keys = [answer_key(d) for d in datasets]
            if any(key in seen for key in keys):
                break  # the server repeats itself: it ignores offset
            seen.update(keys)
            found.extend(datasets)
            if len(datasets) < PAGE:
                break
            if len(found) >= MAX_ANSWERS:
                raise RequeryError(f"{where}: more than {MAX_ANSWERS} answers; narrow the window")
        return found


def answer_key(answer: Dataset) -> str:
    """What tells two QIDO answers apart (a series' UID, else its study's)."""
    return str(answer.get("SeriesInstanceUID") or answer.get("StudyInstanceUID") or id(answer))


def wado_study(
    settings: Settings, peer_name: str, peer: PeerSection, study_uid: str, store: Store
) -> str | None:
    """WADO-RS a study into the node's spool and store; None on success, else why it failed."""
    import requests

    from node.receive.receiver import ReceiverState
    from node.receive.spool import INCOMING

    state = ReceiverState(
        settings=settings, store=store, spool_root=settings.node.data_dir / "spool"
    )
    folder = state.spool_root / INCOMING
    folder.mkdir(parents=True, exist_ok=True)
    calling = (peer.ae_title or peer_name)[:16]
    stored = failed = 0
    try:
        for dataset in web_client(peer).iter_study(study_uid):
            if _store_one(state, folder, dataset, calling) == 0:
                stored += 1
            else:
                failed += 1
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        return f"WADO-RS from {peer_name}: HTTP {status} after {stored} instance(s)"
    except requests.RequestException as error:
        return f"WADO-RS from {peer_name}: {type(error).__name__} after {stored} instance(s)"
    if stored == 0:
        return f"WADO-RS from {peer_name}: no instance stored ({failed} refused)"
    if failed:
        log.warning("re-query: instances refused", stored=stored, refused=failed)
    return None


def _store_one(state: Any, folder: Path, dataset: Dataset, calling: str) -> int:
    """Write one retrieved dataset as a Part 10 file and store it as a C-STORE would be."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian

    from node.receive.receiver import store_incoming

    with tempfile.NamedTemporaryFile(dir=folder, prefix="wado-", suffix=".part", delete=False) as f:
        path = Path(f.name)
    try:
        if "TransferSyntaxUID" not in getattr(dataset, "file_meta", Dataset()):
            # A server that sent a bare dataset: pydicom decoded it as explicit little endian.
            dataset.ensure_file_meta()
            dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
        return store_incoming(
            state,
            path,
            path.stat().st_size,
            transfer_syntax=str(dataset.file_meta.TransferSyntaxUID),
            sop_class=str(dataset.SOPClassUID),
            sop_instance=str(dataset.SOPInstanceUID),
            calling_ae=calling,
        )
    except Exception as exc:  # one instance that cannot be written is that instance's problem
        log.warning("re-query: retrieved instance not stored", error=type(exc).__name__)
        return 0xC000
    finally:
        path.unlink(missing_ok=True)
