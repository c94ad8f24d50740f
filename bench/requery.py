"""Re-query throughput: studies/hour of `mvi-node requery` against Orthanc, by max_concurrent.

A cohort of phantom studies (``mvi-node phantom``'s generator, consecutive StudyDates from
2024-03-01) is uploaded once into an Orthanc (the Debian package, started on free loopback ports
by tests/orthanc.py's ``running_orthanc``). For each ``requery.max_concurrent`` value, a fresh
node runs in this process (its workers are separate processes, as in `mvi-node serve`) on a new
data folder with the demo models (built once when missing, as `mvi-node demo` does); one
warm-up study dated outside the window is sent to it directly and scored first, so that the
worker has loaded its models. Then `mvi-node requery --since FIRST --until LAST` runs as its own
process, as an operator would run it: C-FIND of the window, C-FIND of each study's series,
C-MOVE of each study to the node, scoring. The clock runs from the command's start until the
node's store shows every study of the window in a final state (done, failed, needs_review,
not_applicable); the command's own exit is reported beside it.

Prints, per setting: studies, seconds, studies/hour and the ratio to ``max_concurrent = 1``
(or to the first setting when 1 is not among them), the outcomes, when the first instance
reached the node (the command's start, its C-FINDs), and the medians of the retrieve (first to
last instance of a study at the node) and of the job (claimed to finished); then the same as a
Markdown table for the README. Node defaults otherwise: the quality gates on,
``completion.quiet_seconds`` 10 (a re-queried study is queued at the retrieve's final answer,
not after the quiet period), ``pipeline.batch_size`` ``"auto"`` (1 on the CPU).

Studies are 128×128×32 by default (what the demo MVI model was trained on; 129 instances, about
4.4 MB): a job's time is mostly segmentation at the working spacing, which hardly depends on
the in-plane size, while the retrieve grows with the instances. With the defaults the whole run
takes roughly 15–25 minutes on 2 quiet cores.

Usage: python bench/requery.py [--studies 50] [--size 128] [--slices 32] [--concurrency 1,2,4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from node.core.logging import configure_logging
from node.core.settings import Settings, to_toml
from node.offline.phantom_study import CohortOptions, WrittenStudy, write_cohort
from node.serve.service import Node, start_node, stop_node
from tests.orthanc import Orthanc, free_port, orthanc_or_skip, running_orthanc

NODE_AET = "MVI_NODE"
#: The study states the node's store ends a study in (`studies list`).
FINAL_STATES = ("done", "failed", "needs_review", "not_applicable")
#: The warm-up study's date: outside any window of the cohort (which starts on 2024-03-01).
WARMUP_DAY = dt.date(2023, 6, 1)
#: Seconds between looks at the store while the re-query runs.
POLL_S = 0.5


@dataclass
class Window:
    """The cohort on the PACS: its StudyInstanceUIDs and the StudyDate range that holds them."""

    uids: set[str]
    since: dt.date
    until: dt.date
    instances: int
    megabytes: float


@dataclass
class Run:
    """One setting's measurement."""

    max_concurrent: int
    studies: int
    seconds: float
    exit_seconds: float
    returncode: int
    outcomes: Counter[str] = field(default_factory=Counter)
    first_s: float = float("nan")
    retrieve_s: float = float("nan")
    job_s: float = float("nan")
    summary: str = ""

    @property
    def per_hour(self) -> float:
        """Studies per hour."""
        return self.studies * 3600.0 / self.seconds


def _models(args: argparse.Namespace) -> tuple[Path, Path]:
    """The segmenter and MVI model folders: given, or the demo models (built when missing)."""
    if args.segmenter is not None and args.model is not None:
        return args.segmenter, args.model
    from rich.console import Console

    from node.analysis.models import demo_fusion_dir, demo_segmenter_dir
    from node.offline.demo import build_demo_models, needs_build

    if any(needs_build(demo_segmenter_dir(), demo_fusion_dir()).values()):
        print("building the demo models (first run only; about 80 s on 2 cores)…", flush=True)
        err = Console(stderr=True)
        build_demo_models(err, err)
    return args.segmenter or demo_segmenter_dir(), args.model or demo_fusion_dir()


def _window(written: list[WrittenStudy]) -> Window:
    dates: list[dt.date] = []
    instances = 0
    size = 0
    for study in written:
        files = [path for paths in study.files.values() for path in paths]
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        dates.append(dt.datetime.strptime(str(header.StudyDate), "%Y%m%d").date())
        instances += len(files)
        size += sum(path.stat().st_size for path in files)
    return Window(
        uids={study.study_instance_uid for study in written},
        since=min(dates),
        until=max(dates),
        instances=instances,
        megabytes=size / 1e6,
    )


def _node_config(
    data: Path, pacs: Orthanc, max_concurrent: int, args: argparse.Namespace
) -> dict[str, Any]:
    return {
        "node": {
            "ae_title": NODE_AET,
            "host": "127.0.0.1",
            "port": free_port(),
            "data_dir": str(data),
            "log_level": "warning",
            "free_disk_floor_mb": 64,
        },
        "peers": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        "requery": {"peer": "pacs", "max_concurrent": max_concurrent},
        "pipeline": {
            "workers": args.workers,
            "device": args.device,
            "segmenter_dir": str(args.segmenter),
            "model_dir": str(args.model),
        },
        "web": {"enabled": False},
    }


def _wait_final(node: Node, uids: set[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not uids <= set(node.store.studies_in_state(*FINAL_STATES)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no final state after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _warm_up(node: Node, study: Path, pacs: Orthanc) -> None:
    """Send one study straight to the node and wait for it: the worker loads its models."""
    from node.offline.demo import send_study

    header = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    send_study(study, node.settings.node.port, calling=pacs.aet, called=NODE_AET)
    _wait_final(node, {str(header.StudyInstanceUID)}, 600)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_setting(
    max_concurrent: int,
    pacs: Orthanc,
    window: Window,
    warmup: Path,
    root: Path,
    args: argparse.Namespace,
) -> Run:
    """A fresh node, a warm-up study, then `mvi-node requery` over the window, timed."""
    data = root / f"node-{max_concurrent}"
    config_data = _node_config(data, pacs, max_concurrent, args)
    config = root / f"node-{max_concurrent}.toml"
    config.write_text(to_toml(config_data))
    log_path = root / f"requery-{max_concurrent}.log"
    node = start_node(Settings.model_validate(config_data))
    try:
        # The node's AE on this run's port is the move destination (replaces the last run's).
        pacs.add_modality("mvi", NODE_AET, "127.0.0.1", node.settings.node.port)
        _warm_up(node, warmup, pacs)
        command = [
            str(Path(sys.executable).parent / "mvi-node"),
            "requery",
            "--since",
            window.since.isoformat(),
            "--until",
            window.until.isoformat(),
            "--config",
            str(config),
        ]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
        scored_at: float | None = None
        with log_path.open("wb") as log:
            started, started_utc = time.perf_counter(), dt.datetime.now(dt.UTC)
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            while True:
                running = process.poll() is None
                if scored_at is None:
                    final = set(node.store.studies_in_state(*FINAL_STATES))
                    if window.uids <= final:
                        scored_at = time.perf_counter() - started
                if not running:
                    break
                if time.perf_counter() - started > args.timeout:
                    process.kill()
                    process.wait()
                    break
                time.sleep(POLL_S)
            exit_seconds = time.perf_counter() - started
        output = log_path.read_text(errors="replace")
        if scored_at is None:
            states = Counter(
                study.state if (study := node.store.study(uid)) is not None else "not received"
                for uid in window.uids
            )
            raise RuntimeError(
                f"max_concurrent {max_concurrent}: the re-query ended (exit {process.returncode}, "
                f"{exit_seconds:.0f} s) before every study was final: {dict(states)}\n"
                + "\n".join(output.splitlines()[-30:])
            )
        run = Run(max_concurrent, len(window.uids), scored_at, exit_seconds, process.returncode)
        retrieves, jobs, arrivals = [], [], []
        for uid in window.uids:
            study = node.store.study(uid)
            latest = node.store.latest_result(uid)
            job = node.store.newest_job(uid)
            if latest is not None:
                run.outcomes[str(latest.status)] += 1
            else:  # a final state without a result (a failed job, not applicable)
                run.outcomes[f"study {study.state if study is not None else 'missing'}"] += 1
            if study is not None and study.first_received_at is not None:
                arrivals.append((study.first_received_at - started_utc).total_seconds())
            if study is not None and study.first_received_at and study.last_received_at:
                retrieves.append((study.last_received_at - study.first_received_at).total_seconds())
            if job is not None and job.started_at and job.finished_at:
                jobs.append((job.finished_at - job.started_at).total_seconds())
        run.retrieve_s, run.job_s = _median(retrieves), _median(jobs)
        run.first_s = min(arrivals, default=float("nan"))
        run.summary = next(
            (line.strip() for line in reversed(output.splitlines()) if line.startswith("found ")),
            "",
        )
        return run
    finally:
        stop_node(node)
        shutil.rmtree(data, ignore_errors=True)


def _report(runs: list[Run], window: Window, args: argparse.Namespace, version: str) -> None:
    base = next((r for r in runs if r.max_concurrent == 1), runs[0])
    print()
    print(
        f"{len(window.uids)} studies of {args.size}×{args.size}×{args.slices} (4 phases + "
        f"localizer, {window.instances // len(window.uids)} instances, "
        f"{window.megabytes / len(window.uids):.1f} MB each); Orthanc {version}, C-MOVE; "
        f"{args.workers} worker(s), device {args.device}; {os.cpu_count()} cores"
    )
    print()
    print(
        "| `requery.max_concurrent` | studies | seconds | studies/hour "
        f"| vs max_concurrent={base.max_concurrent} "
        "| first instance after s | retrieve s/study (median) | job s/study (median) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run.max_concurrent} | {run.studies} | {run.seconds:.1f} | {run.per_hour:.0f} "
            f"| {run.per_hour / base.per_hour:.2f}× | {run.first_s:.1f} | {run.retrieve_s:.2f} "
            f"| {run.job_s:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50, help="studies in the window")
    parser.add_argument("--size", type=int, default=128, help="rows and columns")
    parser.add_argument("--slices", type=int, default=32, help="slices per phase")
    parser.add_argument("--concurrency", default="1,2,4", help="requery.max_concurrent values")
    parser.add_argument("--workers", type=int, default=1, help="pipeline.workers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per setting")
    parser.add_argument("--segmenter", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    settings = [int(v) for v in args.concurrency.split(",") if v.strip()]
    if not settings or args.studies < 1:
        parser.error("need at least one study and one --concurrency value")
    import pytest

    try:
        orthanc_or_skip()
    except (pytest.skip.Exception, pytest.fail.Exception) as exc:
        sys.exit(str(exc))
    configure_logging("warning")
    args.segmenter, args.model = _models(args)
    with tempfile.TemporaryDirectory(prefix="mvi-requery-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        cohort = root / "cohort"
        options = CohortOptions(
            studies=args.studies, seed=args.seed, size=args.size, slices=args.slices
        )
        window = _window(write_cohort(cohort, options))
        warmup = root / "warmup"
        day = (WARMUP_DAY, WARMUP_DAY)
        write_cohort(
            warmup, CohortOptions(seed=args.seed + 1, size=args.size, slices=args.slices, dates=day)
        )
        print(
            f"cohort: {args.studies} studies, {window.instances} instances, "
            f"{window.megabytes:.0f} MB, {window.since}..{window.until} "
            f"({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
        with running_orthanc(root / "orthanc") as pacs:
            started = time.perf_counter()
            for study in sorted(p for p in cohort.iterdir() if p.is_dir()):
                pacs.upload_folder(study)
            shutil.rmtree(cohort)  # Orthanc has its own copy
            version = str(pacs.rest("GET", "/system").get("Version", "?"))
            print(
                f"uploaded into Orthanc {version} in {time.perf_counter() - started:.1f} s",
                flush=True,
            )
            runs: list[Run] = []
            for max_concurrent in settings:
                run = run_setting(max_concurrent, pacs, window, warmup / "study_0001", root, args)
                runs.append(run)
                base = next((r for r in runs if r.max_concurrent == 1), runs[0])
                outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items()))
                print(
                    f"max_concurrent {max_concurrent}: {run.studies} studies in "
                    f"{run.seconds:.1f} s = {run.per_hour:.0f} studies/hour "
                    f"({run.per_hour / base.per_hour:.2f}× max_concurrent={base.max_concurrent}); "
                    f"command exited {run.returncode} after {run.exit_seconds:.1f} s; {outcomes}; "
                    f"first instance after {run.first_s:.1f} s, median retrieve "
                    f"{run.retrieve_s:.2f} s, job {run.job_s:.2f} s",
                    flush=True,
                )
    _report(runs, window, args, version)


if __name__ == "__main__":
    main()
