"""Retrospective re-query: find past liver CT studies on the PACS and have the node score them.

The flow for one run (``mvi-node requery`` or the nightly safety net):

1. C-FIND at STUDY level by date range (and modality); the StudyDescription filter is a regular
   expression applied here, because C-FIND wildcards are not regular expressions.
2. C-FIND at SERIES level for each study: a study is worth moving only when its series names
   show an arterial and a portal-venous candidate (the ``[phases]`` patterns the pairing uses
   first); the rest are skipped with the reason, before anything is moved.
3. A study whose newest result already comes from the current model is skipped; so is one with a
   job still queued or running (an interrupted run: the node is finishing it). This is what
   makes a run resumable: run it again and it continues where it stopped.
4. The study is recorded as retrospective in the store (its jobs run after live studies), then
   C-MOVEd to the node's own AE title (the running ``mvi-node serve`` receives it) or fetched by
   C-GET into the same spool and store. After the retrieve the job is queued at once rather than
   after the quiet period: the retrieve's final response says nothing more is coming.
5. At most ``requery.max_concurrent`` studies are moved and not yet scored at any time; the run
   waits for their results.

Results of re-queried studies stay on the node unless ``requery.send_results`` is set (see
:func:`node.jobs.runner._sends_results`).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_sr.enum import Status
from node.core.dicom import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    MOVE_DESTINATION_UNKNOWN,
    RETRIEVE_WARNING,
    SEGMENTATION_STORAGE,
    SUCCESS,
    associate,
    is_pending,
)
from node.core.errors import ConfigurationError
from node.core.logging import get_logger, study_key
from node.core.settings import PeerSection, Settings
from node.store.database import JOB_FINAL_STATES, PRIORITY_RETROSPECTIVE, Store, utcnow

log = get_logger("node.requery.retrieve")

#: Studies whose newest result has one of these statuses are not retried: a model change does
#: not change why they could not be analysed (not a liver CT, no axial volume).
_MODEL_INDEPENDENT = (Status.NOT_APPLICABLE,)
#: Statuses a newer model could change: re-analysed unless the same model made them.
_MODEL_DEPENDENT = (Status.SCORED, Status.NO_TUMOR, Status.NEEDS_REVIEW)
#: Seconds between looks at the store while waiting for results.
_POLL_S = 0.5
#: Seconds without any progress after which the run checks that the node still listens.
_RECHECK_S = 60.0


class RequeryError(ConfigurationError):
    """The re-query cannot run at all (no peer, PACS unreachable, node not running)."""


@dataclass(frozen=True)
class RequeryOptions:
    """What to look for and how.

    Attributes
    ----------
    since, until
        StudyDate range, inclusive.
    peer
        ``[peers.NAME]`` to query; default ``requery.peer``.
    modality
        ModalitiesInStudy to match (also checked on the answers: not every PACS matches it).
    description
        Regular expression searched in StudyDescription (case-insensitive).
    limit
        Move at most this many studies.
    dry_run
        Find and decide, move nothing.
    wait
        Wait for each moved study's result (the command does; the nightly safety net does not).
    only_unknown
        Only studies the node has never received (the safety net).
    timeout_s
        How long to wait for one study's result after its retrieve.
    """

    since: dt.date
    until: dt.date
    peer: str | None = None
    modality: str | None = "CT"
    description: str | None = None
    limit: int | None = None
    dry_run: bool = False
    wait: bool = True
    only_unknown: bool = False
    timeout_s: float = 3600.0


@dataclass
class StudyCandidate:
    """One study found on the PACS and what the re-query decided about it."""

    study_uid: str
    study_date: str = ""
    description: str = ""
    modalities: tuple[str, ...] = ()
    series: list[dict[str, str]] = field(default_factory=list)
    arterial: list[str] = field(default_factory=list)
    portal_venous: list[str] = field(default_factory=list)
    #: found → to_move | skipped → moved | move_failed → scored | no_tumor | failed | ...
    outcome: str = "found"
    reason: str | None = None
    job_id: int | None = None

    @property
    def key(self) -> str:
        """The study's log-safe key."""
        return study_key(self.study_uid)


@dataclass
class RequerySummary:
    """Counts and per-study outcomes of one run."""

    candidates: list[StudyCandidate] = field(default_factory=list)

    def count(self, *outcomes: str) -> int:
        """How many studies ended in any of ``outcomes``."""
        return sum(1 for c in self.candidates if c.outcome in outcomes)

    def counts(self) -> dict[str, int]:
        """Studies per outcome."""
        totals: dict[str, int] = {}
        for candidate in self.candidates:
            totals[candidate.outcome] = totals.get(candidate.outcome, 0) + 1
        return totals


#: Called on every change of a study's outcome (for progress bars).
Listener = Callable[[StudyCandidate], None]


# -- the PACS side ------------------------------------------------------------------------------


def resolve_peer(
    settings: Settings, name: str | None, *, dicomweb: bool = False
) -> tuple[str, PeerSection]:
    """The peer to call: ``name`` or ``requery.peer``; :class:`RequeryError` when unusable.

    Also what `mvi-node echo` checks, so both name a bad peer the same way. ``dicomweb``: a
    peer reached over DICOMweb will do (the re-query; C-ECHO needs DIMSE).
    """
    chosen = name or settings.requery.peer
    if not chosen:
        raise RequeryError("no peer to query: pass --peer NAME or set requery.peer")
    peer = settings.peers.get(chosen)
    if peer is None:
        known = ", ".join(sorted(settings.peers)) or "none configured"
        raise RequeryError(f"no [peers.{chosen}] in the configuration (peers: {known})")
    if dicomweb and peer.delivers_by_dicomweb:
        return chosen, peer
    if peer.host is None or peer.port is None:
        if peer.dicomweb_only:
            raise RequeryError(
                f"[peers.{chosen}] is reached over DICOMweb only; C-ECHO needs a DIMSE host "
                "and port"
            )
        raise RequeryError(f"[peers.{chosen}] needs host and port to be called")
    return chosen, peer


@contextmanager
def _association(
    settings: Settings,
    peer_name: str,
    peer: PeerSection,
    contexts: Sequence[str | tuple[str, Sequence[str]]],
    **kwargs: Any,
) -> Iterator[Any]:
    """An association with ``peer`` proposing ``contexts``: SOP class UIDs, or (UID, syntaxes)."""
    assoc = associate(settings, peer, contexts, **kwargs)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise RequeryError(
            f"association with {peer_name} ({peer.ae_title}@{peer.host}:{peer.port}) {what}; "
            f"does the PACS know {settings.node.ae_title!r} from this host?"
        )
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _find(assoc: Any, query: Dataset, what: str) -> list[Dataset]:
    answers: list[Dataset] = []
    try:
        responses = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    except (RuntimeError, ValueError) as exc:  # association gone, context refused
        raise RequeryError(f"C-FIND ({what}): {exc}") from None
    for status, identifier in responses:
        if not status or "Status" not in status:
            raise RequeryError(f"C-FIND ({what}): no response from the PACS")
        code = int(status.Status)
        if is_pending(code):
            if identifier is not None:
                answers.append(identifier)
            continue
        if code != SUCCESS:
            comment = str(status.get("ErrorComment", "") or "")
            raise RequeryError(f"C-FIND ({what}) answered 0x{code:04X} {comment}".strip())
    return answers


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def study_query(options: RequeryOptions) -> Dataset:
    """The STUDY-level C-FIND identifier for ``options``."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = f"{options.since:%Y%m%d}-{options.until:%Y%m%d}"
    query.StudyDescription = ""
    query.ModalitiesInStudy = options.modality or ""
    query.NumberOfStudyRelatedSeries = ""
    return query


def series_query(study_uid: str) -> Dataset:
    """The SERIES-level C-FIND identifier for one study."""
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.SeriesNumber = ""
    query.SeriesDescription = ""
    query.ProtocolName = ""
    query.NumberOfSeriesRelatedInstances = ""
    return query


def classify_series(candidate: StudyCandidate, settings: Settings) -> None:
    """Name the arterial / portal-venous candidates among a study's CT series; decide.

    Sets ``outcome`` to ``to_move``, or ``skipped`` with the reason.
    """
    patterns = {
        phase: [re.compile(p, re.IGNORECASE) for p in getattr(settings.phases, phase)]
        for phase in ("arterial", "portal_venous", "non_contrast", "delayed")
    }
    candidate.arterial, candidate.portal_venous = [], []
    for item in candidate.series:
        if item.get("modality", "").upper() != "CT":
            continue
        description = item.get("description", "")
        protocol = item.get("protocol", "")
        named = {
            phase
            for phase, compiled in patterns.items()
            if any(p.search(description) for p in compiled)
        }
        if not named:
            named = {
                phase
                for phase, compiled in patterns.items()
                if any(p.search(protocol) for p in compiled)
            }
        if named == {"arterial"}:
            candidate.arterial.append(item["series_uid"])
        elif named == {"portal_venous"}:
            candidate.portal_venous.append(item["series_uid"])
    if not any(item.get("modality", "").upper() == "CT" for item in candidate.series):
        candidate.outcome, candidate.reason = "skipped", "no CT series"
    elif not candidate.arterial and not candidate.portal_venous:
        candidate.outcome = "skipped"
        candidate.reason = "no arterial or portal-venous series by name ([phases] patterns)"
    elif not candidate.arterial:
        candidate.outcome, candidate.reason = "skipped", "no arterial series by name"
    elif not candidate.portal_venous:
        candidate.outcome, candidate.reason = "skipped", "no portal-venous series by name"
    else:
        candidate.outcome, candidate.reason = "to_move", None


def find_studies(
    settings: Settings, peer_name: str, peer: PeerSection, options: RequeryOptions
) -> list[StudyCandidate]:
    """Find the studies of the date range, then their series; every candidate is decided.

    Over DIMSE (C-FIND) or, for a peer whose results go by DICOMweb, QIDO-RS.

    Raises
    ------
    RequeryError
        The PACS cannot be reached or refuses the query.
    """
    if peer.delivers_by_dicomweb:
        from node.requery.dicomweb import Qido

        qido = Qido(peer_name, peer)
        return decide_candidates(qido.studies(options), qido.series, options, settings)
    with _association(
        settings, peer_name, peer, [StudyRootQueryRetrieveInformationModelFind]
    ) as assoc:
        return decide_candidates(
            _find(assoc, study_query(options), "studies"),
            lambda uid: _find(assoc, series_query(uid), "series"),
            options,
            settings,
        )


def decide_candidates(
    answers: Sequence[Dataset],
    series_of: Callable[[str], list[Dataset]],
    options: RequeryOptions,
    settings: Settings,
) -> list[StudyCandidate]:
    """Candidates from a study query's answers, each decided (series asked for as needed)."""
    pattern = re.compile(options.description, re.IGNORECASE) if options.description else None
    found: list[StudyCandidate] = []
    seen: set[str] = set()
    for answer in answers:
        uid = _text(answer, "StudyInstanceUID")
        if not uid or uid in seen:
            continue
        seen.add(uid)
        candidate = StudyCandidate(
            study_uid=uid,
            study_date=_text(answer, "StudyDate"),
            description=_text(answer, "StudyDescription"),
            modalities=tuple(m for m in _text(answer, "ModalitiesInStudy").split("\\") if m),
        )
        found.append(candidate)
        # Not every PACS matches on ModalitiesInStudy or on dates: check the answers too.
        if not _date_in_range(candidate.study_date, options):
            candidate.outcome, candidate.reason = "skipped", "study date outside the range"
            continue
        if (
            options.modality
            and candidate.modalities
            and (options.modality.upper() not in {m.upper() for m in candidate.modalities})
        ):
            candidate.outcome, candidate.reason = "skipped", f"no {options.modality} series"
            continue
        if pattern is not None and not pattern.search(candidate.description):
            candidate.outcome = "skipped"
            candidate.reason = "study description does not match --description"
            continue
        try:
            answers_of_study = series_of(uid)
        except RequeryError as exc:
            # One study the PACS cannot list is that study's problem, not the run's.
            candidate.outcome, candidate.reason = Status.FAILED, str(exc)
            continue
        for series in answers_of_study:
            candidate.series.append(
                {
                    "series_uid": _text(series, "SeriesInstanceUID"),
                    "modality": _text(series, "Modality"),
                    "description": _text(series, "SeriesDescription"),
                    "protocol": _text(series, "ProtocolName"),
                    "instances": _text(series, "NumberOfSeriesRelatedInstances"),
                }
            )
        classify_series(candidate, settings)
    found.sort(key=lambda c: (c.study_date, c.study_uid))
    return found


def _date_in_range(value: str, options: RequeryOptions) -> bool:
    try:
        date = dt.datetime.strptime(value[:8], "%Y%m%d").date()
    except ValueError:
        return False
    return options.since <= date <= options.until


def check_node_running(settings: Settings) -> None:
    """Raise :class:`RequeryError` unless something listens on the node's own port.

    A TCP connect, not a C-ECHO: the node refuses callers that are not configured peers, and
    its own AE title usually is not one.
    """
    import socket

    host = settings.node.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    try:
        with socket.create_connection((host, settings.node.port), timeout=5):
            return
    except OSError:
        pass
    raise RequeryError(
        f"the node is not listening on {host}:{settings.node.port}: start `mvi-node serve` "
        "with the same configuration first (it receives the moved studies and scores them)"
    )


def move_study(settings: Settings, peer_name: str, peer: PeerSection, study_uid: str) -> str | None:
    """C-MOVE a study to the node's own AE title; None on success, else why it failed."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    with _association(
        settings, peer_name, peer, [StudyRootQueryRetrieveInformationModelMove]
    ) as assoc:
        last: Dataset | None = None
        for status, _identifier in assoc.send_c_move(
            query, settings.node.ae_title, StudyRootQueryRetrieveInformationModelMove
        ):
            if status and "Status" in status:
                last = status
    return _retrieve_problem(last, "C-MOVE", settings.node.ae_title)


def _retrieve_problem(last: Dataset | None, what: str, destination: str) -> str | None:
    if last is None:
        return f"{what}: no response from the PACS"
    code = int(last.Status)
    completed = int(last.get("NumberOfCompletedSuboperations", 0) or 0)
    failed = int(last.get("NumberOfFailedSuboperations", 0) or 0)
    comment = str(last.get("ErrorComment", "") or "")
    if code == MOVE_DESTINATION_UNKNOWN:
        return f"{what}: the PACS does not know the move destination {destination!r}"
    if code not in (SUCCESS, RETRIEVE_WARNING):
        return f"{what} answered 0x{code:04X}" + (f": {comment}" if comment else "")
    if completed == 0 and failed == 0 and code == SUCCESS:
        # Some PACS answer success without sub-operation counts; only warn through the log.
        log.info("retrieve reported no sub-operation counts", what=what)
    if completed == 0 and failed > 0:
        return f"{what}: every sub-operation failed ({failed})"
    return None


def get_study(
    settings: Settings, peer_name: str, peer: PeerSection, study_uid: str, store: Store
) -> str | None:
    """C-GET a study into the node's spool and store (no move destination needed)."""
    from node.receive.receiver import (
        TRANSFER_SYNTAXES,
        ReceiverState,
        handle_store,
        receive_into_files,
    )

    state = ReceiverState(
        settings=settings, store=store, spool_root=settings.node.data_dir / "spool"
    )
    receive_into_files(state.spool_root)
    storage = (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE)
    roles: list[Any] = [build_role(sop_class, scp_role=True) for sop_class in storage]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    last: Dataset | None = None
    with _association(
        settings,
        peer_name,
        peer,
        [
            StudyRootQueryRetrieveInformationModelGet,
            *((sop_class, TRANSFER_SYNTAXES) for sop_class in storage),
        ],
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, handle_store, [state])],
    ) as assoc:
        for status, _identifier in assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        ):
            if status and "Status" in status:
                last = status
    return _retrieve_problem(last, "C-GET", settings.node.ae_title)


# -- the node side ------------------------------------------------------------------------------


def current_model(settings: Settings) -> tuple[str, str]:
    """(name, version) of the MVI model the node scores with.

    Raises
    ------
    RequeryError
        Without a usable model: every retrieved study would fail, and no result could ever
        count as current, so a re-run would retrieve everything again.
    """
    import json

    from node.analysis.models import ModelUnavailable, fusion_dir

    try:
        directory = fusion_dir(settings)
        card = json.loads((Path(directory) / "model_card.json").read_text())
    except ModelUnavailable as exc:
        raise RequeryError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise RequeryError(f"the MVI model's card cannot be read: {exc}") from None
    return str(card.get("name")), str(card.get("version"))


def _model_or_none(settings: Settings) -> tuple[str, str] | None:
    try:
        return current_model(settings)
    except RequeryError:
        return None


def already_done(store: Store, study_uid: str, model: tuple[str, str] | None) -> str | None:
    """Why a study needs no new analysis (its newest result stands), or None.

    A study whose last retrieve did not finish (``requested``, ``move_failed``) is retried
    whatever its result says: that result may come from a partial study.
    """
    requested = store.retrospective_row(study_uid)
    if requested is not None and requested.state in ("requested", "move_failed"):
        return None
    row = store.latest_result(study_uid)
    if row is None:
        return None
    status = str(row.status)
    if status in _MODEL_INDEPENDENT:
        return f"already analysed: {status}"
    if status in _MODEL_DEPENDENT and model is not None:
        made_by = row.result.model
        if made_by is not None and (str(made_by.name), str(made_by.version)) == model:
            return f"already {status} by {model[0]} {model[1]}"
    return None


def _in_flight(store: Store, study_uid: str, settings: Settings) -> bool:
    job = store.newest_job(study_uid)
    if job is not None and job.state not in JOB_FINAL_STATES:
        return True
    study = store.study(study_uid)
    if study is None or study.state != "receiving":
        return False
    # Receiving, but nothing arrived for a while: a retrieve that broke off (its instances
    # came by C-GET, which no quiet timer watches). Retrieve it again rather than wait.
    last = study.last_received_at
    if last is None:
        return False
    stale_after = max(3 * settings.completion.quiet_seconds, 60.0)
    return (utcnow() - last).total_seconds() < stale_after


def queue_after_retrieve(
    store: Store, study_uid: str, started: dt.datetime | None = None
) -> int | None:
    """After a retrieve: queue the study's job now (or a re-analysis when nothing changed).

    ``started`` is when the retrieve began: a job created since then (the node's quiet timer
    fired before the PACS's final answer came) is the retrieve's job, not a reason for another.
    """
    job_id = store.complete_study(study_uid)
    if job_id is not None:
        return job_id
    newest = store.newest_job(study_uid)
    if newest is not None and newest.state not in JOB_FINAL_STATES:
        return newest.id
    if (
        newest is not None
        and started is not None
        and newest.created_at >= started
        and newest.state != "cancelled"
    ):
        return newest.id
    if store.study(study_uid) is None or not store.has_analysable_instances(study_uid):
        return None
    # Every instance was already here (identical): nothing re-opened the study.
    return store.reprocess(study_uid, priority=PRIORITY_RETROSPECTIVE)


def _settle(store: Store, candidate: StudyCandidate) -> bool:
    """Whether the candidate's analysis has finished; sets its outcome when it has."""
    study = store.study(candidate.study_uid)
    if study is None or study.state in ("receiving", "queued", "running"):
        return False  # instances still arriving, or a newer job on its way
    job = store.newest_job(candidate.study_uid)
    if job is None or job.state not in JOB_FINAL_STATES or job.state == "superseded":
        return False
    if candidate.job_id is not None and job.id < candidate.job_id:
        return False
    row = store.latest_result(candidate.study_uid)
    if job.state == "cancelled":
        candidate.outcome, candidate.reason = Status.FAILED, "the job was cancelled"
    elif row is not None and row.job_id == job.id:
        candidate.outcome = str(row.status)
        candidate.reason = row.result.reason
    else:
        candidate.outcome, candidate.reason = str(job.state), job.reason
    store.set_retrospective_state(candidate.study_uid, "done", candidate.outcome)
    return True


def run_requery(
    settings: Settings,
    options: RequeryOptions,
    store: Store,
    listener: Listener = lambda candidate: None,
) -> RequerySummary:
    """Find, decide, retrieve and (with ``options.wait``) wait for the results.

    Raises
    ------
    RequeryError
        Before anything is moved: no usable peer, the PACS refuses the query, the node is not
        running (C-MOVE needs it to receive; both need its workers to score).
    """
    peer_name, peer = resolve_peer(settings, options.peer, dicomweb=True)
    if not options.dry_run:
        check_node_running(settings)
    model = current_model(settings) if not options.dry_run else _model_or_none(settings)
    summary = RequerySummary(find_studies(settings, peer_name, peer, options))
    for candidate in summary.candidates:
        if candidate.outcome == "to_move":
            _decide_against_store(store, candidate, model, options, settings)
        listener(candidate)
    queue = [c for c in summary.candidates if c.outcome in ("to_move", "in_progress")]
    if options.limit is not None:
        for extra in [c for c in queue if c.outcome == "to_move"][options.limit :]:
            extra.outcome, extra.reason = "skipped", f"over --limit {options.limit}"
            listener(extra)
        queue = [c for c in queue if c.outcome != "skipped"]
    if options.dry_run:
        return summary

    waiting: list[StudyCandidate] = [c for c in queue if c.outcome == "in_progress"]
    pending = [c for c in queue if c.outcome == "to_move"]
    deadline: dict[str, float] = {
        c.study_uid: time.monotonic() + options.timeout_s for c in waiting
    }
    last_change = time.monotonic()
    while pending or (options.wait and waiting):
        if pending and (not options.wait or len(waiting) < settings.requery.max_concurrent):
            candidate = pending.pop(0)
            # Decided at the start of a run that may have lasted hours: look again.
            _decide_against_store(store, candidate, model, options, settings)
            if candidate.outcome == "to_move":
                _retrieve(settings, peer_name, peer, store, candidate)
            listener(candidate)
            if candidate.outcome in ("moved", "in_progress"):
                waiting.append(candidate)
                deadline[candidate.study_uid] = time.monotonic() + options.timeout_s
            last_change = time.monotonic()
            continue
        time.sleep(_POLL_S)
        if time.monotonic() - last_change > _RECHECK_S:
            # Nothing settled for a while: the node may have stopped. Say so rather than
            # wait out every timeout (a re-run continues where this one stopped).
            check_node_running(settings)
            last_change = time.monotonic()
        for candidate in list(waiting):
            if _settle(store, candidate):
                waiting.remove(candidate)
                listener(candidate)
                last_change = time.monotonic()
            elif time.monotonic() > deadline[candidate.study_uid]:
                waiting.remove(candidate)
                candidate.outcome = "timed_out"
                candidate.reason = f"no result within {options.timeout_s:.0f} s of the retrieve"
                listener(candidate)
    return summary


def _decide_against_store(
    store: Store,
    candidate: StudyCandidate,
    model: tuple[str, str] | None,
    options: RequeryOptions,
    settings: Settings,
) -> None:
    known = store.study(candidate.study_uid) is not None
    if options.only_unknown and known:
        candidate.outcome, candidate.reason = "skipped", "the node already received it"
        return
    done = already_done(store, candidate.study_uid, model)
    if done is not None:
        candidate.outcome, candidate.reason = "skipped", done
    elif known and _in_flight(store, candidate.study_uid, settings):
        candidate.outcome, candidate.reason = "in_progress", "the node is analysing it"


def _retrieve(
    settings: Settings,
    peer_name: str,
    peer: PeerSection,
    store: Store,
    candidate: StudyCandidate,
) -> None:
    started = utcnow()
    problem: str | None
    try:
        store.mark_retrospective(candidate.study_uid, candidate.study_date or None)
        if peer.delivers_by_dicomweb:
            from node.requery.dicomweb import wado_study

            problem = wado_study(settings, peer_name, peer, candidate.study_uid, store)
        elif settings.requery.use_c_get:
            problem = get_study(settings, peer_name, peer, candidate.study_uid, store)
        else:
            problem = move_study(settings, peer_name, peer, candidate.study_uid)
    except RequeryError as exc:
        problem = str(exc)
    except Exception as exc:  # one study's retrieve must not end the run
        problem = f"retrieve failed: {type(exc).__name__}: {exc}"
    if problem is None:
        candidate.job_id = queue_after_retrieve(store, candidate.study_uid, started)
        if candidate.job_id is None:
            problem = "the retrieve brought no CT instances"
    if problem is not None:
        candidate.outcome, candidate.reason = "move_failed", problem
        store.set_retrospective_state(candidate.study_uid, "move_failed", problem)
        # The reason stays out of the log: a PACS's error comment may name the patient.
        log.warning("re-query: retrieve failed", study_key=candidate.key)
        return
    candidate.outcome, candidate.reason = "moved", None
    store.set_retrospective_state(candidate.study_uid, "moved")
    log.info("re-query: study retrieved", study_key=candidate.key, job_id=candidate.job_id)


def safety_net(settings: Settings, store: Store, today: dt.date | None = None) -> RequerySummary:
    """The nightly job: retrieve studies of the last ``safety_net_days`` the node never got.

    Runs inside ``mvi-node serve`` (apscheduler, ``requery.schedule``); does not wait for the
    results, the node's own workers score them after the live studies.
    """
    today = today or dt.date.today()  # StudyDate is the site's local date
    options = RequeryOptions(
        since=today - dt.timedelta(days=settings.requery.safety_net_days),
        until=today,
        wait=False,
        only_unknown=True,
    )
    try:
        summary = run_requery(settings, options, store)
    except RequeryError as exc:
        log.error("safety net: re-query failed", error=str(exc))
        return RequerySummary()
    log.info("safety net: re-query finished", **summary.counts())
    return summary


def _safety_net_main(settings_data: dict[str, Any]) -> None:
    from node.core.logging import configure_logging

    settings = Settings.model_validate(settings_data)
    configure_logging(settings.node.log_level)
    store = Store(settings.database_url)
    try:
        safety_net(settings, store)
    finally:
        store.close()


def run_safety_net(settings: Settings) -> int | None:
    """Run :func:`safety_net` in a child process; returns its exit code.

    A child process keeps torch (imported to read the model card) and the C-FIND/C-MOVE work
    out of the receiving process, which stays small.
    """
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=_safety_net_main, args=(settings.model_dump(),), name="mvi-safety-net"
    )
    process.start()
    process.join()
    return process.exitcode
