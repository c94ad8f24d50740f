"""Run a real `mvi-node serve` process on a free loopback port, as an administrator would."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.core.settings import Settings, load_settings, redacted_dict, to_toml
from node.store.database import Store
from tests.orthanc import free_port

NODE_AET = "MVI_NODE"
SCU_AET = "STORESCU"


def children(pid: int, name: str | None = None) -> set[int]:
    """Direct child processes of ``pid`` (from /proc), only those called ``name`` when given."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() != str(pid):
            continue
        if name is None or fields.get("Name", "").strip() == name:
            found.add(int(entry.name))
    return found


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {predicate}")
        time.sleep(every)


def mvi_node_script() -> str:
    """The installed console script next to this interpreter."""
    return shutil.which("mvi-node", path=str(Path(sys.executable).parent)) or "mvi-node"


@dataclass
class NodeProcess:
    """A node started by a test."""

    settings: Settings
    config_path: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def port(self) -> int:
        """The DICOM port."""
        return self.settings.node.port

    @property
    def spool(self) -> Path:
        """The spool folder."""
        return self.settings.node.data_dir / "spool"

    def store(self) -> Store:
        """A store on the node's database (the test is a second process, as a worker is)."""
        return Store(self.settings.database_url)

    def log(self) -> str:
        """Everything the node logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no clean-up at all."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not stop."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


_MODELS: dict[str, str] = {}


def tiny_models() -> dict[str, str]:
    """Tiny segmenter and MVI model for nodes started by tests (built once per session).

    Trained for seconds on a few small phantoms: good enough to run every stage of a job (the
    numbers are meaningless), so receive, result and delivery tests run the real pipeline.
    """
    if _MODELS:
        return _MODELS
    import tempfile

    from model.phantom import PhantomSpec
    from model.roi import RoiSpec
    from model.train import rois_from_phantom, train_fusion
    from model.train_seg import train_segmenter
    from node.offline.phantom_study import study_seed
    from node.offline.train_seg import phantom_samples

    root = Path(tempfile.mkdtemp(prefix="mvi-test-models-"))
    # Nodes started by tests read them until the session ends; 170 MB a session otherwise.
    atexit.register(shutil.rmtree, root, True)
    samples, _ = phantom_samples(3, seed=1, size=64, slices=16, spacing_mm=4.0)
    train_segmenter(samples, root / "segmenter", spacing_mm=4.0, iterations=20, patch=(32, 32, 16))
    spec = RoiSpec(size=32)
    rois = [
        rois_from_phantom(
            study_seed(2, i), PhantomSpec(size=64, slices=16), spec, register_pv=False
        )
        for i in range(16)
    ]
    train_fusion(rois, root / "fusion", roi_spec=spec, folds=2, epochs=2, batch_size=8, demo=True)
    _MODELS.update(segmenter_dir=str(root / "segmenter"), model_dir=str(root / "fusion"))
    return _MODELS


def node_settings(
    data_dir: Path, port: int | None = None, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A test node's configuration: loopback, fast timers, the test's SCU as a peer.

    The quality gates are off: the tiny models' masks are meaningless (see :func:`tiny_models`)
    and these nodes test receiving, jobs and delivery; the gates have their own tests
    (tests/node/analysis/test_gates.py and the gate tests of test_pipeline.py).
    """
    data: dict[str, Any] = {
        "node": {
            "ae_title": NODE_AET,
            "host": "127.0.0.1",
            "port": port or free_port(),
            "data_dir": str(data_dir),
            "log_level": "info",
            "free_disk_floor_mb": 1,
            # One receiving process: the tests read counters and logs as one process writes
            # them; several processes have their own tests (tests/node/receive/test_processes.py).
            "receive_processes": 1,
        },
        "peers": {"scu": {"ae_title": SCU_AET, "host": "127.0.0.1"}},
        "completion": {"quiet_seconds": 1.0},
        # The pre-flight's model load has its own tests; here it would add seconds to each start.
        "pipeline": {"workers": 1, "device": "cpu", "load_models_at_start": False, **tiny_models()},
        "gates": {"enabled": False},
        # The console has its own tests (tests/node/web); two test nodes would want one port.
        "web": {"enabled": False},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, Mapping) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **values}
        else:
            data[section] = values
    return data


@contextmanager
def running_node(
    workdir: Path, extra: Mapping[str, Any] | None = None, port: int | None = None
) -> Iterator[NodeProcess]:
    """Start `mvi-node serve` with a fresh configuration under ``workdir``; stop it after."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "node.toml"
    if not config.exists():
        config.write_text(to_toml(node_settings(workdir / "data", port, extra)))
    node = start_node_process(config, workdir / "node.log")
    try:
        yield node
    finally:
        node.stop()


def start_node_process(config: Path, log_path: Path) -> NodeProcess:
    """Start the node on an existing configuration file and wait until it answers."""
    settings = load_settings(config)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
    env["PYTHONUNBUFFERED"] = "1"
    handle = log_path.open("ab")
    process = subprocess.Popen(
        [mvi_node_script(), "serve", "--config", str(config)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=env,
    )
    node = NodeProcess(settings, config, process, log_path)

    def listening() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"the node exited with {process.returncode}:\n{node.log()}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", settings.node.port)) == 0

    wait_for(listening, timeout=60)
    return node


def storescu_command(port: int, *paths: Path, propose: str = "-x=") -> list[str]:
    """DCMTK storescu of files or folders (recursively) to the test node, as the test's SCU.

    ``-R`` proposes exactly the SOP classes of the files (SEG is not in storescu's default
    list); ``propose`` is the transfer syntax offered besides the uncompressed ones.
    """
    from tests.conftest import require_tool

    tool = require_tool("storescu", "dcmtk")
    return [
        tool,
        "-v",
        "-R",
        propose,
        "-aet",
        SCU_AET,
        "-aec",
        NODE_AET,
        "+sd",
        "+r",
        "-nh",
        "127.0.0.1",
        str(port),
        *map(str, paths),
    ]


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: without TCP_NODELAY they wait on Nagle's algorithm."""
    return {**os.environ, "TCP_NODELAY": "1"}


def settings_text(settings: Settings) -> str:
    """The configuration as TOML (for a test that edits and restarts)."""
    return to_toml(redacted_dict(settings))
