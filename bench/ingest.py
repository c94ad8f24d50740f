"""Ingest throughput: the node against DCMTK storescp and a bare pynetdicom handler, and the
node's STOW-RS receiver beside its C-STORE.

The same phantom study is sent by the same DCMTK ``storescu -pdu 131072`` to three receivers on
loopback, alternating, for several rounds:

- the node (``mvi-node serve``: durable spool with fsync, SQLite row per instance);
- DCMTK ``storescp -pdu 131072`` (the reference: what a C++ SCP does);
- a bare pynetdicom handler that only writes the encoded bytes (no fsync, no database): what
  pynetdicom itself costs;

and, by curl, to the node's STOW-RS receiver (``[dicomweb]``): the same files as
``multipart/related; type="application/dicom"`` bodies of :data:`STOW_BATCH` instances each,
written before the clock starts (curl, like storescu, is C: the figure is the receiver's).

Every DCMTK process runs with ``TCP_NODELAY=1`` (without it DCMTK waits on Nagle's algorithm).
Each round starts each receiver on an empty folder, so no duplicate shortcut is taken. Prints
instances/s and MB/s per receiver, the median ratios node/storescp and node/bare, and the node's
peak RSS.

Usage: python bench/ingest.py [--size 512] [--slices 200] [--rounds 5]
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

#: Instances per STOW-RS request.
STOW_BATCH = 40
STOW_TOKEN = "bench-stow-token-0123456789abcdef"
BOUNDARY = "mvi-bench-boundary"

BARE_SCP = """
import sys
from pathlib import Path
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1,
    JPEGLSLossless, JPEG2000Lossless, RLELossless, DeflatedExplicitVRLittleEndian)
out = Path(sys.argv[2])
count = 0
def handle(event):
    global count
    count += 1
    (out / f"{count:06d}.dcm").write_bytes(event.encoded_dataset())
    return 0
ae = AE(ae_title="BARE")
ae.maximum_pdu_size = 0
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
        ["storescp", "-pdu", "131072", "-aet", "STORESCP", "-od", str(folder), str(port)],
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
                "curl",
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


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def send(port: int, aet: str, study: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            "storescu",
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
        ],
        env=dcmtk_env(),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for tool, package in (("storescu", "dcmtk"), ("storescp", "dcmtk"), ("curl", "curl")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install {package}")
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
                "--seed",
                "3",
            ],
            check=True,
            capture_output=True,
        )
        study = cohort / "study_0001"
        files = list(study.rglob("*.dcm"))
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(
            f"study: {len(files)} instances, {megabytes:.0f} MB ({args.size}x{args.size}, "
            f"{args.slices} slices per phase)"
        )
        bodies_folder = root / "stow-bodies"
        bodies_folder.mkdir()
        bodies = stow_bodies(sorted(files), bodies_folder)
        receivers: dict[str, Receiver] = {
            "node": node,
            "storescp": storescp,
            "bare pynetdicom": bare,
            "node STOW-RS": node_stow,
        }
        times: dict[str, list[float]] = {name: [] for name in receivers}
        node_rss: list[float] = []
        for round_ in range(args.rounds):
            for name, receiver in receivers.items():
                folder = root / f"{name.replace(' ', '_')}-{round_}"
                folder.mkdir()
                with receiver(folder) as (port, aet, process):
                    if name == "node STOW-RS":
                        times[name].append(send_stow(port, bodies))
                    else:
                        times[name].append(send(port, aet, study))
                    if name == "node":
                        node_rss.append(peak_rss_mb(process.pid))
                shutil.rmtree(folder, ignore_errors=True)
        for name, values in times.items():
            median = statistics.median(values)
            print(
                f"{name:16s} median {median:6.2f} s  {len(files) / median:7.1f} instances/s  "
                f"{megabytes / median:7.1f} MB/s"
            )
        node_median = statistics.median(times["node"])
        versus_storescp = statistics.median(times["storescp"]) / node_median
        versus_bare = statistics.median(times["bare pynetdicom"]) / node_median
        print(f"node / storescp speed:        {versus_storescp:.2f}x")
        print(f"node / bare pynetdicom speed: {versus_bare:.2f}x")
        versus_dimse = node_median / statistics.median(times["node STOW-RS"])
        print(f"node STOW-RS / node C-STORE speed: {versus_dimse:.2f}x ({STOW_BATCH} per request)")
        print(f"node peak RSS: {max(node_rss):.0f} MB")


if __name__ == "__main__":
    main()
