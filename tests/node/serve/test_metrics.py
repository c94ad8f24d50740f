"""Specification of /metrics and /healthz, scraped over HTTP from a running node."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from node.core.settings import Settings
from node.serve.metrics import HEALTH_CACHE_S, CachedChecks, HealthCheck, listening
from tests.conftest import require_tool, run_tool
from tests.nodeproc import NODE_AET, dcmtk_env, running_node, storescu_command, wait_for
from tests.orthanc import free_port


def get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def healthy(url: str) -> bool:
    """/healthz answers 200 (the metrics server starts just after the DICOM port listens)."""
    try:
        return get(url)[0] == 200
    except urllib.error.URLError:
        return False


def metric(text: str, name: str) -> float:
    """The value of one sample line, e.g. ``mvi_instances_received_total``."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the metrics")


def test_metrics_count_instances_rejections_and_health(
    tmp_path: Path, cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=71, size=48, slices=16)
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    study = cohort / row["study_folder"]
    files = list(study.rglob("*.dcm"))
    port = free_port()
    with running_node(tmp_path, {"metrics": {"port": port}}) as node:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(base + "/healthz"), timeout=30)
        subprocess.run(
            storescu_command(node.port, study),
            env=dcmtk_env(),
            check=True,
            capture_output=True,
            timeout=120,
        )
        echoscu = require_tool("echoscu", "dcmtk")
        run_tool(echoscu, "-aet", "STRANGER", "-aec", NODE_AET, "127.0.0.1", node.port, check=False)
        wait_for(lambda: 'mvi_studies{state="done"} 1.0' in get(base + "/metrics")[1], timeout=60)
        store = node.store()
        store.mark_retrospective("1.2.826.0.1.3680043.8.498.5", "20240101")
        store.set_retrospective_state("1.2.826.0.1.3680043.8.498.5", "move_failed", "refused")
        store.close()
        status, text = get(base + "/metrics")
        assert status == 200
        assert metric(text, "mvi_instances_received_total") == len(files)
        assert (
            metric(text, "mvi_received_bytes_total") >= sum(p.stat().st_size for p in files) * 0.9
        )
        assert (
            metric(text, 'mvi_associations_total{reason="unknown_calling_ae",result="rejected"}')
            == 1
        )
        jobs_histogram = "mvi_job_duration_seconds"
        assert f"{jobs_histogram}_count 1.0" in text, "one finished job in the histogram"
        assert metric(text, "mvi_outbox_depth") == 0
        assert metric(text, 'mvi_retrospective_studies{state="move_failed"}') == 1
        assert metric(text, 'mvi_retrospective_studies{state="moved"}') == 0
        stages = "mvi_stage_duration_seconds"
        assert metric(text, stages + '_count{stage="register"}') == 1
        assert metric(text, stages + '_count{stage="segment"}') == 1
        assert metric(text, 'mvi_inference_device_jobs{device="cpu"}') == 1
        assert metric(text, "mvi_gpu_memory_peak_bytes") == 0

        status, body = get(base + "/healthz")
        report = json.loads(body)
        assert status == 200 and report["status"] == "ok"
        assert report["checks"]["models"] == {"ok": True, "detail": "ok"}
        # The worker recorded its model loads; a failed one (a model folder removed under a
        # running node, say) makes the node unhealthy, naming the model.
        loads_file = node.settings.node.data_dir / "model-loads.json"
        loads = json.loads(loads_file.read_text())
        assert loads["segmenter"]["ok"] is True and loads["MVI model"]["ok"] is True
        loads["MVI model"] = {"ok": False, "detail": "ModelUnavailable: no MVI model at /gone"}
        loads_file.write_text(json.dumps(loads))
        wait_for(lambda: get(base + "/healthz")[0] == 503, timeout=HEALTH_CACHE_S + 5)
        report = json.loads(get(base + "/healthz")[1])
        assert report["checks"]["models"] == {
            "ok": False,
            "detail": "MVI model: ModelUnavailable: no MVI model at /gone",
        }
        loads_file.unlink()
        wait_for(lambda: get(base + "/healthz")[0] == 200, timeout=HEALTH_CACHE_S + 5)
        # The database file gone from under the node (a lost mount, an operator's mistake): the
        # node's open connections keep working, but a fresh one cannot open it, so health fails.
        # (chmod would not do: the tests run as root, who writes read-only files anyway.)
        database = node.settings.node.data_dir / "mvi-node.sqlite3"
        database.rename(database.with_suffix(".moved"))
        # Answers are reused for HEALTH_CACHE_S: the failure shows within that.
        wait_for(lambda: get(base + "/healthz")[0] == 503, timeout=HEALTH_CACHE_S + 5)
        status, body = get(base + "/healthz")
        report = json.loads(body)
        assert status == 503
        assert report["checks"]["store"]["ok"] is False
        assert report["checks"]["store"]["detail"].startswith("store unavailable")
        assert report["checks"]["ae"] == {"ok": True, "detail": "ok"}


def test_the_ae_check_reads_the_listener_and_never_connects() -> None:
    """A monitor's poll must not take one of the node's association slots: the check asks the
    listening socket itself whether it listens."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    assert listening(server) == "the DICOM port does not listen"
    server.listen()
    assert listening(server) is None
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.accept()  # nobody knocked
    server.close()
    assert listening(server) is not None and "closed" in str(listening(server))


def test_health_answers_are_reused_for_a_few_seconds() -> None:
    runs: list[float] = []

    def counted() -> str | None:
        runs.append(time.monotonic())
        return None

    health = CachedChecks([HealthCheck("counted", counted)], ttl_s=0.3)
    assert [health() for _ in range(20)] == [{"counted": None}] * 20
    assert len(runs) == 1
    time.sleep(0.35)
    health()
    assert len(runs) == 2
    assert HEALTH_CACHE_S == 5.0 and Settings().metrics.host == "127.0.0.1"
