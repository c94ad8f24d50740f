"""End-to-end latency: last instance acknowledged → last result object at the receiving PACS.

One node (in this process; its worker is a separate process, as in `mvi-node serve`) with a PACS
as its results destination (below). For each size, a cohort of phantom studies (a warm-up
study, then ``--runs`` measured ones) is sent one after another; for each: the time from the
last C-STORE response to the arrival of the last result object at the PACS, with the quiet
period (``completion.quiet_seconds``) reported separately, the job's stage timings, and the
worker's peak RSS. Uses the demo models (built by `mvi-node demo`) unless --segmenter/--model
are given.

Two ratios from the same run, since absolute CPU times differ between machines: the whole
(last instance to last object at the PACS, quiet period excluded) against the compute stages
(register + segment + infer), and the encode stage's share of the whole. Then, with
``--batch N``, the throughput with N studies waiting at once (sent back to back, the worker
taking up to ``pipeline.batch_size`` per claim): studies/hour. A CUDA run is ``--device cuda``;
without a CUDA device the GPU figures are printed as not measured.

The results go to DCMTK's ``storescp`` (``--pacs storescp``, the default): a C++ SCP in a
process of its own, as a site's PACS is, with its default 16 KB PDUs; the time of arrival is
when it finished writing the last object (the file's modification time). ``--pacs mini`` sends
them to the demo's mini PACS instead, a pynetdicom SCP inside this process, whose decoding of
each object shares the interpreter lock with the node's dispatcher (the figures before
2026-12-07 evening).

Usage: python bench/e2e.py [--runs 5] [--sizes 256x64,512x200] [--device auto] [--batch 8]
       [--pacs storescp|mini]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from node.analysis.models import demo_fusion_dir, demo_segmenter_dir
from node.core.logging import configure_logging
from node.core.settings import Settings
from node.offline.demo import MiniPacs, send_study
from node.offline.phantom_study import CohortOptions, write_cohort
from node.serve.service import start_node, stop_node

QUIET_S = 1.0
#: The stages that compute (the rest is reading, checking, encoding and sending).
COMPUTE_STAGES = ("register", "segment", "infer")


def _settings(data: Path, pacs_port: int, segmenter: Path, model: Path, device: str) -> Settings:
    from tests.orthanc import free_port

    return Settings.model_validate(
        {
            "node": {
                "ae_title": "MVI_NODE",
                "host": "127.0.0.1",
                "port": free_port(),
                "data_dir": str(data),
                "log_level": "warning",
                "free_disk_floor_mb": 64,
            },
            "peers": {"pacs": {"ae_title": "MINI_PACS", "host": "127.0.0.1", "port": pacs_port}},
            "completion": {"quiet_seconds": QUIET_S},
            "pipeline": {
                "workers": 1,
                "device": device,
                "segmenter_dir": str(segmenter),
                "model_dir": str(model),
            },
            "results": {"destinations": ["pacs"]},
        }
    )


class Destination(Protocol):
    """Where the node sends its results: what arrived, and when (``time.perf_counter()``)."""

    port: int

    def received(self) -> dict[str, float]: ...

    def stop(self) -> None: ...


class MiniDestination:
    """The demo's mini PACS (pynetdicom, in this process)."""

    def __init__(self, folder: Path) -> None:
        self.pacs = MiniPacs(folder).start()
        self.port = self.pacs.port

    def received(self) -> dict[str, float]:
        return self.pacs.arrivals()

    def stop(self) -> None:
        self.pacs.stop()


class StoreScpDestination:
    """DCMTK's storescp in a process of its own; an object arrived when its file was last
    written (storescp answers the C-STORE after writing it)."""

    def __init__(self, folder: Path) -> None:
        from bench.ingest import dcmtk_env, wait_listening
        from tests.conftest import find_tool
        from tests.orthanc import free_port

        tool = find_tool("storescp")
        if tool is None:
            raise SystemExit("storescp not found: apt-get install dcmtk (or --pacs mini)")
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.process = subprocess.Popen(
            [tool, "-aet", "MINI_PACS", "-od", str(folder), str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(self.port, self.process)
        except BaseException:
            self.stop()
            raise

    def received(self) -> dict[str, float]:
        # File times are wall-clock (to the kernel's tick, a few ms); this clock's offset from
        # perf_counter is read alongside.
        offset = time.time() - time.perf_counter()
        return {
            str(path): path.stat().st_mtime - offset
            for path in self.folder.iterdir()
            if path.is_file() and not path.name.startswith(".")
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _destination(kind: str, folder: Path) -> Destination:
    return StoreScpDestination(folder) if kind == "storescp" else MiniDestination(folder)


def _start(settings: Settings, pacs: Destination) -> Any:
    """The node, or the destination stopped and the error raised."""
    try:
        return start_node(settings)
    except BaseException:
        pacs.stop()
        raise


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_size(size: int, slices: int, runs: int, args: argparse.Namespace, root: Path) -> None:
    cohort = root / f"cohort-{size}"
    write_cohort(cohort, CohortOptions(studies=runs + 1, seed=11, size=size, slices=slices))
    pacs = _destination(args.pacs, root / f"pacs-{size}")
    settings = _settings(root / f"node-{size}", pacs.port, args.segmenter, args.model, args.device)
    node = _start(settings, pacs)
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        for index, study in enumerate(sorted(cohort.glob("study_*"))):
            before = pacs.received()
            send_study(study, settings.node.port)
            acknowledged = time.perf_counter()
            while True:
                time.sleep(0.05)
                # SEG, SR and SC of a scored study; SR and SC otherwise: wait for the job's outputs.
                latest = None
                rows = node.store.list_studies(1)
                if rows and rows[0].state in (
                    "done",
                    "failed",
                    "needs_review",
                    "not_applicable",
                ):
                    latest = node.store.latest_result(rows[0].study_uid)
                if latest is not None:
                    wanted = len(latest.result.outputs)
                    if len(pacs.received()) - len(before) >= wanted:
                        break
                if time.perf_counter() - acknowledged > 600:
                    raise RuntimeError("no result after 600 s")
            time.sleep(0.3)  # a file written as this loop looked is complete by now
            # When the PACS stored the last object, not when this loop looked (every 50 ms).
            arrived = [at for name, at in pacs.received().items() if name not in before]
            # A study with no objects (none configured) ends when its job does.
            elapsed = (max(arrived) if arrived else time.perf_counter()) - acknowledged
            if index == 0:
                # The first study after the start: printed, not in the median (what a site
                # sees after each restart).
                first = (elapsed - QUIET_S, dict(latest.result.timings_s))
                continue
            latencies.append(elapsed - QUIET_S)
            for stage, seconds in latest.result.timings_s.items():
                stages.setdefault(stage, []).append(float(seconds))
            timings = latest.result.timings_s
            compute = sum(float(timings.get(k, 0.0)) for k in COMPUTE_STAGES)
            ratios.setdefault("whole/compute", []).append((elapsed - QUIET_S) / compute)
            ratios.setdefault("encode/whole", []).append(
                float(timings.get("encode", 0.0)) / (elapsed - QUIET_S)
            )
            # What no stage times: the job's start, recording the objects, delivery.
            stages.setdefault("rest", []).append(
                elapsed - QUIET_S - sum(float(v) for v in timings.values())
            )
        workers = [p.pid for p in node.workers._workers if p.pid is not None]
        worker_rss = max(_peak_rss_mb(pid) for pid in workers)
        node_rss = _peak_rss_mb(os.getpid())
    finally:
        stop_node(node)
        pacs.stop()
    breakdown = ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in stages.items())
    print(
        f"{size}x{size}x{slices}: median {statistics.median(latencies):.2f} s after the last "
        f"instance (+{QUIET_S:.0f} s quiet period), runs {', '.join(f'{v:.2f}' for v in latencies)}"
    )
    print(f"  stages (median s): {breakdown}")
    first_stages = ", ".join(f"{k} {float(v):.2f}" for k, v in first[1].items())
    print(f"  first study after the start: {first[0]:.2f} s ({first_stages})")
    print(
        f"  whole / compute ({' + '.join(COMPUTE_STAGES)}): "
        f"{statistics.median(ratios['whole/compute']):.2f}; encode / whole: "
        f"{100 * statistics.median(ratios['encode/whole']):.1f} %"
    )
    print(
        f"  peak RSS: worker {worker_rss:.0f} MB; bench process (receiver and phantom "
        f"generation) {node_rss:.0f} MB"
    )


def run_batch(size: int, slices: int, count: int, args: argparse.Namespace, root: Path) -> None:
    """``count`` studies sent back to back, then the time until every result is at the PACS."""
    cohort = root / f"batch-{size}"
    write_cohort(cohort, CohortOptions(studies=count + 1, seed=12, size=size, slices=slices))
    pacs = _destination(args.pacs, root / f"batch-pacs-{size}")
    settings = _settings(
        root / f"batch-node-{size}", pacs.port, args.segmenter, args.model, args.device
    )
    node = _start(settings, pacs)
    try:
        studies = sorted(cohort.glob("study_*"))
        # The first study after the start: not timed.
        send_study(studies[0], settings.node.port)
        _wait_done(node, 1, pacs)
        started = time.perf_counter()
        for study in studies[1:]:
            send_study(study, settings.node.port)
        _wait_done(node, count + 1, pacs)
        elapsed = time.perf_counter() - started
    finally:
        stop_node(node)
        pacs.stop()
    print(
        f"{size}x{size}x{slices}, {count} studies waiting: {elapsed:.1f} s, "
        f"{3600 * count / elapsed:.0f} studies/hour (device {args.device})"
    )


def _wait_done(node: Any, studies: int, pacs: Destination, timeout: float = 3600) -> None:
    """Until ``studies`` studies are final and their outputs are at the PACS."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        rows = node.store.list_studies(studies + 5)
        final = [r for r in rows if r.state in ("done", "failed", "needs_review", "not_applicable")]
        if len(final) < studies:
            continue
        wanted = 0
        for row in final:
            latest = node.store.latest_result(row.study_uid)
            wanted += len(latest.result.outputs) if latest is not None else 0
        if len(pacs.received()) >= wanted:
            return
    raise RuntimeError(f"{studies} studies not done after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--sizes", default="256x64,512x200")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--segmenter", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=0, help="Studies waiting at once (0: none).")
    parser.add_argument("--pacs", choices=("storescp", "mini"), default="storescp")
    args = parser.parse_args()
    args.segmenter = args.segmenter or demo_segmenter_dir()
    args.model = args.model or demo_fusion_dir()
    configure_logging("warning")
    print(f"results destination: {args.pacs}")
    with tempfile.TemporaryDirectory(prefix="mvi-e2e-") as tmp:
        for item in args.sizes.split(","):
            size, slices = (int(v) for v in item.split("x"))
            run_size(size, slices, args.runs, args, Path(tmp))
            if args.batch:
                run_batch(size, slices, args.batch, args, Path(tmp))
    import torch

    if args.device == "auto" and not torch.cuda.is_available():
        print("CUDA: not measured (no CUDA device here; run with --device cuda on a GPU host)")


if __name__ == "__main__":
    main()
