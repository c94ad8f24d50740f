"""Result delivery by STOW-RS, for peers reached over DICOMweb (``peers.NAME.dicomweb_url``).

The outbox treats a STOW-RS attempt as it treats a C-STORE (durability, backoff, give-up,
``outbox list`` showing the destination's last answer): this module only turns one round's
items into requests, one per study (``POST {dicomweb_url}/studies/{StudyInstanceUID}``), and
each answer into one :class:`~node.deliver.outbox.Attempt` per instance:

- the instance in the response's ReferencedSOPSequence (HTTP 200, or 202 for the others'
  sake) → sent; a WarningReason is kept in the recorded status;
- in its FailedSOPSequence → the FailureReason decides, as a C-STORE status would: out of
  resources (``0xA7xx``) and processing failures (``0x0110``) are tried again, anything else
  is ``failed`` at once, recorded verbatim;
- HTTP 401, 403, 404, 413, 415 (credentials, a wrong URL, a size or type the archive refuses) →
  failed at once (an operator fixes the configuration, then ``outbox retry``); 408, 429, 5xx,
  time-outs and refused connections → tried again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.dicom import out_of_resources
from node.core.dicomweb import web_client
from node.core.logging import get_logger
from node.core.settings import PeerSection
from node.deliver.outbox import Attempt

log = get_logger("node.deliver.stow")

#: Answers a retry may change: a busy or broken archive, a timeout, a rate limit.
RETRIED_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
#: FailureReason 0x0110 "processing failure" names no cause: tried again.
PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class StowItem:
    """One file to send, with the UIDs the answer names it by."""

    path: Path
    study_uid: str
    sop_instance_uid: str


def stow_files(peer_name: str, peer: PeerSection, items: Sequence[StowItem]) -> list[Attempt]:
    """STOW-RS ``items`` to one peer, one request per study; one outcome per item, in order."""
    import pydicom

    outcomes: dict[int, Attempt] = {}
    by_study: dict[str, list[tuple[int, Any]]] = {}
    for index, item in enumerate(items):
        try:
            dataset = pydicom.dcmread(item.path)
        except Exception as exc:  # pydicom's own errors are no OSError
            log.error("result file unreadable", path=item.path.name, error=type(exc).__name__)
            outcomes[index] = Attempt(False, True, "result file unreadable")
            continue
        by_study.setdefault(item.study_uid, []).append((index, dataset))
    answers: list[Any] = []
    client = web_client(peer, on_response=answers.append)
    for study_uid, members in by_study.items():
        answers.clear()
        outcome = _stow_study(client, answers, peer_name, study_uid, [d for _, d in members])
        for (index, _), attempt in zip(members, outcome, strict=True):
            outcomes[index] = attempt
    return [outcomes[index] for index in range(len(items))]


def _stow_study(
    client: Any, answers: list[Any], peer_name: str, study_uid: str, datasets: list[Any]
) -> list[Attempt]:
    """One STOW-RS request for one study's datasets, judged by the answer as it came."""
    import requests

    where = f"STOW-RS to {peer_name}"
    uids = [str(d.SOPInstanceUID) for d in datasets]
    try:
        client.store_instances(datasets, study_instance_uid=study_uid)
    except requests.HTTPError:
        pass  # judged below, from the answer itself
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL) as error:
        # A configuration error (a credential with a line break…): its text may hold the
        # credential, and retrying will not change it.
        return [Attempt(False, True, f"{where}: {type(error).__name__}")] * len(datasets)
    except requests.RequestException as error:
        text = f"{where}: {type(error).__name__}: {_first_line(error)}"
        return [Attempt(False, False, text)] * len(datasets)
    except OSError as error:  # a dicomweb_ca that is not there: the operator must fix it
        return [Attempt(False, True, f"{where}: {type(error).__name__}")] * len(datasets)
    response = answers[-1] if answers else None
    if response is None:
        return [Attempt(False, False, f"{where}: no answer")] * len(datasets)
    http = int(response.status_code)
    body = _answer_body(response)
    reason = (response.reason or "").strip()
    return _per_instance(
        body,
        uids,
        http,
        f"{where}: HTTP {http}" + (f" {reason}" if reason and body is None else ""),
    )


def _answer_body(response: Any) -> Any:
    """The STOW-RS response dataset (DICOM JSON, any parameters), or None."""
    import pydicom

    media = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if not response.content or media not in ("application/dicom+json", "application/json"):
        return None
    try:
        return pydicom.Dataset.from_json(response.json())
    except Exception:  # a body that is not the DICOM JSON model
        return None


def _per_instance(answer: Any, uids: list[str], http: int, said: str) -> list[Attempt]:
    """Each instance's outcome: the answer's ReferencedSOPSequence/FailedSOPSequence first,
    the HTTP status for an instance the answer does not name."""
    stored: dict[str, str] = {}
    failed: dict[str, int | None] = {}
    if answer is not None:
        for item in answer.get("ReferencedSOPSequence") or []:
            warning = item.get("WarningReason")
            stored[str(item.get("ReferencedSOPInstanceUID", ""))] = f"{said}, stored" + (
                f" with warning 0x{int(warning):04X}" if warning is not None else ""
            )
        for item in answer.get("FailedSOPSequence") or []:
            code = item.get("FailureReason")
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
                int(code) if code is not None else None
            )
    outcomes = []
    for uid in uids:
        if uid in failed:
            code = failed[uid]
            text = f"{said}, FailureReason " + (
                f"0x{code:04X}" if code is not None else "not given"
            )
            retried = code is None or out_of_resources(code) or code == PROCESSING_FAILURE
            outcomes.append(Attempt(False, not retried, text))
        elif uid in stored:
            outcomes.append(Attempt(True, False, stored[uid]))
        elif http == 200:
            # All stored; an archive may answer 200 without naming them.
            outcomes.append(Attempt(True, False, said))
        elif 200 <= http < 300:
            # Some failed, this one not named either way: sent again (a STOW is idempotent).
            outcomes.append(Attempt(False, False, f"{said}, the instance is not in the answer"))
        else:
            permanent = http not in RETRIED_HTTP
            outcomes.append(Attempt(False, permanent, said))
    return outcomes


def _first_line(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text[:200]
