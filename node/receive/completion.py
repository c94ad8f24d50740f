"""Study completion: a quiet timer per study, restarted by every instance.

When a study has received nothing for ``completion.quiet_seconds`` it is complete and a job is
queued for it (pairing of the arterial and portal-venous phases happens in the job, in a worker
process, so the receiving process never loads pixel data). An instance that arrives for a
completed study re-opens it; the next completion queues a job that supersedes the earlier one.
The node's own outputs coming back never re-open a study. A study that never falls quiet (one
slice every 2.5 s against a 3 s quiet period) is complete ``completion.max_receive_minutes`` after
its first instance anyway: it would otherwise stay ``receiving`` for ever.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from node.core.logging import get_logger, study_key
from node.store.database import Store, utcnow

log = get_logger("node.receive.completion")


class Assembler:
    """Quiet timers over an apscheduler scheduler; the store holds every state they change.

    Parameters
    ----------
    store
        The database.
    scheduler
        A started (or about to be started) background scheduler.
    quiet_seconds
        Silence after which a study is complete.
    max_receive_s
        Time after the first instance (of this receiving episode) after which the study is
        complete whether or not it fell quiet.
    """

    def __init__(
        self,
        store: Store,
        scheduler: BackgroundScheduler,
        quiet_seconds: float,
        max_receive_s: float = 1800.0,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        #: Called after a job is queued (the worker pool's wake-up).
        self.on_queued = on_queued
        self.scheduler = scheduler
        self.quiet = dt.timedelta(seconds=quiet_seconds)
        self.window = dt.timedelta(seconds=max_receive_s)
        # First and last arrival per study with a timer pending (the first starts the receive
        # window). The timer is not moved on every instance (hundreds a second): when it fires
        # early it re-arms itself from the last arrival.
        self._seen: dict[str, tuple[dt.datetime, dt.datetime]] = {}
        self._lock = threading.Lock()

    def on_instance(self, study_uid: str, own_output: bool) -> None:
        """An instance was stored: (re)start the study's timer, unless it is our own output."""
        if own_output:
            return
        now = utcnow()
        with self._lock:
            pending = study_uid in self._seen
            first = self._seen[study_uid][0] if pending else now
            self._seen[study_uid] = (first, now)
        if not pending:
            self._schedule(study_uid, now + self.quiet)

    def _schedule(self, study_uid: str, when: dt.datetime) -> None:
        self.scheduler.add_job(
            self._fire,
            trigger="date",
            run_date=when,
            args=[study_uid],
            id=f"complete-{study_key(study_uid)}",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def _fire(self, study_uid: str) -> None:
        key = study_key(study_uid)
        with self._lock:
            seen = self._seen.pop(study_uid, None)
            now = utcnow()
            overdue = seen is not None and now - seen[0] >= self.window
            if seen is not None and now - seen[1] < self.quiet and not overdue:
                # Re-armed for the quiet period, but never past the end of the window.
                self._seen[study_uid] = seen
                self._schedule(study_uid, min(seen[1] + self.quiet, seen[0] + self.window))
                return
        try:
            if not self.store.has_analysable_instances(study_uid):
                study = self.store.study(study_uid)
                if study is not None and study.state == "receiving":
                    self.store.set_study_state(
                        study_uid, "not_applicable", "no CT or SEG instances in the study"
                    )
                return
            quiet_for = None if overdue else self.quiet.total_seconds()
            job_id = self.store.complete_study(study_uid, quiet_for_s=quiet_for)
        except Exception:
            # The timer must not die with a database hiccup: try again one quiet period later.
            log.exception("completion failed; retrying", study_key=key)
            self._schedule(study_uid, utcnow() + self.quiet)
            return
        if job_id is None:
            study = self.store.study(study_uid)
            if study is not None and study.state == "receiving":
                # An instance arrived after the timer was set; wait for the quiet period again.
                self._schedule(study_uid, utcnow() + self.quiet)
            return
        if overdue:
            log.warning(
                "study still receiving after completion.max_receive_minutes; job queued with what "
                "has arrived (later instances re-open it)",
                study_key=key,
                job_id=job_id,
            )
        else:
            log.info("study complete; job queued", study_key=key, job_id=job_id)
        self._queued()

    def _queued(self) -> None:
        if self.on_queued is not None:
            self.on_queued()

    def sweep(self) -> int:
        """Complete studies that are quiet by the database's clock but have no timer here.

        Several receivers share a database: another one may have received a study's last
        instance and died before its timer fired. Each receiver runs this every half quiet
        period; the compare-and-set in the store lets one of them queue the job. Returns how
        many studies this sweep completed.
        """
        completed = 0
        for study_uid in self.store.quiet_studies(self.quiet.total_seconds()):
            with self._lock:
                if study_uid in self._seen:
                    continue  # this receiver's own timer decides
            if not self.store.has_analysable_instances(study_uid):
                continue  # the timer of the receiver that has it says not_applicable
            job_id = self.store.complete_study(study_uid, quiet_for_s=self.quiet.total_seconds())
            if job_id is not None:
                completed += 1
                self._queued()
                log.info(
                    "quiet study completed by the sweep",
                    study_key=study_key(study_uid),
                    job_id=job_id,
                )
        return completed

    def restore(self) -> int:
        """On start: studies still receiving get their timers back. Returns how many."""
        pending = self.store.studies_in_state("receiving")
        for study_uid in pending:
            self._schedule(study_uid, utcnow() + self.quiet)
        return len(pending)
