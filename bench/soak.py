"""Soak: eight senders against a running node while its PACS goes away and a worker is killed.

One ``mvi-node serve`` (two workers, the tests' tiny models, results sent to an Orthanc PACS) and
eight DCMTK ``storescu`` senders, each sending its own phantom studies over and over until
``--minutes`` have passed (a resend is an identical duplicate: stored once, not re-analysed).
The PACS is down from the start until two thirds of the time (every result set waits and
retries), and the first worker seen running a job is killed with SIGKILL (the job must run
again, and its results reach the PACS once). When the senders stop, the bench waits until every
study is final and the outbox is empty, then prints:

- instances sent (associations that storescu reported as fully acknowledged) and distinct;
- acknowledged instances missing from the store or the spool (must be 0), and stored duplicates
  (rows beyond one per distinct instance; must be 0);
- studies analysed, and studies whose result set reached the PACS other than exactly once (the
  PACS holds every object the outbox recorded for the study and no other; must be 0);
- the receiving process's peak RSS (VmHWM; goal ≤ 400 MB).

Usage: python bench/soak.py [--minutes 5] [--studies-per-sender 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

# The node harness, the PACS harness and the phantom cohorts live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.offline.phantom_study import CohortOptions, write_cohort
from tests.nodeproc import dcmtk_env, running_node, storescu_command, wait_for
from tests.orthanc import restart_orthanc, running_orthanc

SENDERS = 8
RSS_GOAL_MB = 400.0
FINAL = {"done", "failed", "needs_review", "not_applicable"}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--studies-per-sender", type=int, default=2)
    args = parser.parse_args()
    duration = args.minutes * 60

    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        studies = SENDERS * args.studies_per_sender
        cohort = work / "cohort"
        write_cohort(cohort, CohortOptions(studies=studies, seed=77, size=96, slices=24))
        folders = sorted(p for p in cohort.iterdir() if p.is_dir())
        distinct = sum(1 for _ in cohort.rglob("*.dcm"))
        with running_orthanc(work / "orthanc") as pacs:
            extra = {
                "peers": {
                    "scu": {"ae_title": "STORESCU", "host": "127.0.0.1"},
                    "pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
                },
                "results": {"destinations": ["pacs"]},
                "outbox": {"backoff_initial_s": 1.0, "backoff_max_s": 5.0},
                "pipeline": {"workers": 2},
                "completion": {"quiet_seconds": 2.0},
                "node": {"max_associations": 16},
            }
            with running_node(work / "node", extra) as node:
                started = time.monotonic()
                sent: Counter[str] = Counter()
                lock = threading.Lock()

                def sender(index: int) -> None:
                    mine = folders[index::SENDERS]
                    while time.monotonic() - started < duration:
                        for folder in mine:
                            done = subprocess.run(
                                storescu_command(node.port, folder),
                                capture_output=True,
                                env=dcmtk_env(),
                                timeout=600,
                                check=False,
                            )
                            files = sum(1 for _ in folder.rglob("*.dcm"))
                            with lock:
                                sent["ok" if done.returncode == 0 else "failed"] += files

                # The PACS is down from the start: every result set has to wait and retry.
                pacs.stop()
                events = ["PACS stopped at 0 s"]
                threads = [threading.Thread(target=sender, args=(i,)) for i in range(SENDERS)]
                for thread in threads:
                    thread.start()
                killer = node.store()
                # A worker killed in the middle of a job: the job must run again, once.
                while time.monotonic() - started < duration / 2:
                    running = [
                        j for j in killer.list_jobs() if j.state == "running" and j.worker_pid
                    ]
                    if running:
                        pid = int(running[0].worker_pid)  # type: ignore[arg-type]
                        os.kill(pid, signal.SIGKILL)
                        at = time.monotonic() - started
                        events.append(
                            f"worker {pid} killed during job {running[0].id} at {at:.0f} s"
                        )
                        break
                    time.sleep(0.2)
                killer.close()
                time.sleep(max(0.0, 2 * duration / 3 - (time.monotonic() - started)))
                pacs = restart_orthanc(pacs)
                events.append(f"PACS back at {time.monotonic() - started:.0f} s")
                for thread in threads:
                    thread.join()

                store = node.store()
                with (cohort / "truth.csv").open(newline="") as handle:
                    uids = [row["study_instance_uid"] for row in csv.DictReader(handle)]

                def settled() -> bool:
                    rows = [store.study(uid) for uid in uids]
                    pending = store.list_outbox()
                    return all(r is not None and r.state in FINAL for r in rows) and not pending

                wait_for(settled, timeout=600, every=2.0)
                rows = sum(len(store.instance_files(uid)) for uid in uids)
                spool = sum(1 for p in node.spool.rglob("*.dcm") if ".incoming" not in p.parts)
                analysed = sum(1 for uid in uids if store.study(uid).state == "done")  # type: ignore[union-attr]
                # Exactly one result set: the PACS holds every object the outbox recorded for
                # the study and nothing more (a second set would carry new UIDs).
                delivered = store.list_outbox(include_sent=True, limit=100_000)
                not_once = 0
                for uid in uids:
                    expected = {i.sop_instance_uid for i in delivered if i.study_uid == uid}
                    held = (
                        [str(i.get("SOPInstanceUID", "")) for i in pacs.instances_of_study(uid)]
                        if pacs.find_study_id(uid)
                        else []
                    )
                    if sorted(held) != sorted(expected):
                        not_once += 1
                rss = peak_rss_mb(node.process.pid)
                store.close()

    print(f"{SENDERS} senders for {args.minutes:g} min; " + "; ".join(events))
    print(
        f"instances sent and acknowledged: {sent['ok']} ({distinct} distinct); "
        f"in associations that failed: {sent['failed']}"
    )
    print(
        f"missing from the store: {max(0, distinct - rows)}; duplicates stored: "
        f"{max(0, rows - distinct)}; files without a row: {spool - rows}"
    )
    print(
        f"studies analysed: {analysed} of {len(uids)}; result sets at the PACS not exactly "
        f"once: {not_once}"
    )
    print(f"receiving process peak RSS: {rss:.0f} MB (goal ≤ {RSS_GOAL_MB:.0f} MB)")
    if rows != distinct or spool != rows or not_once or rss > RSS_GOAL_MB:
        sys.exit(1)


if __name__ == "__main__":
    main()
