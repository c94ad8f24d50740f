"""The node's configuration: one pydantic-settings schema for every section of ``node.toml``.

Sources, lowest to highest priority: the defaults in this module, a TOML file (``--config FILE``
or ``MVI_CONFIG``), then environment variables ``MVI_<SECTION>__<KEY>`` (for a peer:
``MVI_PEERS__<NAME>__<KEY>``). Every model forbids unknown keys: a typo in a site's file must
fail loudly instead of silently falling back to a default.

``config/node.toml`` documents every default below; ``tests/node/core/test_settings.py`` keeps
the two equal.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from node.core.errors import ConfigurationError

CONFIG_ENV = "MVI_CONFIG"
ENV_PREFIX = "MVI_"
REDACTED = "********"

Port = Annotated[int, Field(ge=1, le=65535)]
PositiveSeconds = Annotated[float, Field(gt=0)]


def _empty_to_none(value: Any) -> Any:
    # TOML has no null: the documented way to leave an optional key unset is an empty string.
    if isinstance(value, str) and value.strip() == "":
        return None
    return value


def _check_ae_title(value: str) -> str:
    if not 1 <= len(value) <= 16:
        raise ValueError("an AE title has 1 to 16 characters")
    if not value.isascii() or "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError("an AE title is printable ASCII without backslash")
    if value.strip() == "":
        raise ValueError("an AE title cannot be only spaces")
    return value


def _check_patterns(values: list[str]) -> list[str]:
    for pattern in values:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"regular expression {pattern!r} does not compile: {exc}") from exc
    return values


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class NodeSection(_Section):
    """``[node]``: the node's own DICOM identity, listening address and limits."""

    ae_title: str = "MVI_NODE"
    host: str = "0.0.0.0"
    port: Port = 11112
    data_dir: Path = Path("~/.local/share/mvi-node")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Also write the log (JSON lines, workers' included) to this file, beside journald; its
    #: folder must exist. Rotated at ``log_file_max_mb``, keeping ``log_file_backups`` old ones.
    log_file: Path | None = None
    log_file_max_mb: int = Field(default=50, ge=1)
    log_file_backups: int = Field(default=5, ge=1)
    max_associations: int = Field(default=10, ge=1)
    #: Processes that receive on the DICOM port ("auto": one per core, at most 4). One Python
    #: process serves every association under one interpreter lock; more processes take
    #: concurrent associations on more cores. ``max_associations`` and
    #: ``max_associations_per_host`` apply in each.
    receive_processes: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    #: Connections one host may hold at once (further ones are closed at the door): one caller
    #: cannot take every thread and association slot from the others.
    max_associations_per_host: int = Field(default=8, ge=1)
    #: A new connection must finish its TLS handshake and start its A-ASSOCIATE-RQ within this
    #: long, or it is closed before it holds an association slot (the ACSE timeout is longer).
    request_timeout_s: PositiveSeconds = 10.0
    #: Largest PDU the node receives (0: unlimited). 128 KiB: large enough that the PDU
    #: framing costs nothing, small enough that no peer makes one fragment a memory burden.
    max_pdu: int = Field(default=131072, ge=0)
    #: Largest dataset the node stores (MB); a larger one is refused with 0xA702. An instance is
    #: received into a file, never into memory, so this bounds disk, not RSS.
    max_instance_mb: int = Field(default=1024, ge=1)
    acse_timeout: PositiveSeconds = 30.0
    dimse_timeout: PositiveSeconds = 60.0
    network_timeout: PositiveSeconds = 60.0
    free_disk_floor_mb: int = Field(default=1024, ge=0)

    _ae = field_validator("ae_title")(_check_ae_title)
    _none = field_validator("log_file", mode="before")(_empty_to_none)

    @field_validator("data_dir", "log_file")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, value: int) -> int:
        # 0 means unlimited; anything else must hold at least one PDV header.
        if value != 0 and value < 4096:
            raise ValueError("max_pdu is 0 (unlimited) or at least 4096 bytes")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


#: Shortest ``security.pseudonym_key`` (bytes, UTF-8): a short key lets anyone who guesses it
#: recompute a patient's pseudonym from the patient ID. ``openssl rand -hex 32`` gives 64.
PSEUDONYM_KEY_MIN_BYTES = 32


def _check_pseudonym_key(value: SecretStr) -> SecretStr:
    size = len(value.get_secret_value().encode("utf-8"))
    if 0 < size < PSEUDONYM_KEY_MIN_BYTES:
        raise ValueError(
            f"must be at least {PSEUDONYM_KEY_MIN_BYTES} bytes, got {size} "
            "(make one with `openssl rand -hex 32`)"
        )
    return value


class SecuritySection(_Section):
    """``[security]``: who may associate, DICOM TLS, and the key for pseudonymised exports."""

    allow_unknown_callers: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    require_client_cert: bool = True
    pseudonym_key: SecretStr = SecretStr("")

    _none = field_validator("tls_cert", "tls_key", "tls_ca", mode="before")(_empty_to_none)
    _key = field_validator("pseudonym_key")(_check_pseudonym_key)


class PeerSection(_Section):
    """``[peers.NAME]``: a DICOM application entity the node talks to or accepts, over DIMSE
    (``ae_title``, ``host``, ``port``) and/or DICOMweb (``dicomweb_url``)."""

    #: Needed for DIMSE; a DICOMweb-only peer (``dicomweb_url``, no ``port``) has none.
    ae_title: str = ""
    host: str | None = None
    port: Port | None = None
    tls: bool = False
    #: Check that the peer's certificate names ``host`` when the node calls it over TLS.
    tls_check_hostname: bool = True
    #: SHA-256 of the one certificate this peer may present (calling in or called); see
    #: node.core.tls. ``openssl x509 -noout -fingerprint -sha256 -in CERT`` prints it.
    tls_fingerprint: str | None = None

    #: DICOMweb base URL (``https://pacs.example.org/dicom-web``): STOW-RS for results,
    #: QIDO-RS and WADO-RS for re-queries. TLS certificates are verified (``dicomweb_ca`` for a
    #: private CA, else the system's).
    dicomweb_url: str | None = None
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: SecretStr = SecretStr("")
    token: SecretStr = SecretStr("")
    dicomweb_ca: Path | None = None
    #: What carries results to a peer that has both a DIMSE port and a dicomweb_url.
    deliver_by: Literal["dimse", "dicomweb"] = "dimse"
    #: The bearer token this peer sends with STOW-RS to the node's ``[dicomweb]`` receiver.
    stow_token: SecretStr = SecretStr("")

    _ae = field_validator("ae_title")(lambda value: _check_ae_title(value) if value else value)
    _none = field_validator(
        "host",
        "port",
        "tls_fingerprint",
        "dicomweb_url",
        "username",
        "dicomweb_ca",
        mode="before",
    )(_empty_to_none)

    @field_validator("dicomweb_url")
    @classmethod
    def _web_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("an http:// or https:// URL")
        if parts.username or parts.password:
            # The URL is shown in statuses and pages; secrets go where they are masked.
            raise ValueError("credentials go in username/password or token, not in the URL")
        return value.rstrip("/")

    @field_validator("username", "password", "token", "stow_token")
    @classmethod
    def _one_line(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(text, str) and any(ord(c) < 32 or ord(c) == 127 for c in text):
            # A line break (a secrets file's last newline) would break the HTTP header, and
            # requests quotes the header in its error: the secret would reach the outbox row.
            raise ValueError("no control characters (a trailing newline?)")
        return value

    @property
    def dicomweb_only(self) -> bool:
        """Reached only over DICOMweb: a URL and no DIMSE port."""
        return self.dicomweb_url is not None and self.port is None

    @property
    def delivers_by_dicomweb(self) -> bool:
        """Whether results go to this peer by STOW-RS (else C-STORE)."""
        return self.dicomweb_url is not None and (
            self.port is None or self.deliver_by == "dicomweb"
        )

    @field_validator("tls_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str | None) -> str | None:
        from node.core.tls import normalise_fingerprint

        return None if value is None else normalise_fingerprint(value)


class CompletionSection(_Section):
    """``[completion]``: when a study counts as complete."""

    quiet_seconds: PositiveSeconds = 10.0
    # A study that never falls quiet (a slice every few seconds) is complete this long after its
    # first instance anyway; later instances re-open it and a new job supersedes.
    max_receive_minutes: Annotated[float, Field(gt=0)] = 30.0


class PhasesSection(_Section):
    """``[phases]``: case-insensitive patterns for SeriesDescription and ProtocolName."""

    arterial: list[str] = [r"arter", r"\bart\b", r"\bap\b", r"\blap\b"]
    portal_venous: list[str] = [r"portal", r"\bpvp?\b", r"ven(ous|ös|eux)", r"\bpv[ _-]?phase"]
    non_contrast: list[str] = [
        r"non[ _-]?contrast",
        r"\bnc\b",
        r"plain",
        r"nati(ve|v)\b",
        r"pre[ _-]?contrast",
        r"unenhanced",
        r"\bw/?o\b",
    ]
    delayed: list[str] = [r"delay", r"equilib", r"\beq\b", r"\bdp\b", r"\d+\s*min"]

    _patterns = field_validator("arterial", "portal_venous", "non_contrast", "delayed")(
        _check_patterns
    )


class SuppliedSegLabels(_Section):
    """Segment-label patterns that map a supplied SEG's segments to tumor and LOAT."""

    tumor: list[str] = [r"tumou?r", r"lesion", r"\bhcc\b", r"neoplasm", r"mass"]
    loat: list[str] = [r"\bloat\b", r"lesser\s+omental", r"omental\s+fat", r"omentum"]

    _patterns = field_validator("tumor", "loat")(_check_patterns)


class PipelineSection(_Section):
    """``[pipeline]``: how a job runs and which models it uses."""

    device: str = "auto"
    segmenter: Literal["unet"] = "unet"
    segmenter_dir: Path | None = None
    model_dir: Path | None = None
    workers: int = Field(default=1, ge=1, le=64)
    #: ``serve`` loads the models in a child process before it starts (device, weights) and
    #: refuses to start when they do not load, and each worker loads them before its first
    #: job, which then waits for neither; off, the first job finds out (and loads them).
    load_models_at_start: bool = True
    max_attempts: int = Field(default=3, ge=1, le=20)
    #: A worker process holds the memory a job frees for the next job, which reuses it instead
    #: of faulting it in afresh (:mod:`node.jobs.memory`), while its resident memory (models
    #: included, MB) stays at most this; above it a job's freed memory is given back. 0: always.
    worker_keep_memory_mb: int = Field(default=4096, ge=0, le=1_048_576)
    batch_size: int | Literal["auto"] = "auto"
    working_spacing_mm: float | None = Field(default=None, gt=0.25, le=10.0)
    risk_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    supplied_seg_algorithm_types: list[Literal["MANUAL", "SEMIAUTOMATIC", "AUTOMATIC"]] = [
        "MANUAL",
        "SEMIAUTOMATIC",
    ]
    supplied_seg_labels: SuppliedSegLabels = SuppliedSegLabels()
    # Off: a fat segment is LOAT only where something says it is the lesser omentum's.
    supplied_seg_accept_single_fat: bool = False

    _none = field_validator(
        "segmenter_dir", "model_dir", "working_spacing_mm", "risk_threshold", mode="before"
    )(_empty_to_none)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("device is 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("segmenter_dir", "model_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 256:
            raise ValueError("batch_size is 'auto' or a number of studies from 1 to 256")
        return value

    @field_validator("supplied_seg_algorithm_types", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [v.upper() if isinstance(v, str) else v for v in value]
        return value


class GatesSection(_Section):
    """``[gates]``: limits of the quality checks between the stages (:mod:`node.analysis.gates`).

    A study that fails a check ends ``needs_review`` with the check's name and figures; it gets
    no MVI probability or risk category.
    """

    enabled: bool = True
    min_slices: int = Field(default=16, ge=2)
    max_tilt_deg: float = Field(default=20.0, ge=0.0, le=90.0)
    max_liver_cut_fraction: float = Field(default=0.3, ge=0.0, le=1.0)
    registration_max_metric: float = Field(default=-0.15, le=0.0)
    registration_min_overlap: float = Field(default=0.9, ge=0.0, le=1.0)
    registration_max_residual_mm: float = Field(default=5.0, gt=0.0)
    max_tumor_components: int = Field(default=3, ge=1)
    min_component_ml: float = Field(default=0.1, ge=0.0)
    max_satellite_fraction: float = Field(default=0.5, ge=0.0)
    min_tumor_volume_ml: float = Field(default=0.5, ge=0.0)
    min_liver_contact: float = Field(default=0.5, ge=0.0, le=1.0)
    max_stray_liver_fraction: float = Field(default=0.5, ge=0.0)
    volume_range_factor: float = Field(default=1.5, ge=1.0)
    max_loat_distance_mm: float = Field(default=35.0, gt=0.0)
    uncertainty_limit: float | None = Field(default=None, gt=0.0, le=1.0)
    tumor_uncertainty_limit: float | None = Field(default=None, gt=0.0, le=1.0)
    hu_margin: float = Field(default=30.0, ge=0.0)
    max_roi_outside_fraction: float = Field(default=0.1, ge=0.0, le=1.0)

    _none = field_validator("uncertainty_limit", "tumor_uncertainty_limit", mode="before")(
        _empty_to_none
    )


class ResultsSection(_Section):
    """``[results]``: what the node sends back and where."""

    destinations: list[str] = []
    formats: list[Literal["seg", "sr", "sc"]] = ["seg", "sr", "sc"]
    sr_sop_class: Literal["comprehensive", "comprehensive3d"] = "comprehensive"
    disclaimer: str = "For research use only. Not for diagnostic use."
    notify_failures: bool = True
    send_rejection_notes: bool = False

    @field_validator("formats")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("formats lists each of seg, sr, sc at most once")
        return value


class OutboxSection(_Section):
    """``[outbox]``: retries of result delivery."""

    backoff_initial_s: PositiveSeconds = 30.0
    backoff_max_s: PositiveSeconds = 3600.0
    give_up_after_s: PositiveSeconds = 86400.0


class RequerySection(_Section):
    """``[requery]``: retrospective query/retrieve from the PACS."""

    peer: str | None = None
    use_c_get: bool = False
    max_concurrent: int = Field(default=2, ge=1, le=32)
    send_results: bool = False
    schedule: str | None = None
    safety_net_days: int = Field(default=3, ge=1, le=365)

    _none = field_validator("peer", "schedule", mode="before")(_empty_to_none)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a 5-field cron expression: {exc}") from exc
        return value


class RetentionSection(_Section):
    """``[retention]``: how long received instances stay in the spool."""

    spool_days: int = Field(default=30, ge=0)


class MetricsSection(_Section):
    """``[metrics]``: the Prometheus ``/metrics`` and ``/healthz`` endpoint."""

    # Loopback unless a site opens it: the pages have no authentication.
    host: str = "127.0.0.1"
    port: Port | None = None

    _none = field_validator("port", mode="before")(_empty_to_none)


class DatabaseSection(_Section):
    """``[database]``: the one database (SQLite file under data_dir when url is empty)."""

    url: str | None = None

    _none = field_validator("url", mode="before")(_empty_to_none)


class ClusterSection(_Section):
    """``[cluster]``: this host's part when several hosts share one PostgreSQL database."""

    #: ``all``: one host does everything (SQLite or PostgreSQL). ``receiver``: `serve` runs the
    #: AE, timers, sweeps and dispatcher but no workers. ``worker``: this host runs
    #: `mvi-node worker` processes only. Both need a PostgreSQL ``database.url``.
    role: Literal["all", "receiver", "worker"] = "all"
    #: A running job whose worker has not beaten for this long goes back to the queue (a new
    #: lease fences the silent attempt). Heartbeats come from a thread of their own, so a long
    #: batch does not count against it; a frozen process, a network cut or a host down does.
    stall_timeout_s: PositiveSeconds = 300.0
    #: How often a worker refreshes its jobs' heartbeats (at most a third of stall_timeout_s).
    heartbeat_s: PositiveSeconds = 10.0


class DicomwebSection(_Section):
    """``[dicomweb]``: the node's STOW-RS receiver (``POST /dicom-web/studies``)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8480
    #: HTTPS (both or neither); peers then reach it as ``https://HOST:PORT/dicom-web``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: The largest request body taken, in MB (each instance also within node.max_instance_mb).
    max_request_mb: int = Field(default=2048, ge=1)

    _none = field_validator("tls_cert", "tls_key", mode="before")(_empty_to_none)


#: The console's roles, least to most: viewer reads, operator also acts, admin also reads the
#: audit log of actions.
WebRole = Literal["viewer", "operator", "admin"]


class WebSection(_Section):
    """``[web]``: the operator console (docs/console.md), a process of its own under `serve`."""

    enabled: bool = True
    # Loopback unless a site opens it (or puts a TLS reverse proxy in front).
    host: str = "127.0.0.1"
    port: Port = 8470
    #: HTTPS served by the console itself (both or neither); else plain HTTP on ``host``.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: A link from each study page to a viewer, e.g.
    #: ``https://ohif.example.org/viewer?StudyInstanceUIDs={study_uid}``.
    viewer_url: str | None = None
    #: Single sign-on: a reverse proxy names the logged-in user in this header (e.g.
    #: ``X-Remote-User``); believed only from ``trusted_proxies``. The user must be a local
    #: account, whose role applies.
    trusted_user_header: str | None = None
    #: Addresses or networks (``10.0.0.5``, ``10.0.0.0/24``) allowed to set that header.
    trusted_proxies: list[str] = []
    #: Roles that see patient name and ID; the others see study keys only.
    show_identifiers_to: list[WebRole] = ["operator", "admin"]
    #: A login ends after this long without a request of the user (a page's own polling does
    #: not count), and in any case this long after it began.
    session_idle_minutes: int = Field(default=60, ge=1, le=7 * 24 * 60)
    session_max_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    #: Failed logins allowed per user name (four times as many per client address) within
    #: ``login_window_s``.
    login_attempts: int = Field(default=5, ge=1, le=100)
    login_window_s: PositiveSeconds = 300.0
    #: The login cookie's Secure flag; browsers keep such cookies from https and loopback only.
    secure_cookies: bool = True
    #: Where `mvi-node audit` reports (``*/report.html``) are listed from; default
    #: ``data_dir/reports``.
    reports_dir: Path | None = None

    _none = field_validator(
        "tls_cert", "tls_key", "viewer_url", "trusted_user_header", "reports_dir", mode="before"
    )(_empty_to_none)

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "{study_uid}" not in value:
            raise ValueError("needs {study_uid} where the study's UID goes")
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("an http:// or https:// URL")
        return value

    @field_validator("trusted_user_header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9-]+", value):
            raise ValueError("an HTTP header name: letters, digits and '-'")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or network") from None
        return value


class Settings(BaseSettings):
    """The node's whole configuration; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
        validate_default=True,
    )

    node: NodeSection = NodeSection()
    security: SecuritySection = SecuritySection()
    peers: dict[str, PeerSection] = {}
    completion: CompletionSection = CompletionSection()
    phases: PhasesSection = PhasesSection()
    pipeline: PipelineSection = PipelineSection()
    gates: GatesSection = GatesSection()
    results: ResultsSection = ResultsSection()
    outbox: OutboxSection = OutboxSection()
    requery: RequerySection = RequerySection()
    retention: RetentionSection = RetentionSection()
    metrics: MetricsSection = MetricsSection()
    database: DatabaseSection = DatabaseSection()
    cluster: ClusterSection = ClusterSection()
    web: WebSection = WebSection()
    dicomweb: DicomwebSection = DicomwebSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment outranks them.
        return (env_settings, init_settings)

    @field_validator("peers")
    @classmethod
    def _peer_names(cls, value: dict[str, PeerSection]) -> dict[str, PeerSection]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name):
                raise ValueError(f"peer name {name!r}: letters, digits, '_' and '-' only")
        return value

    @property
    def shared_database(self) -> bool:
        """Whether the store is PostgreSQL, which several hosts may share (the cluster's
        sweeps, claims and periodic tasks run only then; a configured SQLite URL is one host)."""
        return self.database_url.startswith("postgresql")

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the store (SQLite under ``data_dir`` unless configured)."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.node.data_dir / 'mvi-node.sqlite3'}"


@dataclass(frozen=True)
class Problem:
    """One bad configuration key: where it is, what it holds, and why it is refused."""

    path: str
    value: str
    why: str

    def __str__(self) -> str:
        return f"{self.path} = {self.value}: {self.why}"


class ConfigError(ConfigurationError):
    """The configuration cannot be used; :attr:`problems` has one entry per bad key."""

    def __init__(self, problems: list[Problem], source: str) -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(str(p) for p in problems))


def config_path_from_env(path: Path | None) -> Path | None:
    """The file to read: the explicit argument, else ``$MVI_CONFIG``, else none."""
    if path is not None:
        return path
    env = os.environ.get(CONFIG_ENV, "").strip()
    return Path(env) if env else None


def read_toml(path: Path) -> dict[str, Any]:
    """Read a configuration file, turning every failure into a one-line :class:`ConfigError`."""
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "-", "file not found")], str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), "-", f"not valid TOML: {exc}")], str(path)) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "-", exc.strerror or str(exc))], str(path)) from None


def load_settings(path: Path | None = None) -> Settings:
    """Build the effective settings from defaults, a TOML file and the environment.

    Parameters
    ----------
    path
        The TOML file; when None, ``$MVI_CONFIG`` names it, and without either only the defaults
        and the environment apply.

    Raises
    ------
    ConfigError
        With one :class:`Problem` per bad key: unknown keys, wrong types, values out of range,
        and references to peers that are not configured.
    """
    path = config_path_from_env(path)
    source = str(path) if path is not None else "defaults"
    data = read_toml(path) if path is not None else {}
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        # Report dangling references too, so one run of `config check` lists every problem.
        problems = _problems_from(exc) + list(_reference_problems(data))
        raise ConfigError(problems, source) from None
    problems = list(_reference_problems(settings.model_dump()))
    if problems:
        raise ConfigError(problems, source)
    return settings


def _problems_from(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        value = item.get("input")
        why = item["msg"]
        if item["type"] == "extra_forbidden":
            why = "unknown key (check the spelling against config/node.toml)"
        elif item["type"] == "missing":
            value = None
            why = "required key is missing"
        env_name = ENV_PREFIX + "__".join(str(part) for part in item["loc"]).upper()
        if any(name.upper() == env_name for name in os.environ):
            why += f" (from the environment variable {env_name})"
        problems.append(Problem(path, _show(value, path), why))
    return problems


def _show(value: Any, path: str) -> str:
    if value is None:
        return "-"
    if _is_secret(path):
        return REDACTED
    if path.endswith("dicomweb_url") and isinstance(value, str):
        return repr(_redact_url(value))
    if isinstance(value, Mapping):
        return "{...}"
    return repr(value)


def _is_secret(path: str) -> bool:
    return path.endswith(("pseudonym_key", "database.url", ".password", ".token", "stow_token"))


def _reference_problems(data: Mapping[str, Any]) -> Iterable[Problem]:
    """Keys that name a peer or a file pair must be consistent with the rest of the file.

    Works on plain data (the validated settings dumped, or the raw file when validation failed),
    so it must tolerate values of the wrong type.
    """
    peers = data.get("peers")
    peers = peers if isinstance(peers, Mapping) else {}
    results = data.get("results")
    destinations = results.get("destinations", []) if isinstance(results, Mapping) else []
    for index, name in enumerate(destinations if isinstance(destinations, list) else []):
        peer = peers.get(name)
        if not isinstance(peer, Mapping):
            yield Problem(
                f"results.destinations[{index}]",
                repr(name),
                f"no [peers.{name}] section is configured",
            )
        elif not peer.get("dicomweb_url") and (not peer.get("host") or not peer.get("port")):
            yield Problem(
                f"results.destinations[{index}]",
                repr(name),
                f"[peers.{name}] needs host and port, or dicomweb_url, to receive results",
            )
    for name, peer in peers.items():
        if isinstance(peer, Mapping):
            yield from _peer_problems(name, peer)
    requery = data.get("requery")
    peer_name = requery.get("peer") if isinstance(requery, Mapping) else None
    if peer_name and peer_name not in peers:
        yield Problem(
            "requery.peer", repr(peer_name), f"no [peers.{peer_name}] section is configured"
        )
    security = data.get("security")
    security = security if isinstance(security, Mapping) else {}
    if not security.get("tls_ca"):
        for name, peer in peers.items():
            if isinstance(peer, Mapping) and peer.get("tls") is True:
                yield Problem(
                    f"peers.{name}.tls",
                    "true",
                    "needs security.tls_ca to verify the peer's certificate",
                )
    given = {key for key in ("tls_cert", "tls_key") if security.get(key)}
    if len(given) == 1:
        missing = ({"tls_cert", "tls_key"} - given).pop()
        yield Problem(f"security.{missing}", "-", "TLS needs both tls_cert and tls_key")
    cluster = data.get("cluster")
    cluster = cluster if isinstance(cluster, Mapping) else {}
    database = data.get("database")
    url = database.get("url") if isinstance(database, Mapping) else None
    role = cluster.get("role")
    if role in ("receiver", "worker") and not (
        isinstance(url, str) and url.startswith("postgresql")
    ):
        yield Problem(
            "cluster.role",
            repr(role),
            'hosts share work through PostgreSQL: set database.url = "postgresql+psycopg://…"',
        )
    for section in ("web", "dicomweb"):
        http = data.get(section)
        http = http if isinstance(http, Mapping) else {}
        given = {key for key in ("tls_cert", "tls_key") if http.get(key)}
        if len(given) == 1:
            missing = ({"tls_cert", "tls_key"} - given).pop()
            yield Problem(f"{section}.{missing}", "-", "HTTPS needs both tls_cert and tls_key")
    web = data.get("web")
    web = web if isinstance(web, Mapping) else {}
    if web.get("trusted_user_header") and not web.get("trusted_proxies"):
        yield Problem(
            "web.trusted_user_header",
            repr(web.get("trusted_user_header")),
            "needs web.trusted_proxies: the addresses of the proxy that sets it",
        )
    beat, stall = cluster.get("heartbeat_s"), cluster.get("stall_timeout_s")
    if isinstance(beat, int | float) and isinstance(stall, int | float) and beat * 3 > stall:
        yield Problem(
            "cluster.heartbeat_s",
            repr(beat),
            f"at most a third of cluster.stall_timeout_s ({stall}), or a busy worker looks dead",
        )


def _peer_problems(name: str, peer: Mapping[str, Any]) -> Iterable[Problem]:
    """A peer's DIMSE and DICOMweb keys must fit together."""
    url = peer.get("dicomweb_url")
    if not peer.get("ae_title") and not (url and not peer.get("port")):
        yield Problem(
            f"peers.{name}.ae_title",
            "-",
            "needed to reach the peer over DIMSE (a DICOMweb-only peer has dicomweb_url and no "
            "port)",
        )
    auth = peer.get("auth", "none")
    if auth == "basic" and not (peer.get("username") and _secret_given(peer.get("password"))):
        yield Problem(f"peers.{name}.auth", "'basic'", "needs username and password")
    if auth == "bearer" and not _secret_given(peer.get("token")):
        yield Problem(f"peers.{name}.auth", "'bearer'", "needs token")
    if auth != "none" and not url:
        yield Problem(f"peers.{name}.auth", repr(auth), "is for DICOMweb: set dicomweb_url")
    if auth != "none" and isinstance(url, str) and url.startswith("http://"):
        host = urlsplit(url).hostname or ""
        if host not in ("localhost", "127.0.0.1", "::1"):
            yield Problem(
                f"peers.{name}.dicomweb_url",
                repr(url),
                f"auth = {auth!r} over http:// sends the credentials in clear: use https://",
            )
    if peer.get("deliver_by") == "dicomweb" and not url:
        yield Problem(f"peers.{name}.deliver_by", "'dicomweb'", "needs dicomweb_url")


def _secret_given(value: Any) -> bool:
    if isinstance(value, SecretStr):
        return bool(value.get_secret_value())
    return bool(value)


def redacted_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets replaced by ``********``."""
    data = settings.model_dump(mode="json")
    key = settings.security.pseudonym_key.get_secret_value()
    data["security"]["pseudonym_key"] = REDACTED if key else ""
    if settings.database.url:
        data["database"]["url"] = _redact_url(settings.database.url)
    for name, peer in settings.peers.items():
        for key in ("password", "token", "stow_token"):
            data["peers"][name][key] = REDACTED if getattr(peer, key).get_secret_value() else ""
    return data


#: Query parameters of a database URL that carry a secret (libpq's and the drivers' names).
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "sslpassword", "secret", "token"})


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    query = "&".join(
        f"{name}={REDACTED}" if name.lower() in _SECRET_QUERY_KEYS and sep else pair
        for pair in parts.query.split("&")
        if pair
        for name, sep, _ in [pair.partition("=")]
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def to_toml(data: Mapping[str, Any]) -> str:
    """Write nested plain data as TOML (tables for mappings, ``""`` for unset values)."""
    lines: list[str] = []
    _emit_table(lines, [], data)
    return "\n".join(lines).strip() + "\n"


def _emit_table(lines: list[str], prefix: list[str], table: Mapping[str, Any]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping)}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if prefix and (scalars or not tables):
        lines.append(f"[{'.'.join(prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    if prefix and (scalars or not tables):
        lines.append("")
    for key, value in tables.items():
        _emit_table(lines, [*prefix, key], value)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
