"""Phantom generation figures: time and disk for a cohort, time and memory for one large study.

Prints, for `mvi-node phantom OUT --studies N` at the default 256×256×64 (the figure the README
quotes), the wall time, seconds per study and the on-disk size; then the time and peak memory of
one 512×512×200 study (anatomy only, and written as DICOM), in a child process each so that the
peak RSS is that run's alone.

Usage: python bench/phantom_bench.py [--studies 20] [--large/--no-large]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LARGE_CHILD = """
import resource, sys, time
from pathlib import Path
from model.phantom import PhantomSpec, make_study
from node.core.logging import configure_logging
from node.offline.phantom_study import CohortOptions, write_cohort
configure_logging("warning")
t0 = time.perf_counter()
study = make_study(1, PhantomSpec(size=512, slices=200))
t1 = time.perf_counter()
del study  # measure the write on its own, not two studies in memory
write_cohort(Path(sys.argv[1]), CohortOptions(studies=1, seed=1, size=512, slices=200))
t2 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {peak:.0f}")
"""


def disk_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--large", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    script = Path(sys.executable).parent / "mvi-node"
    with tempfile.TemporaryDirectory(prefix="mvi-bench-") as tmp:
        out = Path(tmp) / "cohort"
        started = time.perf_counter()
        subprocess.run(
            [str(script), "phantom", str(out), "--studies", str(args.studies), "--seed", "1"],
            check=True,
            capture_output=True,
        )
        elapsed = time.perf_counter() - started
        files = sum(1 for p in out.rglob("*.dcm"))
        print(
            f"phantom --studies {args.studies} (256x256x64, 5 series): {elapsed:.1f} s, "
            f"{elapsed / args.studies:.2f} s/study, {disk_mb(out):.0f} MB, {files} files"
        )
        shutil.rmtree(out)
        if args.large:
            large = Path(tmp) / "large"
            result = subprocess.run(
                [sys.executable, "-c", LARGE_CHILD, str(large)],
                check=True,
                capture_output=True,
                text=True,
            )
            anatomy_s, write_s, peak_mb = result.stdout.strip().splitlines()[-1].split()
            print(
                f"one 512x512x200 study: anatomy {anatomy_s} s, anatomy+DICOM {write_s} s, "
                f"{disk_mb(large):.0f} MB, peak RSS {peak_mb} MB"
            )
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"CPU time of all runs: {children.ru_utime + children.ru_stime:.1f} s")


if __name__ == "__main__":
    main()
