"""What a worker process does: claim jobs, analyse them, deliver and record the results.

The pool (:mod:`node.jobs.pool`) starts :func:`worker_main` in each worker process. Workers die
with the node: each asks the kernel for SIGKILL when its parent dies, and also checks its parent
between jobs.

A worker takes one job, and with it the jobs already waiting, up to ``pipeline.batch_size``:
each study runs every stage up to the MVI model on its own (:func:`prepare_job`), the model
scores the prepared studies in one batch (:func:`node.analysis.pipeline.score_prepared`), and
each job is delivered and concluded on its own — one study's failure never fails another's
stage. A job that failed for good gets a notice (:func:`notify_failure`).

The pool's process imports this module for :func:`worker_main` only: the analysis (SimpleITK,
torch) is imported inside the functions that run in a worker.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_sr.enum import Status
from node.core.locks import Wakeup
from node.core.logging import configure_logging, get_logger, study_key
from node.core.settings import Settings
from node.jobs.memory import hold_freed_memory, release
from node.store.database import Job, LeaseLost, Store, worker_identity

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from node.analysis.dicomio import SeriesFiles
    from node.analysis.models import Models
    from node.analysis.pipeline import Analysis, Prepared
    from node.analysis.result import Device, Phases, Result

log = get_logger("node.jobs.runner")

_PR_SET_PDEATHSIG = 1
_IDLE_SLEEP_S = 0.25
#: Between claims while the database does not answer.
_UNREACHABLE_SLEEP_S = 2.0

#: The job state each result status ends its job in (any other status fails it).
_JOB_STATE = {
    Status.SCORED: "done",
    Status.NO_TUMOR: "done",
    Status.NOT_APPLICABLE: "not_applicable",
    Status.NEEDS_REVIEW: "needs_review",
}


@dataclass(frozen=True)
class JobOutcome:
    """How a job ended."""

    state: str
    reason: str | None = None
    phases: Phases | None = None
    arterial_uid: str | None = None
    portal_venous_uid: str | None = None


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
    # The parent may have died before prctl took effect.
    if os.getppid() != parent_pid:
        os._exit(0)


def _job_series(
    store: Store, spool_root: Path, job: Job
) -> tuple[dict[str, SeriesFiles], list[str]]:
    """The study's files per series (as the pipeline takes them) and the node's own series."""
    from node.analysis.dicomio import SeriesFiles

    paths: dict[str, list[Path]] = {}
    classes: dict[str, str] = {}
    every_class: dict[str, set[str]] = {}
    own: set[str] = set()
    for instance in store.instance_files(job.study_uid):
        paths.setdefault(instance.series_uid, []).append(spool_root / instance.path)
        classes[instance.series_uid] = instance.sop_class_uid
        every_class.setdefault(instance.series_uid, set()).add(instance.sop_class_uid or "")
        if instance.own_output:
            own.add(instance.series_uid)
    series = {
        uid: SeriesFiles(
            study_instance_uid=job.study_uid,
            series_instance_uid=uid,
            modality=_modality(classes[uid]),
            sop_class_uid=classes[uid],
            series_description="",
            paths=tuple(sorted(files)),
            sop_classes=frozenset(every_class[uid]),
        )
        for uid, files in paths.items()
    }
    return series, sorted(own)


def prepare_job(
    store: Store, spool_root: Path, settings: Settings, job: Job, models: Models
) -> Analysis | Prepared:
    """Every stage of a job before the MVI model (:func:`node.analysis.pipeline.prepare_study`)."""
    from node.analysis.pipeline import prepare_study

    series, own = _job_series(store, spool_root, job)
    return prepare_study(
        job.study_uid,
        series,
        settings,
        models,
        own_series_uids=own,
        superseded=superseded_objects(store, settings, job.study_uid),
        force_pair=_forced_pair(job.pairing),
    )


def deliver(
    store: Store,
    settings: Settings,
    job: Job,
    analysis: Analysis,
    models: Models,
    on_recorded: Callable[[], None] | None = None,
) -> JobOutcome:
    """A finished analysis: its files, the result row and the outbox items; the job's outcome.
    ``on_recorded`` is called once they are committed (the dispatcher's wake-up)."""
    analysis.result.device = _device_record(models)
    _record(store, settings, job, analysis)
    if on_recorded is not None:
        try:
            on_recorded()
        except Exception as exc:  # the result is recorded; the outbox's poll finds it anyway
            log.warning("outbox not woken", job_id=job.id, error=type(exc).__name__)
    return _outcome(analysis.result)


def _record(store: Store, settings: Settings, job: Job, analysis: Analysis) -> None:
    """Write a job's objects, then its result row and outbox rows in one transaction.

    A crash leaves the result and its outbox rows both, or neither: a re-run of the job finds
    the result and sends what was recorded, never a second set with new UIDs.
    """
    from node.analysis.pipeline import write_outputs
    from node.deliver.outbox import ResultObject, enqueue

    # Each attempt writes into a folder of its own: one that lost its lease (another worker
    # took the job over) never overwrites the files the winner recorded.
    folder = results_folder(settings, job.study_uid, job.id, job.lease)
    written = write_outputs(analysis, folder)
    objects = [
        ResultObject(
            path,
            str(analysis.objects[kind].SOPInstanceUID),
            str(analysis.objects[kind].SeriesInstanceUID),
        )
        for kind, path in written.items()
    ]
    with store.begin() as tx:
        store.hold_lease(job.id, job.lease, tx)  # first: nothing below commits without it
        store.record_result(job.id, job.study_uid, analysis.result, tx, attempt=job.lease)
        store.record_issued(
            job.id,
            job.study_uid,
            [(o.sop_instance_uid, o.series_instance_uid) for o in objects],
            tx,
        )
        if objects and settings.results.destinations and _sends_results(settings, job):
            enqueue(store, job.id, job.study_uid, objects, settings.results.destinations, tx)


def _outcome(result: Result) -> JobOutcome:
    """A job's outcome from its result (result.json)."""
    phases = result.phases
    return JobOutcome(
        _JOB_STATE.get(result.status, "failed"),
        result.reason,
        phases,
        arterial_uid=phases.arterial if phases is not None else None,
        portal_venous_uid=phases.portal_venous if phases is not None else None,
    )


def run_jobs(
    store: Store,
    spool_root: Path,
    settings: Settings,
    jobs: Sequence[Job],
    models: Models | None = None,
    on_recorded: Callable[[], None] | None = None,
) -> list[JobOutcome | Exception]:
    """Run several jobs with one MVI-model batch; per job its outcome or the error it raised.

    A job that fails before the model fails alone; an error of the batched inference fails
    every job of the batch (each is retried per ``pipeline.max_attempts``). ``on_recorded``
    is called as each job's result and outbox rows are committed: its objects can leave while
    the batch's later studies are written and recorded (0.6 s each at 512 x 512 x 200).
    """
    from node.analysis.models import Models
    from node.analysis.pipeline import Analysis, Prepared, score_prepared

    models = models if models is not None else Models(settings)
    steps: list[Prepared | Analysis | JobOutcome | Exception] = []
    for job in jobs:
        recorded = store.job_result(job.id)
        if recorded is not None:
            # An earlier attempt recorded the result and queued its objects, and the node died
            # before the job was marked finished: those objects go out as they are. Analysing
            # again would give new UIDs and send the PACS a second set.
            log.warning("job already has its result; not analysing again", job_id=job.id)
            steps.append(_outcome(recorded.result))
            continue
        try:
            steps.append(prepare_job(store, spool_root, settings, job, models))
        except Exception as exc:
            steps.append(exc)
    waiting = [i for i, step in enumerate(steps) if isinstance(step, Prepared)]
    prepared = [step for step in steps if isinstance(step, Prepared)]
    try:
        for index, analysis in zip(
            waiting, score_prepared(prepared, settings, models), strict=True
        ):
            steps[index] = analysis
    except Exception as exc:
        for index in waiting:
            steps[index] = exc
    outcomes: list[JobOutcome | Exception] = []
    for job, step in zip(jobs, steps, strict=True):
        if isinstance(step, Exception | JobOutcome):
            outcomes.append(step)
            continue
        assert isinstance(step, Analysis)  # every prepared study was scored above
        try:
            outcomes.append(deliver(store, settings, job, step, models, on_recorded))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def batch_size(settings: Settings, models: Models) -> int:
    """Jobs a worker takes at once: ``pipeline.batch_size``, or 8 on a GPU and 1 on the CPU."""
    configured = settings.pipeline.batch_size
    if configured != "auto":
        return int(configured)
    device = str(models.device)
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return 8 if device.startswith("cuda") else 1


def _sends_results(settings: Settings, job: Job) -> bool:
    """Whether a job's objects go to the result destinations.

    Studies fetched by a retrospective re-query are an audit: their results stay on the node
    unless ``requery.send_results`` says the PACS wants them too.
    """
    from node.store.database import PRIORITY_LIVE

    return job.priority <= PRIORITY_LIVE or settings.requery.send_results


def notify_failure(
    store: Store, spool_root: Path, settings: Settings, job: Job, reason: str
) -> None:
    """A job failed for good: send an SR and SC that say so, so nobody waits for results."""
    from node.analysis import stages
    from node.analysis.pipeline import Analysis, any_study_file, encode_objects, notice_series
    from node.analysis.result import Phases, Result

    series, own = _job_series(store, spool_root, job)
    pairing = stages.pair(
        series,
        settings.phases,
        working_spacing_mm=stages.working_spacing_mm(settings.pipeline),
        own_series_uids=own,
    )
    phases = Phases(
        arterial=pairing.arterial,
        portal_venous=pairing.portal_venous,
        pairing=pairing.method,
        registration_shift_mm=None,
    )
    # The notice hangs on the arterial series, else any image series; else it is study-level.
    source = notice_series(series, own, phases)
    study_file = any_study_file(series, own)
    if source is None and study_file is None:
        return
    result = Result(
        study_instance_uid=job.study_uid,
        status=Status.FAILED,
        reason=f"the analysis failed: {reason}"[:1000],
        phases=phases,
    )
    analysis = Analysis(result)
    analysis.objects = encode_objects(
        result,
        settings,
        None,
        series[source].paths if source is not None else [],
        None,
        None,
        None,
        superseded_objects(store, settings, job.study_uid),
        study_file=study_file,
    )
    _record(store, settings, job, analysis)


def results_folder(
    settings: Settings, study_uid: str, job_id: int, attempt: int | None = None
) -> Path:
    """Where a job's result objects and result.json live: ``job-<id>/attempt-<lease>/``.

    ``attempt`` None or 0: ``job-<id>/`` itself (results recorded before leases existed).
    """
    folder = settings.node.data_dir / "results" / study_key(study_uid) / f"job-{job_id}"
    return folder / f"attempt-{attempt}" if attempt else folder


def _device_record(models: Models) -> Device:
    """Where the models ran, and the peak GPU memory of this worker (for the metrics)."""
    from node.analysis.result import Device

    record = Device(requested=models.device, type="cpu")
    torch = sys.modules.get("torch")  # imported by the models; never imported here for this
    if torch is not None and torch.cuda.is_available() and record.requested != "cpu":
        record.type = "cuda"
        record.gpu_memory_peak_bytes = int(torch.cuda.max_memory_allocated())
    return record


def _modality(sop_class: str) -> str:
    from node.core.dicom import CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, SEGMENTATION_STORAGE

    return {
        CT_IMAGE_STORAGE: "CT",
        ENHANCED_CT_IMAGE_STORAGE: "CT",
        SEGMENTATION_STORAGE: "SEG",
    }.get(sop_class, "OT")


def _forced_pair(pairing: Mapping[str, Any] | None) -> tuple[str, str] | None:
    # `studies reprocess --arterial S --portal-venous S` puts the operator's pair on the job.
    if pairing and pairing.get("forced"):
        return str(pairing["arterial"]), str(pairing["portal_venous"])
    return None


def superseded_objects(store: Store, settings: Settings, study_uid: str) -> list[Dataset]:
    """Headers of the objects of the study's latest earlier result, which a new analysis replaces.

    Its SR becomes the new SR's predecessor; with ``results.send_rejection_notes`` a rejection
    note names them all. Files that are gone or unreadable are left out.
    """
    import pydicom

    from node.analysis.pipeline import OUTPUT_NAMES

    row = store.latest_result(study_uid)
    if row is None:
        return []
    folder = results_folder(settings, study_uid, row.job_id, row.attempt)
    headers: list[Dataset] = []
    for kind in ("seg", "sr", "sc"):
        path = folder / OUTPUT_NAMES[kind]
        if path.is_file():
            try:
                headers.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception:
                log.warning("superseded object unreadable", file=path.name)
    return headers


def worker_main(
    settings_data: dict[str, Any],
    parent_pid: int,
    log_queue: Any = None,
    jobs_queued: Wakeup | None = None,
    results_recorded: Wakeup | None = None,
) -> None:
    """Entry point of a worker process: claim jobs until the parent goes away.

    ``log_queue`` is the parent's log-file queue (``node.log_file``): the parent alone writes
    and rotates the file. ``jobs_queued`` and ``results_recorded`` are the pool's wake-ups
    (:class:`node.jobs.pool.WorkerPool`): the first is waited on when no job is queued, the
    second set as each job's result is recorded and after each batch.
    """
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    settings = Settings.model_validate(settings_data)
    held = hold_freed_memory(settings.pipeline.worker_keep_memory_mb)  # before any thread
    configure_logging(settings.node.log_level, forward_to=log_queue)
    log.info("worker memory", held=held, keep_mb=settings.pipeline.worker_keep_memory_mb)
    # Only checks the schema: `serve` brought it to head before it started this worker.
    store = Store(settings.database_url, schema="check")
    work(
        store,
        settings,
        settings.pipeline.device,
        lambda: os.getppid() == parent_pid,
        wake=jobs_queued,
        recorded=results_recorded,
        freeze=True,
    )


#: What runs a claimed batch: the pipeline (:func:`run_jobs`), or a benchmark's stand-in.
BatchRunner = Callable[[Sequence[Job]], list["JobOutcome | Exception"]]


class Worker:
    """One worker process's state between batches: the store, the models, the batch size.

    Two drivers: :func:`work` polls for jobs (the pool's workers on one host), and the
    procrastinate task of `mvi-node worker` (:mod:`node.jobs.queue`) hands it the job a wake-up
    names. Either way a batch is claimed under new leases and concluded by :meth:`run`.

    ``warm_up`` (a worker process of its own): the models and the stages' modules are
    loaded before the first claim (:func:`warm`), not by the first study.
    ``run_batch`` replaces the pipeline (bench/cluster.py measures the claim, lease and
    heartbeat machinery with a stand-in stage); its batches hold one job. ``freeze``: the
    process is this worker's alone (the pool's worker processes, `mvi-node worker`), so what
    outlives each batch is frozen out of the garbage collector and the memory a batch frees is
    held for the next one up to ``pipeline.worker_keep_memory_mb`` (:mod:`node.jobs.memory`);
    a worker run inside another program (a test) leaves that program's collector and
    allocator as they are.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        device: str,
        run_batch: BatchRunner | None = None,
        *,
        recorded: Wakeup | None = None,
        freeze: bool = False,
        warm_up: bool = False,
    ) -> None:
        from node.analysis.models import Models

        self.store = store
        self.settings = settings
        self.spool_root = settings.node.data_dir / "spool"
        self.pid = os.getpid()
        self.name = worker_identity(self.pid)
        self.run_batch = run_batch
        #: Set as each job's result and outbox rows are committed, and after each batch.
        self.recorded = recorded
        self.models = Models(settings, device=device) if run_batch is None else None
        self.size = batch_size(settings, self.models) if self.models is not None else 1
        self.freeze = freeze
        self.keep_mb = settings.pipeline.worker_keep_memory_mb
        #: What the warm-up could not load (empty without one).
        self.not_loaded: list[str] = []
        if warm_up and self.models is not None:
            # Before the first claim, and before the freeze below takes in what it imports.
            self.not_loaded = warm(self.models)
        if freeze:  # elsewhere the first batch's release is the first needed
            release(freeze, self.keep_mb)

    def claim(self, job_id: int | None = None) -> list[Job]:
        """A job (``job_id``, or the most urgent one) and the jobs of its priority already
        waiting, up to the batch size: one model batch. Empty when the job is not queued."""
        store, pid = self.store, self.pid
        job = store.claim_job(worker_pid=pid, worker=self.name, job_id=job_id)
        if job is None:
            return []
        jobs = [job]
        while (
            len(jobs) < self.size
            and (more := store.claim_job(worker_pid=pid, worker=self.name, priority=job.priority))
            is not None
        ):
            jobs.append(more)
        return jobs

    def run(self, jobs: Sequence[Job]) -> None:
        """Run a claimed batch with heartbeats, then conclude each job under its lease."""
        store, settings = self.store, self.settings
        started = time.perf_counter()
        for each in jobs:
            log.info(
                "job started",
                job_id=each.id,
                study_key=study_key(each.study_uid),
                attempt=each.attempts,
                batch=len(jobs),
            )
        with heartbeats(store, jobs, settings.cluster.heartbeat_s):
            if self.run_batch is not None:
                outcomes = self.run_batch(jobs)
            else:
                wake = self.recorded.set if self.recorded is not None else None
                outcomes = run_jobs(store, self.spool_root, settings, jobs, self.models, wake)
        for each, outcome in zip(jobs, outcomes, strict=True):
            try:
                if isinstance(outcome, LeaseLost):
                    _lease_lost(settings, each, outcome, discard=True)
                elif isinstance(outcome, Exception):
                    self.models = _job_failed(
                        store, self.spool_root, settings, each, outcome, self.models
                    )
                    if self.models is not None:  # after CUDA ran out: the CPU's size
                        self.size = batch_size(settings, self.models)
                else:
                    _job_done(store, each, outcome, started)
            except LeaseLost as exc:
                # Recorded, then taken over before it was marked finished: the new attempt
                # finds the result and sends it as it is (run_jobs), so the files stay.
                _lease_lost(settings, each, exc, discard=False)
            except Exception as exc:
                # The outcome could not be written (the database went away): the job stays
                # running without heartbeats, and the sweep gives it to a new attempt, which
                # finds a recorded result and sends it as it is.
                log.error("job outcome not recorded", job_id=each.id, error=type(exc).__name__)
        if self.recorded is not None:
            self.recorded.set()
        del outcomes
        release(self.freeze, self.keep_mb)


#: What a job imports beyond the models (:func:`warm`).
_STAGE_MODULES = (
    "node.analysis.pipeline",
    "model.registration",
    "model.measure",
    "model.roi",
    "model.quality",
    "dicom_sr.seg",
    "dicom_sr.sr",
    "dicom_sr.sc",
)


def warm(models: Models) -> list[str]:
    """Load what the first study of a fresh worker process would otherwise wait for: the
    models' weights and the modules the stages import (torch and MONAI, SimpleITK's
    registration, highdicom); README, Benchmarks, has what it saves. Returns the problems of
    what did not load, logged here; the job that needs it reports it as before."""
    started = time.perf_counter()
    problems = models.load()
    for module in _STAGE_MODULES:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install: the job says so, the worker stays
            problems.append(f"{module}: {type(exc).__name__}: {exc}")
    seconds = round(time.perf_counter() - started, 2)
    if problems:
        log.warning("worker warmed up without", problems=problems, seconds=seconds)
    else:
        log.info("worker warmed up", seconds=seconds)
    return problems


def work(
    store: Store,
    settings: Settings,
    device: str,
    running: Callable[[], bool],
    run_batch: BatchRunner | None = None,
    *,
    wake: Wakeup | None = None,
    recorded: Wakeup | None = None,
    freeze: bool = False,
) -> None:
    """Claim and run jobs while ``running()``, polling when there are none (the pool's
    workers; bench/cluster.py).

    ``wake`` cuts the wait between polls short when it is set; ``recorded`` is set as each
    job's result is recorded and after each batch (see :func:`worker_main`); ``freeze`` as
    :class:`Worker`'s.
    """
    worker = Worker(
        store,
        settings,
        device,
        run_batch,
        recorded=recorded,
        freeze=freeze,
        warm_up=freeze and settings.pipeline.load_models_at_start,
    )
    while running():
        try:
            jobs = worker.claim()
        except Exception as exc:
            # The database is out of reach (a network cut, a restart): wait and ask again. A
            # claim that did commit is released by the stalled-job sweep.
            log.warning("cannot claim jobs; retrying", error=type(exc).__name__)
            time.sleep(_UNREACHABLE_SLEEP_S)
            continue
        if not jobs:
            if wake is None:
                time.sleep(_IDLE_SLEEP_S)
            else:
                wake.wait(_IDLE_SLEEP_S)
            continue
        worker.run(jobs)


def _lease_lost(settings: Settings, job: Job, exc: LeaseLost, *, discard: bool) -> None:
    """Another attempt holds the job: this one's work is dropped and said so."""
    log.warning(
        "attempt lost its lease; its work is discarded",
        job_id=job.id,
        study_key=study_key(job.study_uid),
        attempt=job.lease,
        error=str(exc),
    )
    if discard:
        # Nothing recorded points at these files (the transaction that would have was refused).
        shutil.rmtree(results_folder(settings, job.study_uid, job.id, job.lease), True)


@contextmanager
def heartbeats(store: Store, jobs: Sequence[Job], every_s: float) -> Iterator[None]:
    """Refresh the jobs' heartbeats from a thread of their own while the block runs.

    A thread, not the job's own steps: a long stage (a CPU batch) beats as often as a short
    one. A database that does not answer is only logged: the stalled-job sweep on the other
    side decides, and the lease check refuses this attempt's results if it took the job.
    """
    stop = threading.Event()
    leases = [(job.id, job.lease) for job in jobs]

    def beat() -> None:
        nonlocal leases
        while not stop.wait(every_s):
            try:
                lost = store.heartbeat(leases)
            except Exception as exc:
                log.warning("heartbeat not recorded", error=type(exc).__name__)
                continue
            for job_id in lost:
                log.warning("job lease taken over by another attempt", job_id=job_id)
            leases = [lease for lease in leases if lease[0] not in lost]

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def cuda_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory (:class:`torch.cuda.OutOfMemoryError`)."""
    if "torch" not in sys.modules:
        return False  # no model has run in this process: the error cannot be CUDA's
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _job_failed(
    store: Store,
    spool_root: Path,
    settings: Settings,
    job: Job,
    exc: Exception,
    models: Models | None,
) -> Models | None:
    """Queue the job again or fail it for good; returns the models the next job should use."""
    reason = f"{type(exc).__name__}: {exc}"
    final = job.attempts >= settings.pipeline.max_attempts
    if models is not None and cuda_out_of_memory(exc):
        # CUDA ran out of memory: the next attempt runs on the CPU.
        models = models.on_cpu()
    log.error(
        "job failed",
        job_id=job.id,
        study_key=study_key(job.study_uid),
        final=final,
        error=reason,
        exc_info=exc,
    )
    if final and settings.results.notify_failures:
        # Before the job is marked failed: a node killed in between finds the notice recorded
        # with its outbox rows when the job is re-run, instead of losing it.
        try:
            notify_failure(store, spool_root, settings, job, reason)
        except Exception:
            log.exception("could not tell the reading room", job_id=job.id)
    store.finish_job(job.id, "failed" if final else "queued", reason=reason, lease=job.lease)
    return models


def _job_done(store: Store, job: Job, outcome: JobOutcome, started: float) -> None:
    store.finish_job(
        job.id,
        outcome.state,
        reason=outcome.reason,
        # The store keeps the phases as JSON, as result.json has them.
        pairing=outcome.phases.model_dump(mode="json") if outcome.phases is not None else None,
        arterial_uid=outcome.arterial_uid,
        portal_venous_uid=outcome.portal_venous_uid,
        lease=job.lease,
    )
    log.info(
        "job finished",
        job_id=job.id,
        study_key=study_key(job.study_uid),
        state=outcome.state,
        reason=outcome.reason,
        seconds=round(time.perf_counter() - started, 3),
    )
