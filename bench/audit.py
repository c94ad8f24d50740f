"""The audit on a synthetic site: results in the node's store → hashed export → audit report.

Writes ``--studies`` scored results into a fresh node store (through the store's API, as the
worker does), exports them with pseudonymised identifiers (``mvi-node results export``), draws
follow-up whose hazard for predicted MVI-positive patients is ``--hr`` times that of the others
(default 2.246, the paper's internal-cohort HR) and pathology MVI labels from the model's
probability, then runs ``mvi-node audit`` with the follow-up keyed by plain Study Instance UIDs
(the audit hashes them with the same key). Prints the headline numbers, whether the true HR lies
in the reported 95 % CI, and the seconds each command took.

Usage: python bench/audit.py [--studies 300] [--hr 2.246] [--seed 5] [--out DIR]
       [--copy-km docs/audit-km.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from node.analysis.result import Result
from node.core.settings import load_settings, to_toml
from node.store.database import InstanceRecord, Store

KEY = "bench-audit-key"


def _populate(store: Store, n: int, rng: np.random.Generator) -> list[tuple[str, float, str]]:
    """``n`` studies with a scored result each; returns (uid, probability, risk)."""
    studies = []
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.8.498.77.{i + 1}"
        date = f"{2016 + i % 8}{1 + i % 12:02d}{1 + i % 28:02d}"
        store.record_instance(
            InstanceRecord(
                study_uid=uid,
                series_uid=f"{uid}.1",
                sop_instance_uid=f"{uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=f"{uid}/1.dcm",
                size=0,
                sha256=f"{i:064x}",
                calling_ae="PACS",
                modality="CT",
                series_number=1,
                series_description="Liver arterial",
                analysable=True,
                own_output=False,
                patient_id=f"P{i:06d}",
                patient_name="SYNTHETIC^PATIENT",
                accession_number=f"A{i:07d}",
                study_date=date,
            )
        )
        probability = float(rng.beta(2.0, 2.5))
        risk = "high" if probability >= 0.5 else "low"
        diameter = float(abs(rng.normal(40 + 30 * probability, 12)) + 8)
        loat = float(rng.gamma(2.0, 1.5 + 2.0 * probability))
        job = store.reprocess(uid)
        store.record_result(
            job,
            uid,
            Result.model_validate(
                {
                    "study_instance_uid": uid,
                    "status": "scored",
                    "mvi_probability": round(probability, 4),
                    "combined_probability": round(probability, 4),
                    "risk_category": risk,
                    "tumor": {
                        "max_diameter_mm": round(diameter, 1),
                        "volume_ml": 1.0,
                        "count": 1,
                        "diameter_slice": 0,
                    },
                    "loat": {
                        "found": True,
                        "max_area_cm2": round(loat, 2),
                        "volume_ml": 1.0,
                        "area_slice": 0,
                    },
                    "model": {
                        "name": "mvi-fusion-resnet18",
                        "version": "bench",
                        "threshold": 0.5,
                        "demo": True,
                    },
                }
            ),
        )
        studies.append((uid, probability, risk))
    return studies


def _cli(*args: str | Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    script = Path(sys.executable).with_name("mvi-node")
    done = subprocess.run(
        [str(script), *map(str, args)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({done.returncode}): {done.stderr}")
    return time.perf_counter() - started, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--hr", type=float, default=2.246)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--copy-km", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mvi-bench-audit-"))
    out = args.out or work / "report"
    config = work / "node.toml"
    config.write_text(
        to_toml({"node": {"data_dir": str(work / "data")}, "security": {"pseudonym_key": KEY}})
    )
    settings = load_settings(config)
    rng = np.random.default_rng(args.seed)
    store = Store(settings.database_url)
    studies = _populate(store, args.studies, rng)
    store.close()

    with (work / "followup.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid", "time", "event", "age"])
        for uid, _p, risk in studies:
            rate = 0.02 * (args.hr if risk == "high" else 1.0)  # events per month
            event_time, censor = rng.exponential(1 / rate), rng.uniform(12, 84)
            age = rng.normal(60, 10)
            writer.writerow(
                [uid, f"{min(event_time, censor):.2f}", int(event_time <= censor), f"{age:.0f}"]
            )
    with (work / "pathology.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_instance_uid", "mvi"])
        for uid, probability, _risk in studies:
            writer.writerow([uid, int(rng.random() < probability)])

    export_s, _ = _cli("results", "export", "--out", work / "results.csv", "--config", config)
    audit_s, _ = _cli(
        "audit",
        "--results",
        work / "results.csv",
        "--followup",
        work / "followup.csv",
        "--pathology",
        work / "pathology.csv",
        "--covariates",
        "age",
        "--out",
        out,
        "--config",
        config,
    )
    report = json.loads((out / "report.json").read_text())
    cox = report["survival"]["cox"]
    covered = cox["ci_low"] <= args.hr <= cox["ci_high"]
    from node.report.audit import headline

    print(f"synthetic site: {args.studies} studies, true HR {args.hr}, seed {args.seed}")
    for label, value in headline(report):
        print(f"  {label:<42} {value}")
    print(f"  true HR inside the reported 95 % CI: {'yes' if covered else 'NO'}")
    print(f"  export {export_s:.1f} s, audit {audit_s:.1f} s (including interpreter start)")
    print(f"  report: {out / 'report.html'}")
    if args.copy_km is not None:
        shutil.copyfile(out / "km.png", args.copy_km)
        print(f"  KM plot copied to {args.copy_km}")


if __name__ == "__main__":
    main()
