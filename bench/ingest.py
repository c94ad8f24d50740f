"""Ingest throughput: the node against Orthanc, DCMTK storescp and a bare pynetdicom handler, for
one association and for eight at once, and the node's STOW-RS receiver beside its C-STORE.

The same phantom studies are sent by DCMTK ``storescu -pdu 131072`` to each receiver on loopback,
alternating, for several rounds:

- the node (``mvi-node serve``: every instance fdatasynced and its row committed before the
  response);
- Orthanc (the Debian package: its SQLite index, ``SyncStorageArea`` on, no compression) — the
  archive a site compares the node with;
- DCMTK ``storescp -pdu 131072`` (what a C++ SCP does, no fsync);
- a bare pynetdicom handler that only writes the encoded bytes (no fsync, no database): what
  pynetdicom itself costs, the ceiling of a pynetdicom front door;

each first with one association (study 1), then with :data:`CONCURRENT` associations at once
(storescu processes started together, each sending its own study), and, by curl, to the node's
STOW-RS receiver (``[dicomweb]``): the same files as ``multipart/related;
type="application/dicom"`` bodies of :data:`STOW_BATCH` instances each, written before the clock
starts (curl, like storescu, is C: the figure is the receiver's).

Every DCMTK process runs with ``TCP_NODELAY=1`` (without it DCMTK waits on Nagle's algorithm).
Each round starts each receiver on an empty folder, so no duplicate shortcut is taken. Prints
instances/s and MB/s per receiver and case, the median ratios node/bare, node/Orthanc and
node/storescp for one association and for eight, the node's eight-association total against its
own one-association rate, and the node's peak RSS.

Usage: python bench/ingest.py [--size 512] [--slices 200] [--rounds 5] [--concurrent 8]
       [--receivers node,orthanc,storescp,bare,stow]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

Receiver = Callable[[Path], AbstractContextManager[tuple[int, str, "subprocess.Popen[bytes]"]]]

#: ``node.receive_processes`` of the node under test (``--node-processes``).
RECEIVE_PROCESSES: list[str] = ['"auto"']

#: DCMTK's storescu and storescp and curl, as found by :func:`main`: never the virtualenv's
#: pynetdicom look-alikes an activated virtualenv puts first on PATH.
TOOLS: dict[str, str] = {}

#: Associations at once in the concurrent case (each sends its own study).
CONCURRENT = 8

#: Instances per STOW-RS request.
STOW_BATCH = 40
STOW_TOKEN = "bench-stow-token-0123456789abcdef"
BOUNDARY = "mvi-bench-boundary"

BARE_SCP = """
import itertools
import sys
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1,
    JPEGLSLossless, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian)
out = Path(sys.argv[2])
numbers = itertools.count(1)  # next() is atomic: associations run in threads
def handle(event):
    (out / f"{next(numbers):06d}.dcm").write_bytes(event.encoded_dataset())
    return 0
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = 0
ae.maximum_associations = 16
syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless]
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, syntaxes)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, handle)])
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"receiver exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@contextmanager
def storescp(folder: Path) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        # --fork: one process per association, so eight associations are served at once.
        [
            TOOLS["storescp"],
            "--fork",
            "-pdu",
            "131072",
            "-aet",
            "STORESCP",
            "-od",
            str(folder),
            str(port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield port, "STORESCP", process
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def bare(folder: Path) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", BARE_SCP, str(port), str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        yield port, "BARE", process
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def orthanc(folder: Path) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    """Orthanc as a site runs it: SQLite index, every file synced, stored uncompressed."""
    from tests.orthanc import running_orthanc

    extra = {"SyncStorageArea": True, "StorageCompression": False, "DicomThreadsCount": 8}
    with running_orthanc(folder / "orthanc", aet="ORTHANC", extra=extra) as server:
        yield server.dicom_port, server.aet, server.process


@contextmanager
def node(folder: Path, stow: bool = False) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    """The node; with ``stow`` it yields its STOW-RS port instead of its DICOM port."""
    port = free_port()
    http_port = free_port()
    config = folder / "node.toml"
    stow_section = (
        f"""
[dicomweb]
enabled = true
port = {http_port}

[peers.modality]
dicomweb_url = "https://modality.example"
stow_token = "{STOW_TOKEN}"
"""
        if stow
        else ""
    )
    config.write_text(
        f"""[node]
ae_title = "MVI_NODE"
host = "127.0.0.1"
port = {port}
data_dir = "{folder / "data"}"
log_level = "warning"
free_disk_floor_mb = 1
max_associations = 16
max_associations_per_host = 16
receive_processes = {RECEIVE_PROCESSES[0]}

[peers.bench]
ae_title = "STORESCU"
host = "127.0.0.1"

[completion]
# Long enough that no job competes with the next round for the CPU.
quiet_seconds = 3600.0

[web]
enabled = false
{stow_section}"""
    )
    script = Path(sys.executable).parent / "mvi-node"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVI_")}
    process = subprocess.Popen(
        [str(script), "serve", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port, process)
        if stow:
            wait_listening(http_port, process)
        yield (http_port if stow else port), "MVI_NODE", process
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def node_stow(folder: Path) -> Iterator[tuple[int, str, subprocess.Popen[bytes]]]:
    with node(folder, stow=True) as started:
        yield started


def stow_bodies(files: list[Path], folder: Path) -> list[Path]:
    """The study as multipart/related bodies of :data:`STOW_BATCH` instances each."""
    bodies = []
    for start in range(0, len(files), STOW_BATCH):
        body = folder / f"body-{start:05d}.bin"
        with body.open("wb") as out:
            for path in files[start : start + STOW_BATCH]:
                out.write(f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode())
                out.write(path.read_bytes())
                out.write(b"\r\n")
            out.write(f"--{BOUNDARY}--\r\n".encode())
        bodies.append(body)
    return bodies


def send_stow(port: int, bodies: list[Path]) -> float:
    started = time.perf_counter()
    for body in bodies:
        done = subprocess.run(
            [
                TOOLS["curl"],
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}',
                "-H",
                f"Authorization: Bearer {STOW_TOKEN}",
                "--data-binary",
                f"@{body}",
                f"http://127.0.0.1:{port}/dicom-web/studies",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        if done.stdout != "200":
            sys.exit(f"STOW-RS answered HTTP {done.stdout}")
    return time.perf_counter() - started


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants (Linux /proc)."""
    total, pending, ticks = 0.0, [pid], os.sysconf("SC_CLK_TCK")
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
        pending.extend(int(child) for child in children)
    return total


def wait_idle(pid: int, timeout: float = 60.0) -> None:
    """Until a receiver and its processes (the node's workers importing torch, its further
    receiving processes starting) use under 5 % of a core: the clock measures receiving only."""
    deadline = time.monotonic() + timeout
    before = _tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        after = _tree_cpu_s(pid)
        if after - before < 0.025:
            return
        before = after


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def storescu(port: int, aet: str, study: Path) -> list[str]:
    """The DCMTK command that sends every file under ``study`` over one association."""
    return [
        TOOLS["storescu"],
        "-R",
        "-pdu",
        "131072",
        "-aet",
        "STORESCU",
        "-aec",
        aet,
        "+sd",
        "+r",
        "127.0.0.1",
        str(port),
        str(study),
    ]


def send(port: int, aet: str, studies: list[Path]) -> float:
    """Seconds until every study has been sent, each over its own association, all at once."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            storescu(port, aet, study),
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for study in studies
    ]
    codes = [sender.wait() for sender in senders]
    elapsed = time.perf_counter() - started
    if any(codes):
        sys.exit(f"storescu exited with {codes} sending to {aet}")
    return elapsed


def ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> str:
    """How many times faster ``numerator`` is than ``denominator`` (medians), or a dash."""
    if not times.get(numerator) or not times.get(denominator):
        return "–"
    return f"{statistics.median(times[denominator]) / statistics.median(times[numerator]):.2f}×"


RECEIVERS: dict[str, Receiver] = {
    "node": node,
    "orthanc": orthanc,
    "storescp": storescp,
    "bare": bare,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=CONCURRENT, help="0: no such case.")
    parser.add_argument("--receivers", default="node,orthanc,storescp,bare,stow")
    parser.add_argument("--node-processes", default="auto", help="node.receive_processes")
    args = parser.parse_args()
    if args.node_processes != "auto":
        RECEIVE_PROCESSES[0] = str(int(args.node_processes))
    chosen = [name.strip() for name in args.receivers.split(",") if name.strip()]
    unknown = sorted(set(chosen) - {*RECEIVERS, "stow"})
    if unknown:
        sys.exit(f"unknown receivers {unknown}: choose from {sorted({*RECEIVERS, 'stow'})}")
    from tests.conftest import find_tool

    for tool, package in (("storescu", "dcmtk"), ("storescp", "dcmtk"), ("curl", "curl")):
        found = find_tool(tool)
        if found is None:
            sys.exit(f"{tool} not found: apt-get install {package}")
        TOOLS[tool] = found
    with tempfile.TemporaryDirectory(prefix="mvi-ingest-") as tmp:
        root = Path(tmp)
        cohort = root / "cohort"
        subprocess.run(
            [
                str(Path(sys.executable).parent / "mvi-node"),
                "phantom",
                str(cohort),
                "--size",
                str(args.size),
                "--slices",
                str(args.slices),
                "--studies",
                str(max(1, args.concurrent)),
                "--seed",
                "3",
            ],
            check=True,
            capture_output=True,
        )
        studies = sorted(p for p in cohort.iterdir() if p.is_dir())
        counted = {s: list(s.rglob("*.dcm")) for s in studies}
        one = studies[:1]
        many = studies[: args.concurrent]
        instances = {"one": len(counted[one[0]]), "many": sum(len(counted[s]) for s in many)}
        megabytes = {
            "one": sum(p.stat().st_size for p in counted[one[0]]) / 1e6,
            "many": sum(p.stat().st_size for s in many for p in counted[s]) / 1e6,
        }
        print(
            f"study: {instances['one']} instances, {megabytes['one']:.0f} MB ({args.size}x"
            f"{args.size}, {args.slices} slices per phase); concurrent case: {len(many)} "
            f"studies, {instances['many']} instances, {megabytes['many']:.0f} MB",
            flush=True,
        )
        bodies: list[Path] = []
        if "stow" in chosen:
            bodies_folder = root / "stow-bodies"
            bodies_folder.mkdir()
            bodies = stow_bodies(sorted(counted[one[0]]), bodies_folder)
        cases = [("one", one)] + ([("many", many)] if args.concurrent > 0 else [])
        times: dict[str, list[float]] = {}
        node_rss: list[float] = []
        for round_ in range(args.rounds):
            for name in chosen:
                for case, sent in cases if name != "stow" else [("one", one)]:
                    folder = root / f"{name}-{case}-{round_}"
                    folder.mkdir()
                    receiver = node_stow if name == "stow" else RECEIVERS[name]
                    # What the last receiver left unwritten (storescp and the bare handler do not
                    # fsync) would otherwise be written back during this one's fsyncs.
                    os.sync()
                    with receiver(folder) as (port, aet, process):
                        wait_idle(process.pid)
                        if name == "stow":
                            elapsed = send_stow(port, bodies)
                        else:
                            elapsed = send(port, aet, sent)
                        if name == "node":
                            node_rss.append(peak_rss_mb(process.pid))
                    times.setdefault(f"{name} {case}", []).append(elapsed)
                    shutil.rmtree(folder, ignore_errors=True)
            print(f"round {round_ + 1} of {args.rounds} done", flush=True)
        labels = {"one": "1 association", "many": f"{args.concurrent} associations"}
        print()
        print("| receiver | case | median | instances/s | MB/s |")
        print("|---|---|---|---|---|")
        for key, values in times.items():
            name, case = key.rsplit(" ", 1)
            median = statistics.median(values)
            shown = "node STOW-RS (curl)" if name == "stow" else name
            print(
                f"| {shown} | {labels[case]} | {median:.2f} s | "
                f"{instances[case] / median:,.0f} | {megabytes[case] / median:,.0f} |"
            )
        print()
        for case in ("one", "many"):
            if f"node {case}" not in times:
                continue
            print(
                f"{labels[case]}: node/bare {ratio(times, f'node {case}', f'bare {case}')}, "
                f"node/Orthanc {ratio(times, f'node {case}', f'orthanc {case}')}, "
                f"node/storescp {ratio(times, f'node {case}', f'storescp {case}')}"
            )
        if "node one" in times and "node many" in times:
            rate_one = instances["one"] / statistics.median(times["node one"])
            rate_many = instances["many"] / statistics.median(times["node many"])
            print(
                f"node, {args.concurrent} associations against one: {rate_many / rate_one:.2f}× "
                f"({rate_many:,.0f} against {rate_one:,.0f} instances/s)"
            )
        if "stow one" in times and "node one" in times:
            print(
                f"node STOW-RS / node C-STORE speed: {ratio(times, 'stow one', 'node one')} "
                f"({STOW_BATCH} per request)"
            )
        if node_rss:
            print(f"node peak RSS: {max(node_rss):.0f} MB")


if __name__ == "__main__":
    main()
