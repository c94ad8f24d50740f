"""Fuzzing the receive path at length: mutated CT datasets over real associations to a node.

The strategy of tests/fuzzing.py (attribute and byte mutations of a small CT image, in every
accepted uncompressed syntax), drawn at random for ``--examples`` examples against one running
``mvi-node serve``. Prints the examples tried, the answers by status, the acknowledged instances
checked byte for byte, and the two loss figures that must be 0: acknowledged instances missing or
altered, and files without a row (or rows without a file). The CI test runs the same checks on a
fixed 60.

Usage: python bench/fuzz.py [--examples 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# The fuzz strategy and the node harness live with the tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings

from node.core.dicom import stored
from tests.fuzzing import (
    Mutant,
    check_acknowledged,
    instance_rows,
    mutated_datasets,
    send_raw,
    spool_files,
)
from tests.nodeproc import NODE_AET, SCU_AET, running_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    args = parser.parse_args()
    statuses: Counter[str] = Counter()
    problems: list[str] = []
    unanswered = 0
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        with running_node(folder / "node", {"completion": {"quiet_seconds": 3600}}) as node:
            database = Path(node.settings.database_url.removeprefix("sqlite:///"))
            started = time.perf_counter()

            @settings(
                max_examples=args.examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(mutant=mutated_datasets())
            def run(mutant: Mutant) -> None:
                nonlocal unanswered
                status = send_raw(node.port, SCU_AET, NODE_AET, mutant, folder)
                if status is None:
                    unanswered += 1
                    return
                statuses[f"{status:#06x}"] += 1
                if stored(status):
                    problem = check_acknowledged(database, node.spool, mutant)
                    if problem is not None:
                        problems.append(f"{mutant.how}: {problem}")

            run()
            seconds = time.perf_counter() - started
            alive = node.process.poll() is None
            orphans = abs(spool_files(node.spool) - instance_rows(database))
    tried = sum(statuses.values()) + unanswered
    print(f"examples tried: {tried} in {seconds:.0f} s ({tried / seconds:.1f}/s)")
    print("answers: " + ", ".join(f"{k} × {v}" for k, v in sorted(statuses.items())))
    acknowledged = sum(n for s, n in statuses.items() if stored(int(s, 16)))
    print(f"acknowledged and checked byte for byte: {acknowledged}")
    print(
        f"unanswered: {unanswered}; acknowledged but missing or altered: {len(problems)}; "
        f"files and rows that disagree: {orphans}; node alive: {alive}"
    )
    for problem in problems[:10]:
        print(f"  {problem}")
    if unanswered or problems or orphans or not alive:
        sys.exit(1)


if __name__ == "__main__":
    main()
