"""Specification of what a worker does with its jobs: one model batch, each job on its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom
import pytest

from node.analysis.models import Models
from node.analysis.result import SCHEMA_VERSION, to_json
from node.core.logging import study_key
from node.core.settings import Settings
from node.jobs.runner import JobOutcome, batch_size, cuda_out_of_memory, run_jobs
from node.receive.receiver import record_spooled_file
from node.store.database import Job, LeaseLost, Store
from tests.nodeproc import node_settings


def _ingest(store: Store, root: Path, folder: Path) -> str:
    """Record a phantom study's files as if received (the spool root is the cohort folder)."""
    study_uid = ""
    for path in sorted(folder.rglob("*.dcm")):
        study_uid = record_spooled_file(store, root, path, "TEST")
    return study_uid


def _one_study_for_a_pacs(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> tuple[Path, Settings, Store, str]:
    """A complete study with a supplied SEG, recorded as received by a node whose results go to
    a PACS: (cohort folder, settings, store, StudyInstanceUID)."""
    cohort = cohort_factory(studies=1, seed=83, size=64, slices=16, seg=True)
    extra = {
        "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "results": {"destinations": ["pacs"]},
    }
    settings = Settings.model_validate(node_settings(tmp_path / "data", extra=extra))
    store = Store(settings.database_url)
    uid = _ingest(store, cohort, cohort / "study_0001")
    store.complete_study(uid)
    return cohort, settings, store, uid


def test_waiting_jobs_share_one_inference_batch_and_fail_alone(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # Truth SEGs in the studies: the supplied masks make every study reach the model.
    cohort = cohort_factory(studies=3, seed=83, size=64, slices=16, seg=True)
    single_phase = cohort_factory(studies=1, seed=84, size=64, slices=16, phases=("portal_venous",))
    settings = Settings.model_validate(
        node_settings(tmp_path / "data", extra={"pipeline": {"batch_size": 4}})
    )
    store = Store(settings.database_url)
    uids = [_ingest(store, cohort, cohort / f"study_{i:04d}") for i in (1, 2, 3)]
    lone = _ingest(store, single_phase, single_phase / "study_0001")
    for uid in [*uids, lone]:
        assert store.complete_study(uid) is not None
    jobs = []
    while (job := store.claim_job()) is not None:
        jobs.append(job)
    assert [j.study_uid for j in jobs] == [*uids, lone]

    models = Models(settings, device="cpu")
    assert batch_size(settings, models) == 4
    # The spool root differs per cohort folder here, so the batch is run per folder root: the
    # three liver studies together, the single-phase one alone.
    # Each study's objects may leave as soon as its result is recorded, not after the batch.
    recorded: list[int] = []

    def on_recorded() -> None:
        recorded.append(sum(store.latest_result(uid) is not None for uid in uids))

    outcomes = run_jobs(store, cohort, settings, jobs[:3], models, on_recorded)
    assert recorded == [1, 2, 3]
    (lonely,) = run_jobs(store, single_phase, settings, jobs[3:], models)

    assert not any(isinstance(o, Exception) for o in outcomes), outcomes
    assert isinstance(lonely, JobOutcome) and lonely.state in ("needs_review", "not_applicable")
    rows = [store.latest_result(uid) for uid in uids]
    results = [row.result for row in rows if row is not None]
    assert [r.status for r in results] == ["scored"] * 3, [r.reason for r in results]
    # One forward pass: every study of the batch carries the same share of it.
    assert len({r.timings_s["infer"] for r in results}) == 1
    # The worker records where the models ran; on the CPU without a GPU peak.
    assert all(r.device is not None and r.device.type == "cpu" for r in results)
    assert all("gpu_memory_peak_bytes" not in to_json(r)["device"] for r in results)
    # The batch gives each study the probability it gets alone (a new job of the same study).
    for uid, result in zip(uids, results, strict=True):
        store.reprocess(uid)
        alone_job = store.claim_job()
        assert alone_job is not None and alone_job.study_uid == uid
        (alone,) = run_jobs(store, cohort, settings, [alone_job], models)
        assert isinstance(alone, JobOutcome)
        again = store.latest_result(uid)
        assert again is not None and again.job_id == alone_job.id
        assert again.result.mvi_probability == pytest.approx(result.mvi_probability, abs=1e-3)
    store.close()


def test_a_failure_before_the_model_fails_only_its_own_job(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(studies=2, seed=85, size=64, slices=16)
    settings = Settings.model_validate(node_settings(tmp_path / "data"))
    store = Store(settings.database_url)
    good, bad = (_ingest(store, cohort, cohort / f"study_{i:04d}") for i in (1, 2))
    for uid in (good, bad):
        store.complete_study(uid)
    jobs = [store.claim_job(), store.claim_job()]
    assert all(j is not None for j in jobs)
    # The second study's model loads fine but its outputs folder cannot be written.
    blocked = settings.node.data_dir / "results" / study_key(jobs[1].study_uid)  # type: ignore[union-attr]
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_text("a file where a folder should be")
    outcomes = run_jobs(store, cohort, settings, jobs, Models(settings, device="cpu"))  # type: ignore[arg-type]
    assert isinstance(outcomes[0], JobOutcome)
    assert isinstance(outcomes[1], Exception)
    store.close()


def test_a_job_rerun_after_a_crash_does_not_make_a_second_set(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    from node.deliver.outbox import list_outbox

    cohort, settings, store, _ = _one_study_for_a_pacs(tmp_path, cohort_factory)
    job = store.claim_job()
    assert job is not None
    models = Models(settings, device="cpu")
    (first,) = run_jobs(store, cohort, settings, [job], models)
    assert isinstance(first, JobOutcome) and first.state == "done"
    sent = sorted(row.sop_instance_uid for row in list_outbox(store, include_sent=True))
    assert len(sent) == 3
    # The node dies before the job is marked finished; on restart the job runs again.
    assert store.requeue_interrupted() == 1
    again = store.claim_job()
    assert again is not None and again.id == job.id
    (second,) = run_jobs(store, cohort, settings, [again], models)
    assert isinstance(second, JobOutcome) and second.state == "done"
    assert sorted(row.sop_instance_uid for row in list_outbox(store, include_sent=True)) == sent
    assert len(store.list_results()) == 1
    store.close()


@pytest.mark.parametrize("value", [0, 257, "many"])
def test_batch_size_is_auto_or_a_small_number(value: object) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        Settings.model_validate({"pipeline": {"batch_size": value}})


def test_auto_batch_size_is_one_on_the_cpu() -> None:
    settings = Settings()
    assert batch_size(settings, Models(settings, device="cpu")) == 1
    assert batch_size(settings, Models(settings, device="cuda")) == 8


def test_cuda_out_of_memory_is_recognised_by_its_type() -> None:
    import torch

    class OutOfMemoryError(RuntimeError):
        """Named like CUDA's, but not it."""

    assert cuda_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not cuda_out_of_memory(OutOfMemoryError("CUDA out of memory"))
    assert not cuda_out_of_memory(MemoryError())


def test_a_job_failed_for_good_sends_a_report_on_its_arterial_series(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    import csv

    from node.jobs.runner import notify_failure, results_folder

    cohort = cohort_factory(studies=1, seed=83, size=64, slices=16, seg=True)
    extra = {"pipeline": {"working_spacing_mm": 3.5}}
    settings = Settings.model_validate(node_settings(tmp_path / "data", extra=extra))
    store = Store(settings.database_url)
    uid = _ingest(store, cohort, cohort / "study_0001")
    store.complete_study(uid)
    job = store.claim_job()
    assert job is not None
    notify_failure(store, cohort, settings, job, "RuntimeError: boom")
    row = store.latest_result(uid)
    assert row is not None and row.job_id == job.id
    result = row.result
    assert result.status == "failed" and result.reason == "the analysis failed: RuntimeError: boom"
    assert sorted(result.outputs) == ["sc", "sr"]  # nothing measured: no SEG
    assert "device" not in to_json(result) and result.schema_version == SCHEMA_VERSION
    with (cohort / "truth.csv").open(newline="") as handle:
        arterial = next(csv.DictReader(handle))["arterial_series_uid"]
    sr = pydicom.dcmread(results_folder(settings, uid, job.id, job.lease) / "sr.dcm")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert [str(item.SeriesInstanceUID) for item in evidence] == [arterial]
    store.close()


def test_an_attempt_that_lost_its_lease_records_nothing_and_leaves_the_winners_files(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    """Attempt 1 stalls (a network cut, SIGSTOP) and the sweep hands the job to attempt 2;
    attempt 1 wakes up and finishes its analysis first: refused, its files removed; attempt 2
    records and delivers; attempt 1, told the job is done, changes nothing."""
    from node.deliver.outbox import list_outbox
    from node.jobs import runner
    from node.jobs.runner import results_folder

    cohort, settings, store, uid = _one_study_for_a_pacs(tmp_path, cohort_factory)
    stalled = store.claim_job(worker="host-a:7")
    assert stalled is not None
    assert store.requeue_stalled(0.0, max_attempts=3) == [stalled.id]
    winner = store.claim_job(worker="host-b:7")
    assert winner is not None and winner.lease == stalled.lease + 1
    models = Models(settings, device="cpu")

    (lost,) = run_jobs(store, cohort, settings, [stalled], models)
    assert isinstance(lost, LeaseLost)
    assert store.list_results() == [] and list_outbox(store, include_sent=True) == []
    losers_folder = results_folder(settings, uid, stalled.id, stalled.lease)
    assert losers_folder.is_dir()  # written before the refused transaction
    runner._lease_lost(settings, stalled, lost, discard=True)  # what the worker loop does
    assert not losers_folder.exists()

    (won,) = run_jobs(store, cohort, settings, [winner], models)
    assert isinstance(won, JobOutcome) and won.state == "done"
    sent = sorted((row.sop_instance_uid, row.path) for row in list_outbox(store, include_sent=True))
    winners_folder = results_folder(settings, uid, winner.id, winner.lease)
    assert len(sent) == 3 and all(path.startswith(str(winners_folder)) for _, path in sent)
    assert [r.attempt for r in store.list_results()] == [winner.lease]
    with pytest.raises(LeaseLost):
        store.finish_job(stalled.id, "failed", reason="late", lease=stalled.lease)
    store.finish_job(winner.id, "done", lease=winner.lease)
    assert store.list_jobs()[0].state == "done"
    assert all(Path(path).is_file() for _, path in sent)


def test_an_idle_worker_is_woken_by_a_queued_job_and_then_wakes_the_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool's events (node/jobs/pool.py): a worker waiting for work claims a job as soon as
    the completion timer says one is queued, and says when its results are recorded."""
    import multiprocessing
    import threading

    from node.core.locks import Wakeup
    from node.jobs import runner
    from tests.node.store.test_database import record
    from tests.nodeproc import wait_for

    # Polling alone would now take a minute: only the event can start the job in time.
    monkeypatch.setattr(runner, "_IDLE_SLEEP_S", 60.0)
    settings = Settings.model_validate(node_settings(tmp_path / "data"))
    store = Store(settings.database_url)
    context = multiprocessing.get_context("spawn")
    queued, recorded = Wakeup(context.Semaphore(0)), Wakeup(context.Semaphore(0))
    ran: list[int] = []
    claims: list[int] = []
    claim = runner.Worker.claim

    def counted(self: runner.Worker, job_id: int | None = None) -> list[Job]:
        found = claim(self, job_id)
        claims.append(len(found))
        return found

    monkeypatch.setattr(runner.Worker, "claim", counted)

    def stand_in(jobs: Sequence[Job]) -> list[JobOutcome | Exception]:
        ran.extend(job.id for job in jobs)
        return [JobOutcome("done") for _ in jobs]

    stop = threading.Event()
    worker = threading.Thread(
        target=runner.work,
        args=(store, settings, "cpu", lambda: not stop.is_set(), stand_in),
        kwargs={"wake": queued, "recorded": recorded},
        daemon=True,
    )
    worker.start()
    try:
        wait_for(lambda: claims == [0], timeout=30)  # it found nothing and waits
        store.record_instance(record(sop="1.2.3.1.1", path="aa/1.dcm"))
        job_id = store.complete_study("1.2.3")
        assert job_id is not None and not ran
        queued.set()
        wait_for(lambda: ran == [job_id], timeout=30)
        assert claims[:2] == [0, 1], "the job was claimed on the wake-up, not by a second poll"
        assert recorded.wait(30), "the outbox is told that results are recorded"
        assert store.list_jobs()[0].state == "done"
    finally:
        stop.set()
        queued.set()  # out of its wait, to see that it should stop
        worker.join(30)
        store.close()
    assert not worker.is_alive()


def test_a_job_s_series_carry_every_sop_class_of_their_files(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    # The segment stage reads no header for a supplied SEG where the classes name none.
    from node.analysis.supplied_seg import SEG_CLASSES
    from node.jobs.runner import _job_series

    cohort, _, store, uid = _one_study_for_a_pacs(tmp_path, cohort_factory)
    job = store.claim_job()
    assert job is not None and job.study_uid == uid
    series, own = _job_series(store, cohort, job)
    for files in series.values():
        classes = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files.paths
        }
        assert files.sop_classes == classes
    assert [uid for uid, files in series.items() if files.sop_classes & SEG_CLASSES] == [
        uid for uid, files in series.items() if files.modality == "SEG"
    ]
    assert len([f for f in series.values() if f.sop_classes & SEG_CLASSES]) == 1
    assert own == []
    store.close()


def test_a_worker_loads_its_models_before_its_first_job_and_starts_without_them(
    tmp_path: Path,
) -> None:
    """``pipeline.load_models_at_start``: a worker process loads the models before it claims
    anything (the first study then waits for neither torch's imports nor the weights) and says
    so to /healthz; a model that does not load does not stop the worker — the job that needs it
    fails with its error, as without the warm-up."""
    import importlib.util
    import json

    from node.analysis.models import ModelUnavailable
    from node.jobs import runner

    settings = Settings.model_validate(node_settings(tmp_path / "data"))
    store = Store(settings.database_url)
    loads = settings.node.data_dir / "model-loads.json"
    try:
        runner.Worker(store, settings, "cpu")
        assert not loads.exists(), "without the warm-up the first job loads the models"
        runner.Worker(store, settings, "cpu", warm_up=True)
        recorded = json.loads(loads.read_text())
        assert recorded["segmenter"]["ok"] and recorded["MVI model"]["ok"]

        loads.unlink()
        broken = Settings.model_validate(
            node_settings(
                tmp_path / "data", extra={"pipeline": {"model_dir": str(tmp_path / "none")}}
            )
        )
        worker = runner.Worker(store, broken, "cpu", warm_up=True)
        recorded = json.loads(loads.read_text())
        assert recorded["segmenter"]["ok"] and not recorded["MVI model"]["ok"]
        (problem,) = worker.not_loaded
        assert problem.startswith("MVI model: ModelUnavailable: no MVI model at")
        assert worker.models is not None
        with pytest.raises(ModelUnavailable, match=r"no MVI model at .*none"):
            worker.models.fusion()
    finally:
        store.close()
    # Every module the warm-up imports exists (a renamed one would be a warm-up problem).
    assert all(importlib.util.find_spec(name) for name in runner._STAGE_MODULES)


@pytest.mark.parametrize("at_start", [True, False])
def test_a_worker_process_warms_up_as_load_models_at_start_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_start: bool
) -> None:
    from node.jobs import runner

    made: list[dict[str, object]] = []

    class Made:
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(kwargs)

    monkeypatch.setattr(runner, "Worker", Made)
    extra = {"pipeline": {"load_models_at_start": at_start}}
    settings = Settings.model_validate(node_settings(tmp_path / "data", extra=extra))
    store = Store(settings.database_url)
    try:
        runner.work(store, settings, "cpu", lambda: False, freeze=True)  # its own process
        runner.work(store, settings, "cpu", lambda: False)  # inside another program
    finally:
        store.close()
    assert [kwargs["warm_up"] for kwargs in made] == [at_start, False]
