"""Specification of the pre-flight: what the first patient would hit, found before serving."""

from __future__ import annotations

import socket
from pathlib import Path

from node.core.settings import to_toml
from tests.node.cli.test_main import mvi_node
from tests.nodeproc import tiny_models
from tests.orthanc import free_port


def broken_config(tmp_path: Path, console_port: int | None = None) -> Path:
    """Six mistakes that pass `config check`, a PACS that is switched off and (when given) a
    console port another program holds."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {
                    "data_dir": str(blocker / "data"),
                    "port": free_port(),
                    "log_file": str(tmp_path / "no-such-folder" / "node.log"),
                },
                "security": {
                    "tls_cert": str(tmp_path / "missing.crt"),
                    "tls_key": str(tmp_path / "missing.key"),
                },
                "peers": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
                "pipeline": {"model_dir": str(tmp_path / "nonexistent"), "device": "cpu"},
                "web": {
                    "port": console_port or free_port(),
                    "tls_cert": str(tmp_path / "console.crt"),
                    "tls_key": str(tmp_path / "console.key"),
                },
            }
        )
    )
    return config


def test_config_check_deep_names_every_problem(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = broken_config(tmp_path, console_port=taken.getsockname()[1])
        assert mvi_node("config", "check", str(config)).returncode == 0, "the keys are fine"
        deep = mvi_node("config", "check", str(config), "--deep")
    assert deep.returncode == 2, deep.stderr
    lines = deep.stdout.split("# pre-flight", 1)[1].strip().splitlines()
    found = {line.split(":", 1)[0].split(None, 1)[1]: line.split(None, 1)[0] for line in lines}
    assert found["data folder"] == "FAILED"
    assert found["TLS (server)"] == "FAILED"
    assert found["pipeline.model_dir"] == "FAILED"
    assert found["log file"] == "FAILED"
    assert found["peers.pacs"] == "warning", "a silent PACS is reported, not fatal"
    assert found["console HTTPS"] == "FAILED"
    assert found["console port"] == "warning", "the node receives without its console"
    assert any("missing.crt" in line for line in lines)


def test_serve_refuses_to_start_with_one_line_per_fatal_problem(tmp_path: Path) -> None:
    config = broken_config(tmp_path)
    refused = mvi_node("serve", "--config", config)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith("mvi-node: FAILED") for line in lines), lines
    assert not (tmp_path / "a-file" / "data").exists()


def test_a_device_that_is_not_there_stops_serve(tmp_path: Path) -> None:
    import torch

    device = "cuda:63" if torch.cuda.is_available() else "cuda"
    config = tmp_path / "node.toml"
    port = free_port()
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data"), "port": port, "host": "127.0.0.1"},
                "pipeline": {**tiny_models(), "device": device},
            }
        )
    )
    refused = mvi_node("serve", "--config", config)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("mvi-node: FAILED  device: pipeline.device = ")
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "nothing listens"


def test_config_check_deep_of_a_good_configuration(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        to_toml(
            {
                "node": {"data_dir": str(tmp_path / "data"), "free_disk_floor_mb": 1},
                "pipeline": {**tiny_models(), "device": "cpu"},
                "web": {"port": free_port()},
            }
        )
    )
    deep = mvi_node("config", "check", str(config), "--deep")
    assert deep.returncode == 0, deep.stdout
    lines = deep.stdout.split("# pre-flight", 1)[1].strip().splitlines()
    names = [line.split(":", 1)[0].split(None, 1)[1] for line in lines]
    assert names == [
        "data folder",
        "pipeline.segmenter_dir",
        "pipeline.model_dir",
        "console port",
        "device",
        "segmenter",
        "MVI model",
    ]
    assert all(line.startswith("ok") for line in lines)
