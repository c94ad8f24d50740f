"""Specification of the node's configuration: defaults, file, environment, and bad keys."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from node.core.settings import (
    REDACTED,
    ConfigError,
    Settings,
    load_settings,
    redacted_dict,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[3]
NODE_TOML = ROOT / "config" / "node.toml"
SITE_TOML = ROOT / "config" / "example-site.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("MVI_"):
            monkeypatch.delenv(name)


def _keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_documented_defaults_equal_the_schema_defaults() -> None:
    assert load_settings(NODE_TOML) == Settings()


def test_every_schema_key_is_documented_in_node_toml() -> None:
    documented = _keys(tomllib.loads(NODE_TOML.read_text()))
    schema = _keys(Settings().model_dump(mode="json"))
    assert documented == schema


def test_example_site_configuration_is_valid() -> None:
    settings = load_settings(SITE_TOML)
    assert settings.peers["pacs"].tls is True
    assert settings.results.destinations == ["pacs"]
    assert settings.pipeline.device == "cuda"
    assert settings.security.tls_cert == Path("/etc/mvi-node/tls/node.crt")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[node]\nport = 4242\n[peers.pacs]\nae_title = "PACS"\n')
    monkeypatch.setenv("MVI_NODE__PORT", "5555")
    monkeypatch.setenv("MVI_PEERS__PACS__HOST", "127.0.0.1")
    settings = load_settings(path)
    assert settings.node.port == 5555
    assert settings.peers["pacs"].ae_title == "PACS"
    assert settings.peers["pacs"].host == "127.0.0.1"


def test_mvi_config_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[node]\nae_title = "FROM_ENV_FILE"\n')
    monkeypatch.setenv("MVI_CONFIG", str(path))
    assert load_settings().node.ae_title == "FROM_ENV_FILE"


def test_empty_string_leaves_an_optional_key_unset(tmp_path: Path) -> None:
    text = '[pipeline]\nrisk_threshold = ""\nmodel_dir = ""\n[metrics]\nport = ""\n'
    path = write(tmp_path, text)
    settings = load_settings(path)
    assert settings.pipeline.risk_threshold is None
    assert settings.pipeline.model_dir is None
    assert settings.metrics.port is None


def test_data_dir_expands_the_home_directory() -> None:
    assert "~" not in str(Settings().node.data_dir)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


def test_the_uncertainty_limits_are_the_cards_unless_set_and_then_within_0_and_1(
    tmp_path: Path,
) -> None:
    text = '[gates]\nuncertainty_limit = ""\ntumor_uncertainty_limit = ""\n'
    gates = load_settings(write(tmp_path, text)).gates
    assert gates.uncertainty_limit is None and gates.tumor_uncertainty_limit is None
    gates = load_settings(write(tmp_path, "[gates]\ntumor_uncertainty_limit = 0.25\n")).gates
    assert gates.tumor_uncertainty_limit == 0.25
    for bad in ("0", "1.5", "-0.1"):
        (line,) = problems(tmp_path, f"[gates]\ntumor_uncertainty_limit = {bad}\n")
        assert line.startswith(f"gates.tumor_uncertainty_limit = {bad}:"), line


def test_a_typo_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "[node]\nprot = 104\n")
    assert line.startswith("node.prot = 104: unknown key")


def test_an_unknown_section_is_an_error(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "[nodes]\nport = 104\n")
    assert line.startswith("nodes = ")
    assert "unknown key" in line


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    lines = problems(
        tmp_path,
        """
[node]
port = 70000
max_associations = "many"
ae_title = "A_TITLE_MUCH_TOO_LONG"
[completion]
quiet_seconds = -1
[results]
destinations = ["archive"]
formats = ["seg", "pdf"]
""",
    )
    text = "\n".join(lines)
    assert "node.port = 70000" in text
    assert "node.max_associations = 'many'" in text
    assert "node.ae_title" in text and "16 characters" in text
    assert "completion.quiet_seconds = -1" in text
    assert "results.formats.1 = 'pdf'" in text
    assert "results.destinations[0] = 'archive': no [peers.archive] section" in text
    assert len(lines) == 6


def test_a_destination_needs_an_address(tmp_path: Path) -> None:
    (line,) = problems(
        tmp_path, '[peers.pacs]\nae_title = "PACS"\n[results]\ndestinations = ["pacs"]\n'
    )
    assert "needs host and port" in line


def test_a_requery_peer_must_exist(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[requery]\npeer = "nowhere"\n')
    assert line.startswith("requery.peer = 'nowhere'")


def test_bad_regular_expression_and_cron(tmp_path: Path) -> None:
    lines = problems(tmp_path, '[phases]\narterial = ["art("]\n[requery]\nschedule = "every day"\n')
    assert any(line.startswith("phases.arterial") and "does not compile" in line for line in lines)
    assert any(line.startswith("requery.schedule") for line in lines)


def test_tls_needs_certificate_and_key(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[security]\ntls_cert = "/etc/node.crt"\n')
    assert line.startswith("security.tls_key")


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, "[node\nport = 1\n")
    assert "node.toml" in line and "not valid TOML" in line


def test_a_bad_environment_variable_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVI_NODE__PORT", "not-a-port")
    (line,) = problems(tmp_path, "")
    assert "MVI_NODE__PORT" in line


KEY = "hunter2-" + "x" * 32


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://mvi:s3cret@db/mvi", f"mvi:{REDACTED}@db/mvi"),
        (
            "postgresql+psycopg://mvi@db/mvi?sslmode=require&password=s3cret",
            f"mvi@db/mvi?sslmode=require&password={REDACTED}",
        ),
    ],
)
def test_secrets_are_redacted(tmp_path: Path, url: str, shown: str) -> None:
    path = write(tmp_path, f'[security]\npseudonym_key = "{KEY}"\n[database]\nurl = "{url}"\n')
    settings = load_settings(path)
    text = to_toml(redacted_dict(settings))
    assert "hunter2" not in text and "s3cret" not in text
    assert f'pseudonym_key = "{REDACTED}"' in text
    assert shown in text
    assert settings.security.pseudonym_key.get_secret_value() == KEY


def test_a_short_pseudonym_key_is_refused_without_being_printed(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[security]\npseudonym_key = "hunter2"\n')
    assert "security.pseudonym_key" in line and "at least 32 bytes, got 7" in line
    assert "hunter2" not in line


def test_printed_configuration_reads_back_identically(tmp_path: Path) -> None:
    settings = load_settings(SITE_TOML)
    again = load_settings(write(tmp_path, to_toml(redacted_dict(settings))))
    assert again == settings


def test_a_certificate_pin_must_be_a_sha256_fingerprint(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[peers.pacs]\nae_title = "PACS"\ntls_fingerprint = "AB:CD"\n')
    assert line.startswith("peers.pacs.tls_fingerprint") and "64 hex digits" in line
    pin = ":".join(["0A"] * 32)
    path = write(tmp_path, f'[peers.pacs]\nae_title = "PACS"\ntls_fingerprint = "{pin}"\n')
    assert load_settings(path).peers["pacs"].tls_fingerprint == "0a" * 32


def test_cluster_roles_need_postgresql_and_heartbeats_well_inside_the_stall_timeout(
    tmp_path: Path,
) -> None:
    (line,) = problems(tmp_path, '[cluster]\nrole = "worker"\n')
    assert line.startswith("cluster.role = 'worker': ") and "postgresql" in line
    (line,) = problems(tmp_path, "[cluster]\nheartbeat_s = 30.0\nstall_timeout_s = 60.0\n")
    assert line.startswith("cluster.heartbeat_s = 30.0: at most a third of")
    url = "postgresql+psycopg://mvi@db.example/mvi"
    settings = load_settings(
        write(tmp_path, f'[database]\nurl = "{url}"\n[cluster]\nrole = "receiver"\n')
    )
    assert settings.cluster.role == "receiver"


def test_the_console_settings_are_checked(tmp_path: Path) -> None:
    (line,) = problems(tmp_path, '[web]\nviewer_url = "https://ohif.example.org/viewer"\n')
    assert line.startswith("web.viewer_url = ") and "{study_uid}" in line
    (line,) = problems(tmp_path, '[web]\nviewer_url = "javascript:alert({study_uid})"\n')
    assert "http:// or https://" in line
    (line,) = problems(tmp_path, '[web]\ntrusted_user_header = "X-Remote-User"\n')
    assert line.startswith("web.trusted_user_header = 'X-Remote-User': needs web.trusted_proxies")
    (line,) = problems(tmp_path, '[web]\ntrusted_proxies = ["10.0.0.0/33"]\n')
    assert line.startswith("web.trusted_proxies = ") and "not an address or network" in line
    (line,) = problems(tmp_path, '[web]\nshow_identifiers_to = ["radiologist"]\n')
    assert line.startswith("web.show_identifiers_to.0 = 'radiologist': Input should be")
    (line,) = problems(tmp_path, '[web]\ntls_cert = "/etc/ssl/console.pem"\n')
    assert line.startswith("web.tls_key = -: HTTPS needs both")
    settings = load_settings(
        write(
            tmp_path,
            '[web]\ntrusted_user_header = "X-Remote-User"\ntrusted_proxies = ["10.0.0.5"]\n'
            'viewer_url = "https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}"\n',
        )
    )
    assert settings.web.trusted_proxies == ["10.0.0.5"]


def test_dicomweb_peers_are_checked(tmp_path: Path) -> None:
    web = '[peers.cloud]\ndicomweb_url = "https://archive.example.org/dicom-web/"\n'
    settings = load_settings(write(tmp_path, web + '[results]\ndestinations = ["cloud"]\n'))
    cloud = settings.peers["cloud"]
    assert cloud.dicomweb_url == "https://archive.example.org/dicom-web"
    assert cloud.dicomweb_only and cloud.delivers_by_dicomweb and cloud.ae_title == ""
    (line,) = problems(tmp_path, '[peers.pacs]\nhost = "10.0.0.5"\nport = 104\n')
    assert line.startswith("peers.pacs.ae_title = -: needed to reach the peer over DIMSE")
    (line,) = problems(tmp_path, web + 'auth = "basic"\nusername = "mvi"\n')
    assert line.startswith("peers.cloud.auth = 'basic': needs username and password")
    (line,) = problems(tmp_path, web + 'auth = "bearer"\n')
    assert line.startswith("peers.cloud.auth = 'bearer': needs token")
    (line,) = problems(
        tmp_path, '[peers.cloud]\ndicomweb_url = "https://mvi:secret@archive.example.org/"\n'
    )
    assert "credentials go in username/password" in line and "secret" not in line
    (line,) = problems(tmp_path, '[peers.pacs]\nae_title = "PACS"\ndeliver_by = "dicomweb"\n')
    assert line.startswith("peers.pacs.deliver_by = 'dicomweb': needs dicomweb_url")
    both = (
        '[peers.pacs]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
        'dicomweb_url = "https://pacs.example.org/dicom-web"\n'
    )
    assert not load_settings(write(tmp_path, both)).peers["pacs"].delivers_by_dicomweb
    chosen = load_settings(write(tmp_path, both + 'deliver_by = "dicomweb"\n'))
    assert chosen.peers["pacs"].delivers_by_dicomweb


def test_a_peer_password_is_never_printed(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        '[peers.cloud]\ndicomweb_url = "https://archive.example.org/dicom-web"\n'
        'auth = "basic"\nusername = "mvi"\npassword = "hunter2-secret"\n',
    )
    assert "hunter2-secret" not in to_toml(redacted_dict(load_settings(config)))


def test_dicomweb_credentials_stay_on_one_line_and_off_plain_http(tmp_path: Path) -> None:
    web = '[peers.cloud]\ndicomweb_url = "https://archive.example.org/dicom-web"\n'
    (line,) = problems(tmp_path, web + 'auth = "bearer"\ntoken = "abc\\n"\n')
    assert line.startswith("peers.cloud.token = ********: ") and "control characters" in line
    plain = '[peers.cloud]\ndicomweb_url = "http://archive.example.org/dicom-web"\n'
    (line,) = problems(tmp_path, plain + 'auth = "bearer"\ntoken = "abc"\n')
    assert "sends the credentials in clear: use https://" in line
    loopback = '[peers.cloud]\ndicomweb_url = "http://127.0.0.1:8042/dicom-web"\n'
    assert load_settings(write(tmp_path, loopback + 'auth = "bearer"\ntoken = "abc"\n'))
