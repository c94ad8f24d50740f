"""Fuzzing the receive path: mutated CT datasets over a real association to a running node.

Whatever arrives, the node answers with a status and keeps running; what it acknowledges is on
disk and in the store byte for byte, and no file is left without its row. ``MVI_FUZZ_EXAMPLES``
sets the number of examples (CI: 60); bench/fuzz.py runs thousands.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
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
from tests.nodeproc import NODE_AET, SCU_AET, NodeProcess, running_node

EXAMPLES = int(os.environ.get("MVI_FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # No analysis: the fuzz is about the door and the store (the quiet timer never fires).
    workdir = tmp_path_factory.mktemp("fuzz")
    with running_node(workdir, {"completion": {"quiet_seconds": 3600}}) as running:
        yield running


def test_every_mutant_gets_a_status_and_every_acknowledged_one_is_stored_intact(
    node: NodeProcess, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("mutants")
    database = Path(node.settings.database_url.removeprefix("sqlite:///"))
    statuses: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutant=mutated_datasets())
    def check(mutant: Mutant) -> None:
        status = send_raw(node.port, SCU_AET, NODE_AET, mutant, folder)
        assert status is not None, f"no answer to {mutant.how}"
        statuses[f"{status:#06x}"] += 1
        assert node.process.poll() is None, f"the node died of {mutant.how}"
        if stored(status):
            problem = check_acknowledged(database, node.spool, mutant)
            assert problem is None, f"{mutant.how}: {problem}"

    check()
    assert sum(statuses.values()) >= EXAMPLES
    assert statuses["0x0000"] > 0 and len(statuses) > 1, statuses  # both kinds were exercised
    assert spool_files(node.spool) == instance_rows(database), "a file without its row, or a row"
