"""Specification of how the node is installed: the systemd unit and the container image."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import require_tool, run_tool

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


#: The units, and the name each is verified under (a template needs an instance).
UNITS = {
    "mvi-node.service": "mvi-node.service",
    "mvi-node-receiver.service": "mvi-node-receiver.service",
    "mvi-node-worker@.service": "mvi-node-worker@cpu.service",
}


def unit_copy(folder: Path, exec_path: str, unit: str = "mvi-node.service") -> Path:
    copy = folder / UNITS[unit]
    text = (ROOT / "systemd" / unit).read_text()
    copy.write_text(text.replace("/opt/mvi-node/bin/mvi-node", exec_path))
    return copy


@pytest.mark.parametrize("unit", sorted(UNITS))
def test_the_units_pass_systemd_analyze_verify(tmp_path: Path, unit: str) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    installed = shutil.which("mvi-node", path=str(Path(sys.executable).parent))
    assert installed is not None
    result = run_tool(analyze, "verify", unit_copy(tmp_path, installed, unit), check=False)
    assert result.returncode == 0, result.stderr


def test_verify_fails_when_the_binary_is_missing(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    result = run_tool(analyze, "verify", unit_copy(tmp_path, "/nonexistent/mvi-node"), check=False)
    assert result.returncode != 0
    assert "not executable" in result.stderr


HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "Restart=on-failure",
    "CapabilityBoundingSet=",
)


@pytest.mark.parametrize(
    ("unit", "lines"),
    [
        (
            "mvi-node.service",
            (
                "Type=notify",
                "ExecStart=/opt/mvi-node/bin/mvi-node serve --config /etc/mvi-node/node.toml",
                "StateDirectory=mvi-node",
                "WatchdogSec=",
            ),
        ),
        (
            "mvi-node-receiver.service",
            (
                "Type=notify",
                "ExecStart=/opt/mvi-node/bin/mvi-node serve --config /etc/mvi-node/node.toml",
                "Environment=MVI_CLUSTER__ROLE=receiver",
                "Environment=MVI_NODE__DATA_DIR=/srv/mvi-node",
                "RequiresMountsFor=/srv/mvi-node",
                "WatchdogSec=",
            ),
        ),
        (
            "mvi-node-worker@.service",
            (
                "ExecStart=/opt/mvi-node/bin/mvi-node worker --config /etc/mvi-node/node.toml "
                "--device %i",
                "Environment=MVI_CLUSTER__ROLE=worker",
                "Environment=MVI_NODE__DATA_DIR=/srv/mvi-node",
                "RequiresMountsFor=/srv/mvi-node",
            ),
        ),
    ],
)
def test_the_units_are_hardened_services(unit: str, lines: tuple[str, ...]) -> None:
    text = (ROOT / "systemd" / unit).read_text()
    for line in (*HARDENING, *lines):
        assert re.search(rf"^{re.escape(line)}", text, re.MULTILINE), line
    assert re.search(r"^User=(?!root)\S+", text, re.MULTILINE)
    assert not re.search(r"^AmbientCapabilities=", text, re.MULTILINE), "no capability by default"


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile instructions (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_the_dockerfile_has_the_essentials() -> None:
    steps = instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in steps]
    assert keywords.count("FROM") >= 2, "multi-stage"
    last_stage = keywords[len(keywords) - 1 - keywords[::-1].index("FROM") :]
    users = [rest for k, rest in steps if k == "USER"]
    assert users and users[-1] not in {"root", "0"} and "USER" in last_stage
    assert any(k == "HEALTHCHECK" and "/healthz" in rest for k, rest in steps)
    exposed = " ".join(rest for k, rest in steps if k == "EXPOSE").split()
    assert "11112" in exposed and "9464" in exposed
    assert any(k == "VOLUME" and "/var/lib/mvi-node" in rest for k, rest in steps)
    assert any(k == "ARG" and rest.startswith("BASE=") for k, rest in steps), (
        "a CUDA base can be chosen"
    )
    copied = " ".join(rest for k, rest in steps if k in {"COPY", "ADD"})
    for secret in (".key", ".pem", "secrets", ".env", "id_rsa"):
        assert secret not in copied, f"{secret} copied into the image"


def test_the_conformance_statement_matches_the_ae() -> None:
    from pynetdicom import AllStoragePresentationContexts

    from node.core.settings import Settings
    from node.receive.receiver import TRANSFER_SYNTAXES, build_ae

    statement = (ROOT / "docs" / "conformance.md").read_text()
    for syntax in TRANSFER_SYNTAXES:
        assert str(syntax) in statement, f"{syntax.name} missing from the statement"
    assert f"All {len(AllStoragePresentationContexts)} Storage SOP classes" in statement
    supported = {str(cx.abstract_syntax) for cx in build_ae(Settings()).supported_contexts}
    assert len(supported) == len(AllStoragePresentationContexts) + 1  # and Verification


def locked(path: Path) -> dict[str, tuple[str, int]]:
    """A lock file's ``{normalised name: (version, number of hashes)}``."""
    entries: dict[str, tuple[str, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", line)
        if pinned:
            name = re.sub(r"[-_.]+", "-", pinned[1].split("[")[0]).lower()
            entries[name] = (pinned[2], 0)
        elif "--hash=sha256:" in line and name:
            version, hashes = entries[name]
            entries[name] = (version, hashes + 1)
    return entries


def requirement_names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", r)[0]).lower() for r in requirements}


def test_the_locks_pin_every_dependency_by_version_and_hash() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = locked(ROOT / "requirements.lock")
    dev = locked(ROOT / "requirements-dev.lock")
    extras = project["optional-dependencies"]
    # The image runs any role of a cluster; make install adds the test tools (dev names the
    # cluster extra by the project's own name).
    runtime_needs = project["dependencies"] + extras["cluster"]
    dev_needs = runtime_needs + [r for r in extras["dev"] if not r.startswith("mvi-node")]
    assert requirement_names(runtime_needs) <= set(runtime)
    assert requirement_names(dev_needs) <= set(dev)
    for entries in (runtime, dev):
        assert all(hashes >= 1 for _, hashes in entries.values())
    assert {n: v for n, (v, _) in runtime.items()} == {n: dev[n][0] for n in runtime}
    # make install installs exactly the dev lock: the tests run on what it names.
    installed = {n: importlib.metadata.version(n) for n in dev}
    assert installed == {n: v for n, (v, _) in dev.items()}, "run `make install`"


def test_the_image_installs_the_lock_on_bases_pinnable_by_digest() -> None:
    steps = instructions(DOCKERFILE.read_text())
    runs = " ".join(rest for k, rest in steps if k == "RUN")
    assert "--require-hashes -r requirements.lock" in runs
    assert "--no-deps ." in runs
    bases = [rest for k, rest in steps if k == "FROM"]
    assert all(re.search(r"\$\{\w*DIGEST:\+@\$\{\w*DIGEST\}\}", base) for base in bases), bases
    assert any(k == "ARG" and rest.startswith("BASE_DIGEST=") for k, rest in steps)


def test_the_conformance_statement_lists_every_private_code_and_the_implementation_uids() -> None:
    import highdicom
    import pynetdicom
    from pydicom.sr.coding import Code

    from dicom_sr import codes

    statement = (ROOT / "docs" / "conformance.md").read_text()
    heading = "#### 8.3.2 Private coding scheme 99MVINODE\n"
    annex = statement.split(heading, 1)[1].split("## ", 1)[0]
    rows = dict(re.findall(r"^\| (\w+) \| ([^|]+?) \|", annex, re.MULTILINE))
    private = {
        c.value: c.meaning
        for c in vars(codes).values()
        if isinstance(c, Code) and c.scheme_designator == codes.PRIVATE_SCHEME_DESIGNATOR
    }
    assert rows == private
    assert pynetdicom.PYNETDICOM_IMPLEMENTATION_UID in statement
    assert f"highdicom{highdicom.__version__}" in statement


def _shown(value: object) -> str:
    """A setting's default as the conformance statement writes it."""
    from pydantic import SecretStr

    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        value = f"~/{value.relative_to(Path.home())}"
    if value in (None, "", []):
        return "EMPTY"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _documented(text: str) -> str:
    text = text.replace("`", "").replace('"', "").strip()
    if text.split(" (")[0] in ("empty", "none"):
        return "EMPTY"
    return re.sub(r" (s|min|MB)$", "", text)


def test_the_conformance_statements_parameters_are_the_defaults() -> None:
    from node.core.settings import Settings

    text = (ROOT / "docs" / "conformance.md").read_text()
    section = text.split("#### 4.4.2 Parameters\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    defaults = Settings()
    checked = 0
    for keys, shown in rows:
        names = re.findall(r"`([a-z_]+\.[a-z_]+)`", keys)
        values = shown.split(", ") if len(names) > 1 else [shown]
        if len(values) == 1:  # one default written for several keys ("empty")
            values *= len(names)
        for name, value in zip(names, values, strict=True):
            section_name, key = name.split(".")
            actual = getattr(getattr(defaults, section_name), key)
            assert _documented(value) == _shown(actual), f"{name}: {value} vs {actual!r}"
            checked += 1
    assert checked >= 30
