"""Result delivery: a durable outbox, and a C-STORE SCU (or STOW-RS, node.deliver.stow, for a
peer reached over DICOMweb) that retries with backoff.

Every result object is on disk and in the ``outbox`` table (one row per object and destination)
before anything is sent, so a crash never loses a result and a resend after a restart sends the
same SOP instances (a PACS that already has them is not given duplicates). Delivery:

- success → ``sent`` with its delivery time;
- a refusal that will not change by retrying (the destination does not accept the SOP class or
  transfer syntax, or answers a C-STORE with an ``0xA9xx``/``0xCxxx``/``0x01xx`` failure) →
  ``failed`` at once, with the destination's words recorded verbatim;
- anything else (connection refused, association rejected, time-outs, ``0xA7xx`` out of
  resources) → retried after ``outbox.backoff_initial_s`` doubling up to ``backoff_max_s``, and
  ``failed`` once the item is older than ``give_up_after_s``.

``mvi-node outbox list`` shows what waits and why; ``mvi-node outbox retry`` re-queues failures.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from node.core.dicom import associate, out_of_resources, stored
from node.core.locks import Wakeup
from node.core.logging import get_logger, study_key, uid_key
from node.core.settings import PeerSection, Settings
from node.store.database import (
    OUTBOX_FAILED,
    OUTBOX_PENDING,
    OUTBOX_SENT,
    Delivery,
    OutboxItem,
    Store,
    Transaction,
    utcnow,
    worker_identity,
)

log = get_logger("node.deliver.outbox")

#: Outbox states.
PENDING, SENT, FAILED = OUTBOX_PENDING, OUTBOX_SENT, OUTBOX_FAILED
#: Items one delivery round claims: a round must end well inside its claim (a SEG, SR and SC
#: for a few studies; the next round starts as soon as this one is recorded).
ROUND_ITEMS = 8


@dataclass(frozen=True)
class ResultObject:
    """One file to deliver."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class Attempt:
    """The outcome of sending one item once."""

    ok: bool
    permanent: bool
    status: str


def enqueue(
    store: Store,
    job_id: int,
    study_uid: str,
    objects: Sequence[ResultObject],
    destinations: Sequence[str],
    tx: Transaction | None = None,
) -> list[int]:
    """Record result objects for delivery (one row per object and destination); returns ids.

    The files must already be durable on disk: this row is the promise to deliver them. With
    ``tx`` the rows join the caller's transaction (the job's result row commits with them).
    """
    deliveries = [
        Delivery(
            sop_instance_uid=item.sop_instance_uid,
            series_uid=item.series_instance_uid,
            path=str(item.path),
            destination=destination,
        )
        for destination in destinations
        for item in objects
    ]
    return store.enqueue_deliveries(job_id, study_uid, deliveries, tx)


def backoff(attempts: int, initial_s: float, maximum_s: float) -> float:
    """Delay before the next try after ``attempts`` failed tries (exponential, capped)."""
    return float(min(maximum_s, initial_s * 2 ** max(0, attempts - 1)))


def _permanent_status(status: int) -> bool:
    # "Out of resources" may pass; a dataset or SOP class the destination refuses won't.
    return not out_of_resources(status) and not stored(status)


def send_files(
    settings: Settings, peer_name: str, peer: PeerSection, paths: Sequence[Path]
) -> list[Attempt]:
    """C-STORE ``paths`` to one peer over one association; one :class:`Attempt` per path."""
    import pydicom

    if peer.host is None or peer.port is None:
        return [Attempt(False, True, f"[peers.{peer_name}] has no host and port")] * len(paths)
    headers: list[Any] = []
    for path in paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            headers.append(None)
            log.error("result file unreadable", path=path.name, error=str(exc))
    pairs = {
        (str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers if h is not None
    }
    assoc = associate(
        settings, peer, [(sop_class, [syntax]) for sop_class, syntax in sorted(pairs)]
    )
    if not assoc.is_established and assoc.rejected_contexts and not assoc.accepted_contexts:
        # The destination answered, but accepts none of what we offer: retrying will not help.
        refused = sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
        status = f"{peer.ae_title} accepts no presentation context for {', '.join(refused)}"
        return [Attempt(False, True, status)] * len(paths)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        status = f"association {what} by {peer.ae_title}@{peer.host}:{peer.port}"
        return [Attempt(False, False, status)] * len(paths)
    attempts: list[Attempt] = []
    try:
        for path, header in zip(paths, headers, strict=True):
            if header is None:
                attempts.append(Attempt(False, True, "result file unreadable"))
                continue
            accepted = [
                cx for cx in assoc.accepted_contexts if cx.abstract_syntax == header.SOPClassUID
            ]
            if not accepted:
                attempts.append(
                    Attempt(
                        False,
                        True,
                        f"{peer.ae_title} accepts no presentation context for "
                        f"{header.SOPClassUID.name} ({header.SOPClassUID})",
                    )
                )
                continue
            response = assoc.send_c_store(path)
            if not response or "Status" not in response:
                attempts.append(Attempt(False, False, "no response to C-STORE"))
                continue
            code = int(response.Status)
            comment = str(response.get("ErrorComment", "") or "")
            text = f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")
            ok = stored(code)
            attempts.append(Attempt(ok, not ok and _permanent_status(code), text))
    finally:
        if assoc.is_established:
            assoc.release()
    return attempts


class Dispatcher:
    """Delivers due outbox items from a background thread of the serving process.

    Parameters
    ----------
    settings
        Peers, backoff and give-up from ``[outbox]``, TLS from ``[security]``.
    store
        The database.
    poll_s
        How often the outbox is looked at.
    wake
        Starts a round at once when set (the worker pool's ``results_recorded``); a
        thread's own when not given.
    """

    def __init__(
        self, settings: Settings, store: Store, poll_s: float = 0.5, wake: Wakeup | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.poll_s = poll_s
        #: What this dispatcher's claims on outbox rows are made in (every receiver runs one).
        self.owner = worker_identity()
        self._wake = wake if wake is not None else Wakeup(threading.Semaphore(0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the delivery thread."""
        self._thread = threading.Thread(target=self._run, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the item in flight."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            tried = 0
            try:
                tried = self.deliver_due()
            except Exception:
                log.exception("delivery round failed")
            if tried >= ROUND_ITEMS:
                continue  # a full round: more are probably due
            self._wake.wait(self.poll_s)

    def deliver_due(self) -> int:
        """Try up to :data:`ROUND_ITEMS` due items once, one association per destination;
        returns the items tried."""
        rows = self.store.claim_deliveries(self.owner, self.claim_s, limit=ROUND_ITEMS)
        by_destination: dict[str, list[OutboxItem]] = {}
        for row in rows:
            by_destination.setdefault(row.destination, []).append(row)
        for destination, items in by_destination.items():
            peer = self.settings.peers.get(destination)
            if peer is None:
                attempts = [Attempt(False, True, f"no [peers.{destination}] configured")] * len(
                    items
                )
            else:
                attempts = self._send(destination, peer, items)
            for item, attempt in zip(items, attempts, strict=True):
                self._record(item, attempt)
        return len(rows)

    def _send(self, destination: str, peer: PeerSection, items: list[OutboxItem]) -> list[Attempt]:
        """:func:`send_files` (or STOW-RS), any error an attempt that is counted and retried.

        One destination's failure (a TLS context it cannot build, a bug) must neither stall the
        round for the others nor escape the attempt count, backoff and give-up.
        """
        try:
            if peer.delivers_by_dicomweb:
                from node.deliver.stow import StowItem, stow_files

                return stow_files(
                    destination,
                    peer,
                    [StowItem(Path(i.path), i.study_uid, i.sop_instance_uid) for i in items],
                )
            return send_files(self.settings, destination, peer, [Path(i.path) for i in items])
        except Exception as exc:
            log.exception("delivery to one destination failed", destination=destination)
            return [Attempt(False, False, f"{type(exc).__name__}: {exc}")] * len(items)

    @property
    def claim_s(self) -> float:
        """How long a round's claim lasts: longer than its sends can take (at most
        :data:`ROUND_ITEMS` C-STOREs, each bounded by the association, network and DIMSE
        timeouts), so it lapses only when this dispatcher died."""
        node = self.settings.node
        per_item = node.acse_timeout + node.network_timeout + node.dimse_timeout
        return max(600.0, ROUND_ITEMS * per_item)

    def _record(self, item: OutboxItem, attempt: Attempt) -> None:
        now = utcnow()
        attempts = item.attempts + 1
        outbox_settings = self.settings.outbox
        state: str | None = None
        delivered_at: dt.datetime | None = None
        next_attempt_at: dt.datetime | None = None
        age = (now - item.created_at).total_seconds()
        if attempt.ok:
            state, delivered_at = SENT, now
            log.info(
                "result delivered",
                kind=_kind(item.path),
                destination=item.destination,
                status=attempt.status,
                study_key=study_key(item.study_uid),
                instance_key=uid_key(item.sop_instance_uid),
            )
        elif attempt.permanent or age >= outbox_settings.give_up_after_s:
            state = FAILED
            log.error(
                "result delivery failed",
                kind=_kind(item.path),
                destination=item.destination,
                study_key=study_key(item.study_uid),
                status=attempt.status,
                gave_up=not attempt.permanent,
            )
        else:
            delay = backoff(
                attempts, outbox_settings.backoff_initial_s, outbox_settings.backoff_max_s
            )
            next_attempt_at = now + dt.timedelta(seconds=delay)
            log.warning(
                "result delivery will be retried",
                kind=_kind(item.path),
                destination=item.destination,
                study_key=study_key(item.study_uid),
                status=attempt.status,
                retry_in_s=round(delay, 1),
            )
        recorded = self.store.record_delivery_attempt(
            item.id,
            attempts=attempts,
            status=attempt.status,
            state=state,
            next_attempt_at=next_attempt_at,
            delivered_at=delivered_at,
            owner=self.owner,
        )
        if not recorded:
            log.warning(
                "outbox item claimed by another dispatcher; outcome not recorded",
                item_id=item.id,
                destination=item.destination,
            )


def _kind(path: str) -> str:
    """SEG, SR, SC…: a result object's file is named after its kind (pipeline.OUTPUT_NAMES)."""
    return Path(path).stem.upper()


def list_outbox(store: Store, *, include_sent: bool = False, limit: int = 200) -> list[OutboxItem]:
    """Outbox items, newest first (pending and failed unless ``include_sent``)."""
    return store.list_outbox(include_sent=include_sent, limit=limit)


def retry_failed(store: Store, ids: Sequence[int] = ()) -> int:
    """Put failed items (all, or those in ``ids``) back in the queue, due now."""
    return store.retry_failed_deliveries(ids)
