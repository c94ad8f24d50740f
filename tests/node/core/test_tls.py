"""Specification of DICOM TLS: certificates made here with openssl, real DCMTK peers."""

from __future__ import annotations

import csv
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_tool
from tests.nodeproc import NODE_AET, SCU_AET, dcmtk_env, running_node, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test CA, and a certificate for the node and for the calling SCU (PEM files)."""
    openssl = require_tool("openssl", "openssl")
    folder = tmp_path_factory.mktemp("pki")
    files = {name: folder / name for name in ("ca.key", "ca.crt")}
    run_tool(
        openssl,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "2",
        "-subj",
        "/CN=mvi-node test CA",
        "-keyout",
        files["ca.key"],
        "-out",
        files["ca.crt"],
    )
    extensions = folder / "leaf.ext"
    extensions.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1\n"
    )
    for leaf in ("node", "scu"):
        key, csr, crt = folder / f"{leaf}.key", folder / f"{leaf}.csr", folder / f"{leaf}.crt"
        run_tool(
            openssl,
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-subj",
            f"/CN={leaf}",
            "-keyout",
            key,
            "-out",
            csr,
        )
        run_tool(
            openssl,
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            files["ca.crt"],
            "-CAkey",
            files["ca.key"],
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            extensions,
            "-out",
            crt,
        )
        files[f"{leaf}.key"], files[f"{leaf}.crt"] = key, crt
    return files


def tls_extra(pki: dict[str, Path], **peer: object) -> dict[str, object]:
    return {
        "security": {
            "tls_cert": str(pki["node.crt"]),
            "tls_key": str(pki["node.key"]),
            "tls_ca": str(pki["ca.crt"]),
            "require_client_cert": True,
        },
        **peer,
    }


def echoscu(port: int, *tls: str | Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("echoscu", "dcmtk")
    return run_tool(tool, *tls, "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", port, check=False)


def test_tls_echo_needs_a_client_certificate(tmp_path: Path, pki: dict[str, Path]) -> None:
    with running_node(tmp_path, tls_extra(pki)) as node:
        with_cert = echoscu(node.port, "+tls", pki["scu.key"], pki["scu.crt"], "+cf", pki["ca.crt"])
        assert with_cert.returncode == 0, with_cert.stderr
        anonymous = echoscu(node.port, "+tla", "+cf", pki["ca.crt"])
        assert anonymous.returncode != 0
        plain = echoscu(node.port)
        assert plain.returncode != 0
        assert node.process.poll() is None


def test_an_idle_connection_does_not_block_tls_callers(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    # The TLS handshake used to run in the accept loop without a timeout: one silent TCP
    # connection from anywhere made every TLS caller wait until it went away.
    extra = tls_extra(pki, node={"request_timeout_s": 60})
    with (
        running_node(tmp_path, extra) as node,
        socket.create_connection(("127.0.0.1", node.port)) as idle,
    ):
        tool = require_tool("echoscu", "dcmtk")
        command = [
            tool,
            "+tls",
            pki["scu.key"],
            pki["scu.crt"],
            "+cf",
            pki["ca.crt"],
            "-aet",
            SCU_AET,
            "-aec",
            NODE_AET,
            "127.0.0.1",
            str(node.port),
        ]
        try:
            echo = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the TLS caller waited behind an idle connection")
        assert echo.returncode == 0, echo.stderr
        idle.settimeout(0.2)
        with pytest.raises(TimeoutError):
            idle.recv(1)  # still open: the echo did not have to wait for it to go


def test_tls_store_of_a_study(
    tmp_path: Path, pki: dict[str, Path], cohort_factory: Callable[..., Path]
) -> None:
    cohort = cohort_factory(seed=61, size=48, slices=16)
    with (cohort / "truth.csv").open() as handle:
        row = next(csv.DictReader(handle))
    study = cohort / row["study_folder"]
    storescu = require_tool("storescu", "dcmtk")
    with running_node(tmp_path, tls_extra(pki)) as node:
        result = subprocess.run(
            [
                storescu,
                "+tls",
                str(pki["scu.key"]),
                str(pki["scu.crt"]),
                "+cf",
                str(pki["ca.crt"]),
                "-R",
                "-aet",
                SCU_AET,
                "-aec",
                NODE_AET,
                "+sd",
                "+r",
                "127.0.0.1",
                str(node.port),
                str(study),
            ],
            capture_output=True,
            text=True,
            env=dcmtk_env(),
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        expected = len(list(study.rglob("*.dcm")))
        wait_for(lambda: len(list(node.spool.rglob("*.dcm"))) == expected)
        assert '"tls": true' in node.log()


def test_echo_command_calls_a_tls_peer(tmp_path: Path, pki: dict[str, Path]) -> None:
    from tests.node.cli.test_main import mvi_node

    with tls_storescp(pki, tmp_path) as port:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[security]\ntls_cert = "{pki["node.crt"]}"\ntls_key = "{pki["node.key"]}"\n'
            f'tls_ca = "{pki["ca.crt"]}"\n'
            f'[peers.pacs]\nae_title = "TLS_PACS"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
            f'[peers.plain]\nae_title = "TLS_PACS"\nhost = "127.0.0.1"\nport = {port}\n'
        )
        secure = mvi_node("echo", "pacs", "--config", config)
        assert secure.returncode == 0, secure.stderr
        insecure = mvi_node("echo", "plain", "--config", config)
        assert insecure.returncode == 1


def fingerprint(certificate: Path) -> str:
    """``openssl x509 -fingerprint -sha256``, as an administrator copies it into the config."""
    openssl = require_tool("openssl", "openssl")
    out = run_tool(openssl, "x509", "-noout", "-fingerprint", "-sha256", "-in", certificate)
    return out.stdout.strip().split("=", 1)[1]  # AB:CD:…


def test_a_pinned_caller_must_present_exactly_its_certificate(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    scu_tls = ("+tls", pki["scu.key"], pki["scu.crt"], "+cf", pki["ca.crt"])
    for pin, accepted in ((pki["scu.crt"], True), (pki["node.crt"], False)):
        peer = {"ae_title": SCU_AET, "host": "127.0.0.1", "tls_fingerprint": fingerprint(pin)}
        with running_node(tmp_path / pin.stem, tls_extra(pki, peers={"scu": peer})) as node:
            # The CA signed both certificates: only the pin tells them apart.
            echo = echoscu(node.port, *scu_tls)
            assert (echo.returncode == 0) is accepted, echo.stderr
            assert ("not the one pinned for its AE title" in node.log()) is not accepted


def test_a_called_peer_must_be_named_by_its_certificate_and_match_its_pin(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    from tests.node.cli.test_main import mvi_node

    # storescp presents scu.crt: signed by the CA, naming IP 127.0.0.1 only.
    right, wrong = fingerprint(pki["scu.crt"]), fingerprint(pki["node.crt"])
    peers = {
        "by_address": ("127.0.0.1", "", True),
        "by_other_name": ("localhost", "", False),
        "by_other_name_unchecked": ("localhost", "tls_check_hostname = false\n", True),
        "pinned": ("127.0.0.1", f'tls_fingerprint = "{right}"\n', True),
        "pinned_to_another": ("127.0.0.1", f'tls_fingerprint = "{wrong}"\n', False),
    }
    with tls_storescp(pki, tmp_path) as port:
        config = tmp_path / "node.toml"
        config.write_text(
            f'[security]\ntls_cert = "{pki["node.crt"]}"\ntls_key = "{pki["node.key"]}"\n'
            f'tls_ca = "{pki["ca.crt"]}"\n'
            + "".join(
                f'[peers.{name}]\nae_title = "TLS_PACS"\nhost = "{host}"\nport = {port}\n'
                f"tls = true\n{more}"
                for name, (host, more, _) in peers.items()
            )
        )
        outcomes = {name: mvi_node("echo", name, "--config", config) for name in peers}
        assert {name: done.returncode == 0 for name, done in outcomes.items()} == {
            name: ok for name, (_, _, ok) in peers.items()
        }, {name: done.stderr[-300:] for name, done in outcomes.items()}


def echoscu_ready(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_unreadable_certificate_is_a_one_line_error(tmp_path: Path) -> None:
    from tests.node.cli.test_main import mvi_node

    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nport = 11999\ndata_dir = "{tmp_path / "data"}"\n'
        f'[security]\ntls_cert = "{tmp_path / "missing.crt"}"\n'
        f'tls_key = "{tmp_path / "missing.key"}"\n'
        "require_client_cert = false\n"
    )
    result = mvi_node("serve", "--config", config)
    assert result.returncode == 2
    assert "cannot load the node's certificate and key" in result.stderr


def test_the_dispatcher_delivers_results_over_tls(
    tmp_path: Path, pki: dict[str, Path], cohort_factory: Callable[..., Path]
) -> None:
    from node.deliver.outbox import enqueue, list_outbox
    from tests.node.deliver.test_outbox import as_result, make_job, result_of

    cohort = cohort_factory(seed=81, size=48, slices=16, seg=True)
    row, seg, _ = result_of(cohort)
    received = tmp_path / "received"
    received.mkdir()
    with tls_storescp(pki, received) as port:
        peers = {
            "scu": {"ae_title": SCU_AET, "host": "127.0.0.1"},
            "pacs": {"ae_title": "TLS_PACS", "host": "127.0.0.1", "port": port, "tls": True},
        }
        extra = tls_extra(pki, peers=peers, results={"destinations": ["pacs"]})
        with running_node(tmp_path / "node", extra) as node:
            store = node.store()
            job_id = make_job(store, row["study_instance_uid"])
            enqueue(store, job_id, row["study_instance_uid"], [as_result(seg)], ["pacs"])
            wait_for(lambda: list_outbox(store, include_sent=True)[0].state == "sent")
            store.close()
    assert len(list(received.iterdir())) == 1


@contextmanager
def tls_storescp(pki: dict[str, Path], folder: Path) -> Iterator[int]:
    """DCMTK storescp over TLS (AE TLS_PACS) on a free port, writing into ``folder``."""
    from tests.orthanc import free_port

    storescp = require_tool("storescp", "dcmtk")
    port = free_port()
    scp = subprocess.Popen(
        [
            storescp,
            "+tls",
            str(pki["scu.key"]),
            str(pki["scu.crt"]),
            "+cf",
            str(pki["ca.crt"]),
            "-aet",
            "TLS_PACS",
            "-od",
            str(folder),
            str(port),
        ],
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: echoscu_ready(port))
        yield port
    finally:
        scp.terminate()
        scp.wait(10)
