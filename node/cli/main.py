"""The ``mvi-node`` command line: each command a thin call into the modules that do the work.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad configuration — always with one
line that says what is wrong and what to do.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from model.domain import DomainKind
from node import __version__
from node.core.errors import NodeError, exit_code
from node.core.logging import LogFile, configure_logging, get_logger, study_key, uid_key
from node.core.settings import (
    ConfigError,
    Settings,
    config_path_from_env,
    load_settings,
    redacted_dict,
    to_toml,
)

if TYPE_CHECKING:
    from node.store.database import Store
    from node.store.types import Series, StoredResult

app = typer.Typer(
    name="mvi-node",
    help="DICOM AI node: scores contrast liver CT for microvascular invasion (MVI) of HCC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain: as rich markup, "[peers.NAME]" vanished from them.
    rich_markup_mode=None,
)
config_app = typer.Typer(
    help="Inspect and check the configuration.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(config_app, name="config")
studies_app = typer.Typer(
    help="Studies the node has received.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(studies_app, name="studies")
outbox_app = typer.Typer(
    help="Result objects waiting for delivery.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(outbox_app, name="outbox")
jobs_app = typer.Typer(help="Analysis jobs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(jobs_app, name="jobs")
results_app = typer.Typer(
    help="The results table (for audits).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(results_app, name="results")
db_app = typer.Typer(help="The node's database.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(db_app, name="db")
users_app = typer.Typer(
    help="Accounts of the web console.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(users_app, name="users")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $MVI_CONFIG)."),
]

# Off a terminal (pipes, CI logs) rich would wrap tables at 80 columns.
out = Console() if sys.stdout.isatty() else Console(width=160)
err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)

PHASE_ALIASES = {
    "non_contrast": "non_contrast",
    "nc": "non_contrast",
    "arterial": "arterial",
    "ap": "arterial",
    "portal_venous": "portal_venous",
    "portal-venous": "portal_venous",
    "pv": "portal_venous",
    "pvp": "portal_venous",
    "delayed": "delayed",
    "dp": "delayed",
}


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise."""
    err.print(f"mvi-node: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def error_exit(error: NodeError) -> typer.Exit:
    """:func:`fail` with the error's one line, exiting 1 when the work failed and 2 otherwise."""
    return fail(str(error), exit_code(error))


def _version(value: bool) -> None:
    if value:
        out.print(f"mvi-node {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """DICOM AI node beside the PACS: receives dual-phase liver CT, returns SEG, SR and SC."""
    configure_logging("info")


@config_app.command("check")
def config_check(
    file: Annotated[
        Path | None,
        typer.Argument(help="TOML file to check (default: $MVI_CONFIG, else the defaults)."),
    ] = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also try what serve needs: data folder, TLS files, device, models, peers.",
        ),
    ] = False,
) -> None:
    """Print the effective configuration (secrets redacted), or one line per bad key and exit 2."""
    path = config_path_from_env(file)
    settings = _settings(path)
    source = str(path) if path is not None else "built-in defaults"
    out.print(f"# effective configuration from {source} and MVI_* environment", markup=False)
    out.print(to_toml(redacted_dict(settings)), markup=False, highlight=False, soft_wrap=True)
    if deep:
        from node.serve.preflight import fatal, run_checks

        checks = run_checks(settings)
        out.print("# pre-flight", markup=False)
        for check in checks:
            out.print(check.line(), markup=False, highlight=False, soft_wrap=True)
        if fatal(checks):
            raise typer.Exit(2)


def _settings(config: Path | None) -> Settings:
    """Load the configuration or exit 2 with one line per problem; set up logging from it."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        for problem in exc.problems:
            err.print(f"{exc.source}: {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    configure_logging(settings.node.log_level)
    return settings


def _store(settings: Settings, config: Path | None) -> Store:
    """The store of an offline command, or exit 2 with one line when its schema is not usable."""
    from node.store.database import SchemaError, Store, database_file

    path = database_file(settings.database_url)
    if path is not None and not path.is_file():
        # Creating it would show an empty node: the service's database is another one.
        raise fail(
            f"no database at {path}: no node has run with this configuration (data folder "
            f"{settings.node.data_dir}); name the node's configuration with --config FILE or "
            "MVI_CONFIG"
        )
    try:
        return Store(settings.database_url, schema="check")
    except SchemaError as exc:
        raise fail(exc.line(config_path_from_env(config))) from None


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Bring the configured database to this node's schema (creates a new one); say from what."""
    from node.store.migrate import SchemaError, upgrade

    settings = _settings(config)
    try:
        done = upgrade(settings.database_url)
    except SchemaError as exc:
        raise fail(str(exc)) from None
    out.print(done.describe(), markup=False, highlight=False, soft_wrap=True)


def _preflight(settings: Settings) -> None:
    """Refuse to serve (exit 2, one line each) when the first job would fail anyway.

    The peers' C-ECHO runs beside the start and is only logged: a PACS may be down for
    maintenance while the node starts.
    """
    import threading

    from node.serve.preflight import fatal, host_checks, model_checks, peer_checks

    checks = host_checks(settings)
    if not fatal(checks) and settings.pipeline.load_models_at_start:
        checks += model_checks(settings)
    failed = fatal(checks)
    for check in failed:
        err.print(f"mvi-node: {check.line()}", markup=False, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)

    log = get_logger("node.serve.preflight")

    def echo_peers() -> None:
        for check in peer_checks(settings):
            (log.info if check.ok else log.warning)(
                "pre-flight: peer answers C-ECHO" if check.ok else "pre-flight: peer is silent",
                check=check.name,
                detail=check.detail,
            )

    threading.Thread(target=echo_peers, name="preflight-echo", daemon=True).start()


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the node: receive studies, pair their phases, run jobs (until SIGTERM)."""
    from node.serve.service import serve as run
    from node.store.database import SchemaError

    settings = _settings(config)
    if settings.cluster.role == "worker":
        raise fail("cluster.role = 'worker': this host runs `mvi-node worker` processes, not serve")
    _preflight(settings)
    node = settings.node
    if node.log_file is not None:
        try:
            rotation = LogFile(node.log_file, node.log_file_max_mb * 2**20, node.log_file_backups)
            configure_logging(node.log_level, log_file=rotation)
        except OSError as exc:
            raise fail(
                f"node.log_file: cannot write {node.log_file}: {exc.strerror or exc}"
            ) from None
    try:
        run(settings)
    except SchemaError as exc:
        raise fail(exc.line(config_path_from_env(config))) from None
    except NodeError as exc:  # the TLS files, typically
        raise error_exit(exc) from None
    except OSError as exc:
        # Typically the port: in use, or below 1024 without the capability.
        raise fail(
            f"cannot start on {settings.node.host}:{settings.node.port}: {exc.strerror or exc}",
            code=1,
        ) from None


@app.command()
def worker(
    config: ConfigOption = None,
    device: Annotated[
        str | None,
        typer.Option(help="cuda:N or cpu for this process (default: pipeline.device)."),
    ] = None,
) -> None:
    """Run one worker of a cluster: claim jobs from the shared PostgreSQL database (until SIGTERM).

    A host runs one per GPU (systemd/mvi-node-worker@.service, instance = device), or a few on
    CPU. The receiving host's `serve` (cluster.role = receiver or all) queues the jobs.
    """

    from node.jobs.memory import hold_freed_memory
    from node.jobs.queue import serve_jobs
    from node.store.database import SchemaError, Store

    settings = _settings(config)
    # Before the pre-flight starts threads (node.jobs.memory).
    held = hold_freed_memory(settings.pipeline.worker_keep_memory_mb)
    if not settings.shared_database:
        raise fail(
            "mvi-node worker shares jobs through PostgreSQL: set database.url; on one host "
            "with SQLite, serve runs the workers itself (pipeline.workers)"
        )
    if device is not None:
        pipeline = settings.pipeline.model_copy(update={"device": device})
        settings = settings.model_copy(update={"pipeline": pipeline})
    _preflight(settings)
    try:
        store = Store(settings.database_url, schema="check")
    except SchemaError as exc:
        raise fail(exc.line(config_path_from_env(config))) from None
    get_logger("node.jobs.runner").info(
        "worker started",
        device=settings.pipeline.device,
        role=settings.cluster.role,
        memory_held=held,
        keep_memory_mb=settings.pipeline.worker_keep_memory_mb,
    )
    try:
        serve_jobs(store, settings, settings.pipeline.device)
    finally:
        store.close()


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="A [peers.NAME] of the configuration.")],
    config: ConfigOption = None,
) -> None:
    """C-ECHO a configured peer from the node's AE title."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node.core.dicom import SUCCESS, associate
    from node.requery.retrieve import resolve_peer

    settings = _settings(config)
    started = time.perf_counter()
    try:
        _, target = resolve_peer(settings, peer)
        assoc = associate(settings, target, [Verification])
    except NodeError as exc:  # an unusable peer, the TLS files
        raise error_exit(exc) from None
    if not assoc.is_established:
        raise fail(
            f"{peer} ({target.ae_title}@{target.host}:{target.port}): association "
            f"{'rejected' if assoc.is_rejected else 'failed'}; does the peer know "
            f"{settings.node.ae_title!r} from this host?",
            code=1,
        )
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != SUCCESS:
        raise fail(f"{peer}: C-ECHO answered {code if code is not None else 'nothing'}", code=1)
    elapsed = (time.perf_counter() - started) * 1000
    out.print(f"{peer} ({target.ae_title}@{target.host}:{target.port}): success, {elapsed:.0f} ms")


@studies_app.command("list")
def studies_list(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest studies shown.")] = 50,
    show_identifiers: Annotated[
        bool,
        typer.Option("--show-identifiers", help="Show patient ID, accession number and UID."),
    ] = False,
) -> None:
    """Studies received, newest first: state, phases chosen, counts."""
    settings = _settings(config)
    store = _store(settings, config)
    rows = store.list_studies(limit)
    table = Table(title=f"studies in {settings.database_url.split('@')[-1]}")
    columns = [
        "study key",
        "state",
        "instances",
        "arterial",
        "portal venous",
        "pairing",
        "checks",
        "SEGs not used",
        "reason",
    ]
    if show_identifiers:
        columns += ["patient ID", "accession", "study UID"]
    for column in columns:
        table.add_column(column)
    for row in rows:
        pairing = row.pairing or {}
        cells = [
            row.study_key,
            row.state,
            str(row.instance_count),
            uid_key(pairing["arterial"]) if pairing.get("arterial") else "-",
            uid_key(pairing["portal_venous"]) if pairing.get("portal_venous") else "-",
            str(pairing.get("pairing") or pairing.get("method") or "-"),
            *_checks_cells(store.latest_result(row.study_uid)),
            row.reason or "",
        ]
        if show_identifiers:
            cells += [row.patient_id or "", row.accession_number or "", row.study_uid]
        table.add_row(*cells)
    out.print(table)


@studies_app.command("show")
def studies_show(
    study: Annotated[str, typer.Argument(help="Study key (as `studies list` shows) or UID.")],
    config: ConfigOption = None,
) -> None:
    """One study in full: series, the phases chosen and why, checks, results, jobs, outbox."""
    settings = _settings(config)
    store = _store(settings, config)
    study_uid = store.find_study(study)
    if study_uid is None:
        raise fail(f"no study {study!r} in the store (see `mvi-node studies list`)")
    row = store.study(study_uid)
    assert row is not None
    show = functools.partial(out.print, markup=False, highlight=False, soft_wrap=True)
    show(
        f"study {row.study_key}: {row.state}{f' ({row.reason})' if row.reason else ''}; "
        f"{row.instance_count} instances; first {_when(row.first_received_at)}, last "
        f"{_when(row.last_received_at)}"
    )
    series_table = Table(title="series")
    for column in ("number", "key", "description", "modality", "instances", "use", "UID"):
        series_table.add_column(column)
    pairing = row.pairing or {}
    roles = {pairing.get("arterial"): "arterial", pairing.get("portal_venous"): "portal venous"}
    for item in store.study_series(study_uid):
        use = roles.get(item.series_uid) or (
            "node output" if item.own_output else "" if item.analysable else "not analysed"
        )
        series_table.add_row(
            str(item.series_number if item.series_number is not None else "-"),
            uid_key(item.series_uid),
            item.series_description or "",
            item.modality or "",
            str(item.instance_count),
            use,
            item.series_uid,
        )
    out.print(series_table)
    if pairing:
        evidence = {k: v for k, v in pairing.items() if k not in ("arterial", "portal_venous")}
        show(f"phases: {json.dumps(evidence, default=str, sort_keys=True)}")
    latest = store.latest_result(study_uid)
    if latest is not None:
        result = latest.result
        show(
            f"result of job {latest.job_id}: {result.status}"
            f"{f' ({result.reason})' if result.reason else ''}; MVI probability "
            f"{result.mvi_probability if result.mvi_probability is not None else '-'}, risk "
            f"{result.risk_category or '-'}"
        )
        if not result.gates:
            show("  checks: none ran (gates.enabled = false)")
        for gate in result.gates:
            mark = {True: "passed", False: "FAILED", None: "not run"}[gate.passed]
            show(f"  check {gate.name}: {mark}; {gate.text}")
    jobs_table = Table(title="jobs")
    for column in ("job", "state", "attempts", "created", "finished", "reason"):
        jobs_table.add_column(column)
    for job in store.list_jobs(50, study_uid=study_uid):
        jobs_table.add_row(
            str(job.id),
            job.state,
            str(job.attempts),
            _when(job.created_at),
            _when(job.finished_at),
            job.reason or "",
        )
    out.print(jobs_table)
    outbox_table = Table(title="outbox")
    for column in ("id", "job", "destination", "state", "attempts", "last answer"):
        outbox_table.add_column(column)
    for delivery in store.list_outbox(include_sent=True, limit=10_000):
        if delivery.study_uid == study_uid:
            outbox_table.add_row(
                str(delivery.id),
                str(delivery.job_id),
                delivery.destination,
                delivery.state,
                str(delivery.attempts),
                delivery.last_status or "",
            )
    out.print(outbox_table)


def _when(moment: dt.datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _checks_cells(stored: StoredResult | None) -> tuple[str, str]:
    """The latest result's quality checks (✓ passed, ✗ failed, – not run) and unused SEGs."""
    if stored is None:
        return "", ""
    result = stored.result
    marks = {True: "✓", False: "✗", None: "–"}
    checks = " ".join(f"{marks[g.passed]}{g.name}" for g in result.gates)
    rejected = result.segmentation.rejected if result.segmentation is not None else []
    return checks, "; ".join(f"{r.label}: {r.reason}" for r in rejected)


@studies_app.command("reprocess")
def studies_reprocess(
    study: Annotated[str, typer.Argument(help="Study key (as `studies list` shows) or UID.")],
    arterial: Annotated[
        str | None,
        typer.Option(
            help="Force this series as the arterial phase: its series number, series key or UID."
        ),
    ] = None,
    portal_venous: Annotated[
        str | None,
        typer.Option(
            "--portal-venous",
            help="Force this series as portal-venous: its series number, series key or UID.",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Analyse a study again (optionally with the phases an operator chose)."""
    settings = _settings(config)
    if (arterial is None) != (portal_venous is None):
        raise fail("give both --arterial and --portal-venous, or neither")
    store = _store(settings, config)
    study_uid = store.find_study(study)
    if study_uid is None:
        raise fail(f"no study {study!r} in the store (see `mvi-node studies list`)")
    forced = None
    if arterial is not None and portal_venous is not None:
        # Checked before anything is queued: a wrong series turned a done study into
        # needs_review.
        candidates = [s for s in store.study_series(study_uid) if s.analysable]
        chosen = (
            _series_named(arterial, "--arterial", candidates, study_uid),
            _series_named(portal_venous, "--portal-venous", candidates, study_uid),
        )
        if chosen[0] == chosen[1]:
            raise fail("--arterial and --portal-venous name the same series")
        forced = chosen
    job_id = store.reprocess(study_uid, forced)
    _audit(
        store, "reprocess", study_key(study_uid), {"job_id": job_id, "series_chosen": bool(forced)}
    )
    out.print(f"job {job_id} queued for study {study_key(study_uid)}; `mvi-node serve` runs it")


def _series_named(name: str, option: str, candidates: list[Series], study_uid: str) -> str:
    """The SeriesInstanceUID ``name`` means among a study's analysable series, or exit 2.

    ``name`` is a series number, a series key (as `studies list` shows) or a SeriesInstanceUID.
    """
    wanted = name.strip()
    matches = [
        s
        for s in candidates
        if wanted in (s.series_uid, uid_key(s.series_uid))
        or (wanted.isdigit() and s.series_number == int(wanted))
    ]
    if len(matches) == 1:
        return matches[0].series_uid
    listed = ", ".join(
        f"{s.series_number if s.series_number is not None else '-'} "
        f"({uid_key(s.series_uid)}, {s.series_description or 'no description'})"
        for s in candidates
    )
    problem = "names more than one series" if matches else "is not a CT series of the study"
    raise fail(
        f"{option} {wanted!r} {problem} {study_key(study_uid)}; its CT series are: "
        f"{listed or 'none'} (give a series number, key or UID)"
    )


def _audit(store: Store, action: str, target: str | None, detail: dict[str, Any]) -> None:
    """Operator commands go into the console's audit log too, under the host account's name."""
    import getpass

    try:
        user = f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        user = f"cli:uid {os.getuid()}"
    store.accounts().log(
        action, "ok", user_name=user[:64], role=None, client="cli", target=target, detail=detail
    )


MIN_PASSWORD = 10


def _new_password(name: str) -> str:
    """A new password: prompted twice on a terminal, else the first line of standard input."""
    import getpass

    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {name}: ")
        if getpass.getpass("again: ") != password:
            raise fail("the two passwords differ; nothing changed")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < MIN_PASSWORD:
        raise fail(f"the password needs at least {MIN_PASSWORD} characters; nothing changed")
    return password


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[
        str, typer.Option(help="viewer (reads), operator (also acts), admin (also the audit log).")
    ] = "viewer",
    replace: Annotated[
        bool, typer.Option("--replace", help="Give an existing account this role and password.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Add a console account; the password is prompted for (or read from standard input)."""
    from node.store.accounts import ROLES
    from node.store.database import SchemaError, Store, database_file
    from node.web.auth import hash_password, valid_user_name

    settings = _settings(config)
    if not valid_user_name(name):
        raise fail(f"user name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-'")
    if role not in ROLES:
        raise fail(f"--role {role!r}: one of {', '.join(ROLES)}")
    # Before the first `serve` too: the embedded database is created as serve would create it.
    try:
        store = Store(settings.database_url, schema="check" if settings.database.url else "upgrade")
    except SchemaError as exc:
        raise fail(exc.line(config_path_from_env(config))) from None
    accounts = store.accounts()
    if accounts.user(name) is not None and not replace:
        raise fail(f"account {name!r} exists; --replace gives it a new role and password")
    created = accounts.save_user(name, role, hash_password(_new_password(name)))
    where = database_file(settings.database_url) or settings.database_url.split("@")[-1]
    _audit(store, "account_added" if created else "account_replaced", name, {"role": role})
    out.print(
        f"account {name} ({role}) {'added' if created else 'replaced'} in {where}",
        markup=False,
        highlight=False,
    )


@users_app.command("list")
def users_list(config: ConfigOption = None) -> None:
    """The console's accounts and their roles."""
    settings = _settings(config)
    table = Table(title="console accounts")
    for column in ("name", "role", "created", "password changed"):
        table.add_column(column)
    for account in _store(settings, config).accounts().list_users():
        table.add_row(
            account.name,
            account.role,
            _when(account.created_at),
            _when(account.password_changed_at),
        )
    out.print(table)


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="User name.")], config: ConfigOption = None
) -> None:
    """Delete a console account and end its logins."""
    settings = _settings(config)
    store = _store(settings, config)
    if not store.accounts().remove_user(name):
        raise fail(f"no account {name!r}", code=1)
    _audit(store, "account_removed", name, {})
    out.print(f"account {name} removed", markup=False, highlight=False)


@jobs_app.command("list")
def jobs_list(
    config: ConfigOption = None,
    limit: Annotated[int, typer.Option(min=1, help="Newest jobs shown.")] = 50,
) -> None:
    """Jobs, newest first: state, attempts, reason."""
    settings = _settings(config)
    table = Table(title="jobs")
    for column in ("id", "study key", "state", "attempts", "created", "reason"):
        table.add_column(column)
    for row in _store(settings, config).list_jobs(limit):
        table.add_row(
            str(row.id),
            study_key(row.study_uid),
            row.state,
            str(row.attempts),
            row.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            (row.reason or "")[:80],
        )
    out.print(table)


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[int, typer.Argument(help="Job id (see `jobs list`).")],
    config: ConfigOption = None,
) -> None:
    """Cancel a queued job (a running job finishes)."""
    settings = _settings(config)
    store = _store(settings, config)
    if not store.cancel_job(job_id):
        raise fail(f"job {job_id} is not queued (only queued jobs can be cancelled)", code=1)
    _audit(store, "cancel_job", f"job {job_id}", {"job_id": job_id})
    out.print(f"job {job_id} cancelled")


@outbox_app.command("list")
def outbox_list(
    config: ConfigOption = None,
    all_items: Annotated[bool, typer.Option("--all", help="Include delivered items.")] = False,
) -> None:
    """Result objects pending or failed (newest first), with the last status of each."""
    from node.deliver.outbox import list_outbox

    settings = _settings(config)
    rows = list_outbox(_store(settings, config), include_sent=all_items)
    table = Table(title="outbox")
    for column in ("id", "study key", "destination", "state", "tries", "next try", "last status"):
        table.add_column(column)
    for row in rows:
        next_try = row.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S") if row.next_attempt_at else "-"
        table.add_row(
            str(row.id),
            study_key(row.study_uid),
            row.destination,
            row.state,
            str(row.attempts),
            next_try,
            row.last_status or "",
        )
    out.print(table)
    if not rows:
        out.print("nothing waiting")


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Item ids (default: every failed item).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Put failed result objects back in the queue (the running node sends them)."""
    from node.deliver.outbox import retry_failed

    settings = _settings(config)
    store = _store(settings, config)
    count = retry_failed(store, ids or ())
    _audit(store, "retry_outbox", None, {"outbox_ids": ids or "all failed", "count": count})
    out.print(f"{count} item(s) queued again")


@app.command()
def analyze(
    folder: Annotated[Path, typer.Argument(help="Folder of one study's DICOM files.")],
    out_dir: Annotated[Path, typer.Option("--out", help="Where result.json and the objects go.")],
    config: ConfigOption = None,
) -> None:
    """Analyse one study from a folder, offline: result.json, seg.dcm, sr.dcm, sc.dcm."""
    from node.analysis.dicomio import scan_folder
    from node.analysis.models import Models
    from node.analysis.pipeline import analyse_study, write_outputs

    settings = _settings(config)
    if not folder.is_dir():
        raise fail(f"{folder}: not a folder")
    studies = scan_folder(folder)
    if not studies:
        raise fail(f"{folder}: no DICOM files found")
    if len(studies) > 1:
        keys = ", ".join(study_key(uid) for uid in studies)
        raise fail(f"{folder} holds {len(studies)} studies ({keys}); give one study's folder")
    ((study_uid, series),) = studies.items()
    models = Models(settings, device=settings.pipeline.device)
    try:
        analysis = analyse_study(study_uid, series, settings, models)
    except NodeError as exc:  # no segmenter
        raise error_exit(exc) from None
    written = write_outputs(analysis, out_dir)
    result = analysis.result
    tumor, loat = result.tumor, result.loat
    table = Table(title=f"study {study_key(study_uid)}: {result.status}")
    table.add_column("item")
    table.add_column("value")
    rows = [
        ("status", result.status + (f" ({result.reason})" if result.reason else "")),
        ("MVI probability", _percent(result.mvi_probability)),
        ("combined probability", _percent(result.combined_probability)),
        ("risk", str(result.risk_category or "-")),
        ("max tumor diameter", _value(tumor.max_diameter_mm if tumor else None, "mm")),
        ("LOAT max area", _value(loat.max_area_cm2 if loat else None, "cm²")),
        ("segmentation", result.segmentation.source if result.segmentation else "-"),
        ("timings", ", ".join(f"{k} {v:.1f}s" for k, v in result.timings_s.items())),
        ("files", ", ".join(str(p) for p in [*written.values(), out_dir / "result.json"])),
    ]
    for name, value in rows:
        table.add_row(name, value)
    out.print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f} %"


def _value(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.1f} {unit}"


def _parse_dates(value: str | None) -> tuple[dt.date, dt.date] | None:
    if value is None:
        return None
    try:
        start_text, end_text = value.split(":")
        start, end = dt.date.fromisoformat(start_text), dt.date.fromisoformat(end_text)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r}: expected FROM:TO as YYYY-MM-DD:YYYY-MM-DD", param_hint="--dates"
        ) from None
    if end < start:
        raise typer.BadParameter(f"{value!r}: TO is before FROM", param_hint="--dates")
    return start, end


def _parse_phases(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    phases: list[str] = []
    for name in (part.strip().lower() for part in value.split(",") if part.strip()):
        if name not in PHASE_ALIASES:
            raise typer.BadParameter(
                f"unknown phase {name!r}; use non_contrast, arterial, portal_venous, delayed",
                param_hint="--phases",
            )
        if PHASE_ALIASES[name] not in phases:
            phases.append(PHASE_ALIASES[name])
    if not phases:
        raise typer.BadParameter("name at least one phase", param_hint="--phases")
    from model.phantom import PHASE_NAMES

    return tuple(p for p in PHASE_NAMES if p in phases)


PHASE_ABBREVIATIONS = {
    "localizer": "LOC",
    "non_contrast": "NC",
    "arterial": "AP",
    "portal_venous": "PVP",
    "delayed": "DP",
}

#: What a previous run of `mvi-node phantom` leaves in its output folder (``--force`` removes it).
_PHANTOM_OUTPUTS = ("study_*", "masks", "labels.csv", "truth.csv")


def _prepare_output(folder: Path, force: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise fail(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not force:
            raise fail(f"{folder} is not empty; choose an empty folder or pass --force to replace")
        for pattern in _PHANTOM_OUTPUTS:
            for path in folder.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()


@app.command()
def phantom(
    output: Annotated[Path, typer.Argument(help="Output folder (empty or new).")],
    studies: Annotated[int, typer.Option(min=1, max=10000, help="Number of studies.")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Cohort seed; same seed, same cohort.")] = 0,
    size: Annotated[int, typer.Option(min=32, max=1024, help="Rows and columns.")] = 256,
    slices: Annotated[int, typer.Option(min=8, max=1000, help="Slices per series.")] = 64,
    masks: Annotated[
        bool, typer.Option("--masks", help="Truth masks as NRRD under OUTPUT/masks/.")
    ] = False,
    seg: Annotated[
        bool, typer.Option("--seg", help="A manual DICOM SEG of the truth in each study.")
    ] = False,
    no_tumor: Annotated[bool, typer.Option("--no-tumor", help="Livers without a tumor.")] = False,
    phases: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated subset: non_contrast, arterial, portal_venous, delayed."
        ),
    ] = None,
    no_descriptions: Annotated[
        bool,
        typer.Option("--no-descriptions", help="Empty SeriesDescription and ProtocolName."),
    ] = False,
    dates: Annotated[
        str | None, typer.Option(help="Spread study dates over FROM:TO (YYYY-MM-DD:YYYY-MM-DD).")
    ] = None,
    non_liver: Annotated[
        bool, typer.Option("--non-liver", help="CT of another region, no contrast phases.")
    ] = False,
    enhanced: Annotated[
        bool, typer.Option("--enhanced", help="Enhanced CT multi-frame series.")
    ] = False,
    domain: Annotated[
        DomainKind,
        typer.Option(
            help=(
                "standard; randomised (the segmenter's training ranges) or shifted (beyond "
                "them, for evaluation): see model/domain.py. Slices then follow the drawn "
                "coverage and spacing."
            )
        ),
    ] = DomainKind.STANDARD,
    sites: Annotated[
        int,
        typer.Option(
            min=0,
            max=3,
            help=(
                "Deal patients to this many centres (model/site.py: noise, kernel, HU offset, "
                "case mix); labels.csv gains patient_id and centre."
            ),
        ),
    ] = 0,
    repeat_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of patients with a second study (same patient ID, tumour and label).",
        ),
    ] = 0.0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a previous phantom cohort in OUTPUT.")
    ] = False,
) -> None:
    """Write a synthetic cohort of multi-phase liver CT studies with labels.csv and truth.csv."""
    from node.offline.phantom_study import CohortOptions, write_cohort

    log = get_logger("phantom")
    try:
        options = CohortOptions(
            studies=studies,
            seed=seed,
            size=size,
            slices=slices,
            masks=masks,
            seg=seg,
            tumor=not no_tumor,
            phases=_parse_phases(phases),
            descriptions=not no_descriptions,
            dates=_parse_dates(dates),
            non_liver=non_liver,
            enhanced=enhanced,
            domain=domain.value,
            sites=sites,
            repeat_share=repeat_share,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--sites / --repeat-share") from exc
    _prepare_output(output, force)
    started = time.perf_counter()
    table = Table(title=f"phantom cohort in {output}")
    for column in ("study", "mvi", "max diam mm", "tumor ml", "LOAT cm²", "LOAT ml", "phases"):
        table.add_column(column)
    with Progress(
        TextColumn("[bold]phantom"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("studies", total=studies)

        def on_study(written: object) -> None:
            from node.offline.phantom_study import WrittenStudy

            assert isinstance(written, WrittenStudy)
            truth = written.phantom.truth
            log.info(
                "study written",
                study_key=study_key(written.study_instance_uid),
                folder=written.folder.name,
                series=len(written.files),
            )
            table.add_row(
                written.folder.name,
                "-" if truth.mvi is None else str(truth.mvi),
                f"{truth.max_diameter_mm:.1f}",
                f"{truth.tumor_volume_ml:.1f}",
                f"{truth.loat_max_area_cm2:.2f}",
                f"{truth.loat_volume_ml:.1f}",
                " ".join(PHASE_ABBREVIATIONS.get(p, p) for p in written.files),
            )
            progress.advance(task)

        write_cohort(output, options, on_study=on_study)
    elapsed = time.perf_counter() - started
    size_mb = sum(p.stat().st_size for p in output.rglob("*") if p.is_file()) / 1e6
    out.print(table)
    out.print(f"{studies} studies, {size_mb:.1f} MB, {elapsed:.1f} s → {output}", markup=False)
    log.info("cohort written", studies=studies, seconds=round(elapsed, 2), megabytes=size_mb)


INSPECT_COLUMNS = ("series key", "description", "images", "size", "spacing mm", "HU min/mean/max")


@app.command()
def inspect(
    folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (searched recursively).")],
) -> None:
    """Load every series of a folder of DICOM files and print its geometry and HU range."""
    from node.analysis.dicomio import DicomIOError, load_series, scan_folder

    if not folder.is_dir():
        raise fail(f"{folder}: not a folder")
    studies = scan_folder(folder)
    if not studies:
        raise fail(f"{folder}: no DICOM files found", code=1)
    for study_uid, series_map in studies.items():
        table = Table(title=f"study {study_key(study_uid)}")
        for column in INSPECT_COLUMNS:
            table.add_column(column)
        for series in sorted(series_map.values(), key=lambda s: s.series_description):
            row = [uid_key(series.series_instance_uid), series.series_description or "(none)"]
            if series.modality != "CT":
                table.add_row(*row, str(len(series.paths)), series.modality, "", "")
                continue
            try:
                import SimpleITK as sitk

                image = load_series(series.paths)
                array = sitk.GetArrayViewFromImage(image)
                spacing = "×".join(f"{s:.2f}" for s in image.GetSpacing())
                size_text = "×".join(str(s) for s in image.GetSize())
                hu = f"{array.min():.0f} / {array.mean():.0f} / {array.max():.0f}"
                table.add_row(*row, str(len(series.paths)), size_text, spacing, hu)
            except DicomIOError as exc:
                table.add_row(*row, str(len(series.paths)), "error", str(exc), "")
        out.print(table)


@app.command("train-seg")
def train_seg(
    studies: Annotated[
        Path | None,
        typer.Option(
            "--studies",
            help="Folder of DICOM studies with truth masks in DIR/masks/<study>/*.nrrd.",
        ),
    ] = None,
    phantoms: Annotated[
        int | None,
        typer.Option(min=1, max=10000, help="Train on N phantom studies rendered in memory."),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Checkpoint folder (default with --phantoms: the demo model cache)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seeds phantoms, sampling and weights.")] = 0,
    iterations: Annotated[
        int | None,
        typer.Option(min=1, help="Optimiser steps (default 1500 with --phantoms, else 4000)."),
    ] = None,
    spacing: Annotated[float, typer.Option(help="Isotropic working spacing in mm.")] = 2.0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    validation_fraction: Annotated[
        float, typer.Option(help="Share of studies held out for validation.")
    ] = 0.2,
    size: Annotated[
        int, typer.Option(min=32, max=1024, help="Phantom rows and columns (--phantoms).")
    ] = 256,
    slices: Annotated[
        int,
        typer.Option(min=8, max=1000, help="Phantom slices (--phantoms with --domain standard)."),
    ] = 64,
    domain: Annotated[
        str,
        typer.Option(
            help=(
                "Phantom appearance (--phantoms): randomised (anatomy, HU, noise, slices and "
                "artefacts drawn per study, see model/domain.py) or standard."
            )
        ),
    ] = "randomised",
    force: Annotated[bool, typer.Option("--force", help="Replace a checkpoint in --out.")] = False,
) -> None:
    """Train the liver / tumor / LOAT segmenter and write a checkpoint (weights + model card)."""
    from node.offline.train_seg import TrainSegOptions, run

    options = TrainSegOptions(
        studies=studies,
        phantoms=phantoms,
        out=out_dir,
        seed=seed,
        iterations=iterations,
        spacing_mm=spacing,
        device=device,
        validation_fraction=validation_fraction,
        force=force,
        size=size,
        slices=slices,
        domain=domain,
    )
    try:
        run(options, out=out, err=err)
    except NodeError as exc:  # bad options exit 2, a failed training 1
        raise error_exit(exc) from None


@app.command()
def train(
    studies: Annotated[Path, typer.Option("--studies", help="Folder of DICOM studies.")],
    labels: Annotated[
        Path,
        typer.Option(
            "--labels", help="CSV: study_instance_uid,mvi and optionally patient_id, centre."
        ),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model folder to write.")],
    arch: Annotated[str, typer.Option(help="fusion or tumor-only.")] = "fusion",
    folds: Annotated[
        int, typer.Option(min=2, max=20, help="Cross-validation folds (ensemble members).")
    ] = 5,
    group_by: Annotated[
        str,
        typer.Option(
            "--group-by",
            help="What a fold never splits: patient (PatientID or the labels' patient_id), "
            "centre or study.",
        ),
    ] = "patient",
    cv: Annotated[
        str, typer.Option("--cv", help="kfold, or loco: leave one centre out per fold.")
    ] = "kfold",
    layout: Annotated[
        str,
        typer.Option(
            "--layout",
            help=(
                "region: branches tumour and LOAT; phase: branches arterial and portal-venous "
                "(tumour and fat slices as channels); phase-tiled: the same, crops side by side."
            ),
        ),
    ] = "region",
    init: Annotated[
        str, typer.Option("--init", help="random, or imagenet (needs --weights).")
    ] = "random",
    weights: Annotated[
        Path | None,
        typer.Option(
            "--weights", help="ResNet18 ImageNet weights as safetensors (convert-weights)."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Most epochs per fold.")] = 30,
    roi_size: Annotated[int, typer.Option(min=16, max=512, help="ROI rows/columns.")] = 128,
    crop: Annotated[
        str,
        typer.Option(
            "--crop",
            help="box: bounding box + margin, stretched; square: aspect kept; fixed: a square "
            "of --field-mm, physical size kept.",
        ),
    ] = "box",
    field_mm: Annotated[
        float, typer.Option("--field-mm", min=10.0, help="Side of the fixed crop, mm.")
    ] = 100.0,
    roi_slices: Annotated[
        int,
        typer.Option(
            "--roi-slices",
            min=1,
            max=15,
            help="Axial slices per phase around the key slice (odd): 3 is the paper's 2.5D.",
        ),
    ] = 3,
    augment: Annotated[
        str,
        typer.Option(
            "--augment", help="light, or strong: adds zoom, HU offset, kernel blur and noise."
        ),
    ] = "light",
    size_target: Annotated[
        float,
        typer.Option(
            "--size-target",
            min=0.0,
            help="Weight of an auxiliary loss on the tumour's log diameter (0: off).",
        ),
    ] = 0.0,
    label_source: Annotated[
        str,
        typer.Option(
            "--label-source", help="Where the MVI labels come from (the card's TRIPOD+AI items)."
        ),
    ] = "histopathology of the resected specimen (labels file)",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    config: ConfigOption = None,
) -> None:
    """Train the MVI model on labelled studies; writes weights.safetensors + model_card.json.

    The model shipped is the ensemble of the fold networks, calibrated on their out-of-fold
    predictions.
    """
    import numpy as np

    from model.fusion import LAYOUTS
    from model.roi import CROPS, RoiSpec
    from model.train import AUGMENTATIONS, CV_SCHEMES, GROUPINGS, make_folds, train_fusion
    from node.analysis.models import Models
    from node.offline.train_fusion import read_labels, study_rois
    from node.offline.tripod import tripod_section

    settings = _settings(config)
    if arch not in ("fusion", "tumor-only"):
        raise fail(f"--arch {arch!r}: use fusion or tumor-only")
    if group_by not in GROUPINGS:
        raise fail(f"--group-by {group_by!r}: use {', '.join(GROUPINGS)}")
    if cv not in CV_SCHEMES:
        raise fail(f"--cv {cv!r}: use {', '.join(CV_SCHEMES)}")
    if layout not in LAYOUTS:
        raise fail(f"--layout {layout!r}: use {', '.join(LAYOUTS)}")
    if init not in ("random", "imagenet"):
        raise fail(f"--init {init!r}: use random or imagenet")
    if (init == "imagenet") != (weights is not None):
        raise fail("--init imagenet and --weights FILE go together")
    if weights is not None and (not weights.is_file() or weights.suffix != ".safetensors"):
        raise fail(
            f"--weights {weights}: not a .safetensors file (turn a torchvision .pth into one "
            "with `mvi-node convert-weights`)"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise fail(f"--out {out_dir} is not empty; choose an empty folder")
    if not studies.is_dir():
        raise fail(f"--studies {studies}: not a folder")
    try:
        label_map = read_labels(labels)
    except NodeError as exc:
        raise error_exit(exc) from None
    if crop not in CROPS:
        raise fail(f"--crop {crop!r}: use {', '.join(CROPS)}")
    if augment not in AUGMENTATIONS:
        raise fail(f"--augment {augment!r}: use {', '.join(AUGMENTATIONS)}")
    if roi_slices % 2 == 0:
        raise fail(f"--roi-slices {roi_slices}: use an odd number (the key slice in the middle)")
    spec = RoiSpec(size=roi_size, crop=crop, field_mm=field_mm, slices=roi_slices)
    models = Models(settings, device=device)
    try:
        samples, skipped = study_rois(
            studies, label_map, settings, models, spec, settings.node.data_dir / "roi-cache"
        )
    except NodeError as exc:  # no segmenter
        raise error_exit(exc) from None
    for skip in skipped:
        err.print(f"skipped {skip.key}: {skip.reason}", markup=False, highlight=False)
    positives = sum(s.label for s in samples)
    if cv == "kfold" and (positives < folds or len(samples) - positives < folds):
        raise fail(
            f"{len(samples)} usable studies ({positives} with MVI): each class needs at least "
            f"{folds} studies for {folds}-fold cross-validation"
        )
    try:  # a centre with one class, too few patients of a class: said before any training
        make_folds(
            samples,
            np.asarray([s.label for s in samples]),
            cv=cv,
            group_by=group_by,
            folds=folds,
            seed=seed,
        )
    except ValueError as exc:
        raise fail(f"{labels}: {exc}") from None
    tripod = tripod_section(
        studies=len(samples),
        patients=len({s.patient for s in samples}),
        positives=positives,
        centres=sorted({s.centre for s in samples if s.centre}),
        skipped=[(skip.key, skip.reason) for skip in skipped],
        label_source=label_source,
    )
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("training", total=None, status="")

        def on_epoch(
            stage: str, epoch: int, total: int, loss: float, val_auc: float | None
        ) -> None:
            auc_text = "" if val_auc is None else f", validation AUC {val_auc:.3f}"
            progress.update(
                task,
                description=f"training {stage}",
                completed=epoch,
                total=total,
                status=f"loss {loss:.3f}{auc_text}",
            )

        try:
            card = train_fusion(
                samples,
                out_dir,
                roi_spec=spec,
                arch=arch,
                folds=folds,
                cv=cv,
                group_by=group_by,
                epochs=epochs,
                seed=seed,
                device=device,
                layout=layout,
                pretrained=weights,
                augment=augment,
                size_target=size_target,
                demo=False,
                progress=on_epoch,
                card_extra={"tripod": tripod},
            )
        except ValueError as exc:  # e.g. out-of-fold logits that do not rise with the label
            raise fail(f"training failed: {str(exc).splitlines()[0]}", 1) from None
    metrics = card["oof_metrics"]
    training = card["training"]
    out.print(
        f"{arch}: {len(samples)} studies of {training['patients']} patients, "
        f"{training['folds']} folds ({training['cv']}, grouped by {training['group_by']}), "
        f"out-of-fold AUC {metrics['auc']:.3f} (95 % CI {metrics['ci95'][0]:.3f}–"
        f"{metrics['ci95'][1]:.3f}), sensitivity {metrics['sensitivity']:.2f}, specificity "
        f"{metrics['specificity']:.2f} at threshold {card['threshold']:.3f} → {out_dir}"
    )


def _check_overlap(name: str, overlap: dict[str, Any], allow: bool, hint: str) -> None:
    """Refuse studies or patients the model trained on (``training_overlap``) unless allowed."""
    if not overlap["checked"]:
        err.print(f"{name}: overlap not checked ({overlap['reason']})", markup=False)
    elif (overlap["studies"] or overlap["patients"]) and not allow:
        raise fail(
            f"{name} trained on {overlap['studies']} of these {overlap['test_studies']} "
            f"studies and {overlap['patients']} of their {overlap['test_patients']} patients: "
            f"{hint}"
        )


@app.command()
def evaluate(
    model_dir: Annotated[Path, typer.Option("--model", help="Model folder.")],
    studies: Annotated[Path, typer.Option("--studies", help="Folder of DICOM studies.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV: study_instance_uid,mvi.")],
    report: Annotated[Path, typer.Option("--out", help="report.json to write (ROC PNG beside).")],
    compare: Annotated[
        Path | None, typer.Option("--compare", help="A second model: paired DeLong test.")
    ] = None,
    allow_overlap: Annotated[
        bool,
        typer.Option(
            "--allow-overlap",
            help="Evaluate even on studies or patients the model trained on (reported).",
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """AUC with DeLong CI, sensitivity/specificity at the card's threshold, Brier, ROC PNG.

    Refuses a test set that shares studies or patients with the model's training set (the card's
    hashed identifiers) unless --allow-overlap.
    """
    import json as json_module

    from model.checkpoint import CheckpointError
    from model.inference import FusionModel
    from model.stats import delong_test
    from node.analysis.models import Models
    from node.offline.train_fusion import evaluate as score
    from node.offline.train_fusion import read_labels, roc_png, study_rois, training_overlap
    from node.offline.tripod import render_report

    settings = _settings(config)
    try:
        label_map = read_labels(labels)
        first = FusionModel.load(model_dir)
        second = FusionModel.load(compare) if compare is not None else None
    except (NodeError, CheckpointError) as exc:
        raise fail(str(exc).splitlines()[0]) from None
    models = Models(settings)
    cache = settings.node.data_dir / "roi-cache"
    try:
        samples, skipped = study_rois(studies, label_map, settings, models, first.spec, cache)
    except NodeError as exc:  # no segmenter
        raise error_exit(exc) from None
    if len({s.label for s in samples}) < 2:
        raise fail(f"{len(samples)} usable studies: both classes are needed for an AUC")
    overlaps = {str(model_dir): training_overlap(first.card, samples)}
    if second is not None and compare is not None:
        overlaps[str(compare)] = training_overlap(second.card, samples)
    for name, overlap in overlaps.items():
        _check_overlap(
            name,
            overlap,
            allow_overlap,
            "a test set must be new (--allow-overlap to evaluate anyway)",
        )
    results = {str(model_dir): score(first, samples)}
    curves = {
        first.card.get("name", "model"): (
            results[str(model_dir)]["labels"],
            results[str(model_dir)]["probabilities"],
        )
    }
    body: dict[str, Any] = {
        "skipped": [{"study_key": s.key, "reason": s.reason} for s in skipped],
        "training_overlap": overlaps,
    }
    if second is not None and compare is not None:
        other = score(second, samples)
        results[str(compare)] = other
        curves[f"{second.card.get('name', 'other')} (compare)"] = (
            other["labels"],
            other["probabilities"],
        )
        auc1, auc2, z, p_value = delong_test(
            results[str(model_dir)]["labels"],
            results[str(model_dir)]["probabilities"],
            other["probabilities"],
        )
        body["delong"] = {"auc": [auc1, auc2], "z": z, "p": p_value}
    body["models"] = {
        name: {k: v for k, v in r.items() if k not in ("probabilities", "labels")}
        for name, r in results.items()
    }
    report.parent.mkdir(parents=True, exist_ok=True)
    png = report.with_suffix(".roc.png")
    roc_png(png, curves)
    body["roc_png"] = png.name
    markdown = report.with_suffix(".md")
    markdown.write_text(
        render_report(first.card, results[str(model_dir)], overlaps[str(model_dir)]),
        encoding="utf-8",
    )
    body["report_md"] = markdown.name
    body["tripod"] = first.card.get("tripod")
    report.write_text(json_module.dumps(body, indent=2))
    summary = body["models"][str(model_dir)]
    out.print(
        f"AUC {summary['auc']:.3f} (95 % CI {summary['auc_ci95'][0]:.3f}–"
        f"{summary['auc_ci95'][1]:.3f}), sensitivity {summary['sensitivity']:.2f}, specificity "
        f"{summary['specificity']:.2f}, Brier {summary['brier']:.3f} at threshold "
        f"{summary['threshold']:.3f} on {summary['studies']} studies → {report}"
    )
    combined = summary.get("combined_model", {})
    if "sensitivity" in combined:
        out.print(
            f"combined model: AUC {combined['auc']:.3f}, sensitivity "
            f"{combined['sensitivity']:.2f}, specificity {combined['specificity']:.2f} at its "
            f"threshold {combined['threshold']:.3f}"
        )


@app.command()
def recalibrate(
    model_dir: Annotated[Path, typer.Option("--model", help="Model folder to recalibrate.")],
    studies: Annotated[Path, typer.Option("--studies", help="Folder of local DICOM studies.")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV: study_instance_uid,mvi.")],
    out_dir: Annotated[Path, typer.Option("--out", help="New model folder to write.")],
    threshold: Annotated[
        str,
        typer.Option(
            "--threshold",
            help="keep: the card's threshold probability; youden: chosen on the local studies.",
        ),
    ] = "keep",
    allow_overlap: Annotated[
        bool, typer.Option("--allow-overlap", help="Accept studies the model trained on.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Refit only the calibration's intercept and slope on a site's own labelled studies.

    The networks are unchanged (the weights are copied); the new card records the previous
    calibration and the local Brier score, calibration and sensitivity/specificity before and
    after.
    """
    import numpy as np

    from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from model.inference import FusionModel
    from model.train import FUSION_CARD_KEYS, THRESHOLD_RULES, recalibrated_card
    from node.analysis.models import Models
    from node.offline.train_fusion import read_labels, study_rois, training_overlap

    settings = _settings(config)
    if threshold not in THRESHOLD_RULES:
        raise fail(f"--threshold {threshold!r}: use {', '.join(THRESHOLD_RULES)}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise fail(f"--out {out_dir} is not empty; choose an empty folder")
    try:
        label_map = read_labels(labels)
        model = FusionModel.load(model_dir)
        state, card = load_checkpoint(model_dir, required=FUSION_CARD_KEYS)
    except (NodeError, CheckpointError) as exc:
        raise fail(str(exc).splitlines()[0]) from None
    try:
        samples, skipped = study_rois(
            studies,
            label_map,
            settings,
            Models(settings),
            model.spec,
            settings.node.data_dir / "roi-cache",
        )
    except NodeError as exc:
        raise error_exit(exc) from None
    for skip in skipped:
        err.print(f"skipped {skip.key}: {skip.reason}", markup=False, highlight=False)
    y = np.asarray([s.label for s in samples])
    if min(int(y.sum()), int(y.size - y.sum())) < 2:
        raise fail(f"{len(samples)} usable studies: each class needs at least 2")
    _check_overlap(
        str(model_dir),
        training_overlap(card, samples),
        allow_overlap,
        "recalibrate on studies it has not seen (--allow-overlap to go on)",
    )
    logits = [p.logit for p in model.predict([{"tumor": s.tumor, "loat": s.loat} for s in samples])]
    try:
        updated = recalibrated_card(card, logits, y, threshold_rule=threshold)
    except ValueError as exc:
        raise fail(f"recalibration failed: {str(exc).splitlines()[0]}", 1) from None
    save_checkpoint(out_dir, state, updated)
    before, after = updated["calibration"]["local_before"], updated["calibration"]["local_after"]
    out.print(
        f"{len(samples)} local studies: Brier {before['brier']:.3f} → {after['brier']:.3f}, "
        f"calibration slope {before['calibration_slope']} → {after['calibration_slope']}, "
        f"sensitivity {after['sensitivity']:.2f}, specificity {after['specificity']:.2f} at "
        f"threshold {updated['threshold']:.3f} → {out_dir}"
    )


@app.command("convert-weights")
def convert_weights_command(
    source: Annotated[Path, typer.Argument(help="torchvision ResNet18 weights (.pth).")],
    target: Annotated[Path, typer.Argument(help="The safetensors file to write.")],
) -> None:
    """Turn pretrained torchvision weights into safetensors, the only format the node loads.

    The .pth is read with ``torch.load(weights_only=True)``: tensors only, no code runs.
    """
    from model.fusion import convert_weights

    if not source.is_file():
        raise fail(f"{source}: no such file")
    if target.exists():
        raise fail(f"{target} exists; choose another name")
    try:
        count = convert_weights(source, target)
    except ValueError as exc:
        raise fail(str(exc).splitlines()[0]) from None
    out.print(f"{count} tensors → {target}")


def _date_option(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise fail(f"{name} {value!r}: expected a date as YYYY-MM-DD") from None


@app.command()
def requery(
    since: Annotated[str, typer.Option(help="First StudyDate, YYYY-MM-DD.")],
    until: Annotated[str, typer.Option(help="Last StudyDate, YYYY-MM-DD (inclusive).")],
    peer: Annotated[
        str | None, typer.Option(help="[peers.NAME] to query (default: requery.peer).")
    ] = None,
    modality: Annotated[str, typer.Option(help="ModalitiesInStudy to match.")] = "CT",
    description: Annotated[
        str | None, typer.Option(help="Regular expression searched in StudyDescription.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Move at most N studies.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be moved; move nothing.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for one study's result.")
    ] = 3600.0,
    config: ConfigOption = None,
) -> None:
    """Retrieve past studies from the PACS and score them (resumable; skips scored studies)."""
    import re

    from dicom_sr.enum import Status
    from node.requery.retrieve import (
        RequeryOptions,
        StudyCandidate,
        check_node_running,
        current_model,
        resolve_peer,
        run_requery,
    )

    settings = _settings(config)
    first, last = _date_option(since, "--since"), _date_option(until, "--until")
    assert first is not None and last is not None
    if last < first:
        raise fail(f"--until {until} is before --since {since}")
    if description is not None:
        try:
            re.compile(description)
        except re.error as exc:
            raise fail(f"--description {description!r} does not compile: {exc}") from None
    options = RequeryOptions(
        since=first,
        until=last,
        peer=peer,
        modality=modality or None,
        description=description,
        limit=limit,
        dry_run=dry_run,
        timeout_s=timeout,
    )
    # What can be wrong without the database is said first, in its own words (the node must be
    # running, and then its database exists).
    try:
        resolve_peer(settings, options.peer, dicomweb=True)
        if not dry_run:
            check_node_running(settings)
            current_model(settings)
    except NodeError as exc:
        raise error_exit(exc) from None
    store = _store(settings, config)
    # A candidate's outcome is its result's status, or how the re-query itself ended.
    finals = (*Status, "timed_out")
    counts = {"found": 0, "moved": 0, "scored": 0, "review": 0, "skipped": 0, "failed": 0}
    seen: dict[str, str] = {}
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
    task = progress.add_task("re-query", total=None, counts="")

    def on_change(candidate: StudyCandidate) -> None:
        before = seen.get(candidate.study_uid)
        seen[candidate.study_uid] = candidate.outcome
        if before is None:
            counts["found"] += 1
        if candidate.outcome == "moved":
            counts["moved"] += 1
        elif candidate.outcome in (Status.SCORED, Status.NO_TUMOR):
            counts["scored"] += 1
        elif candidate.outcome == "skipped":
            counts["skipped"] += 1
        elif candidate.outcome in (Status.NEEDS_REVIEW, Status.NOT_APPLICABLE):
            counts["review"] += 1
        elif candidate.outcome in ("move_failed", Status.FAILED, "timed_out"):
            counts["failed"] += 1
        done = sum(1 for o in seen.values() if o in (*finals, "skipped", "move_failed"))
        progress.update(
            task,
            total=len(seen),
            completed=done,
            counts=" · ".join(f"{k} {v}" for k, v in counts.items()),
        )

    try:
        with progress:
            summary = run_requery(settings, options, store, on_change)
    except NodeError as exc:  # no peer, PACS or node to talk to, the TLS files
        raise error_exit(exc) from None
    finally:
        store.close()
    table = Table(title="re-query" + (" (dry run: nothing moved)" if dry_run else ""))
    for column in ("study key", "date", "description", "arterial", "portal venous", "outcome"):
        table.add_column(column)
    table.add_column("reason", overflow="fold")
    for c in summary.candidates:
        table.add_row(
            c.key,
            c.study_date,
            c.description,
            str(len(c.arterial)),
            str(len(c.portal_venous)),
            "to move" if c.outcome == "to_move" else c.outcome,
            c.reason or "",
        )
    out.print(table)
    totals = summary.counts()
    out.print(
        f"found {len(summary.candidates)}: "
        + ", ".join(f"{name} {count}" for name, count in sorted(totals.items()))
    )
    failed = summary.count("move_failed", Status.FAILED, "timed_out")
    raise typer.Exit(1 if failed else 0)


@results_app.command("export")
def results_export(
    out_file: Annotated[Path, typer.Option("--out", help="CSV file to write.")],
    since: Annotated[str | None, typer.Option(help="First StudyDate, YYYY-MM-DD.")] = None,
    until: Annotated[str | None, typer.Option(help="Last StudyDate, YYYY-MM-DD.")] = None,
    identifiers: Annotated[
        str,
        typer.Option(
            help="Identifier columns: hashed (keyed with security.pseudonym_key), plain, none."
        ),
    ] = "hashed",
    config: ConfigOption = None,
) -> None:
    """Write every study's newest result as CSV (the input of `mvi-node audit`)."""
    from node.core.pseudonym import PseudonymKeyMissing
    from node.report.export import export_results

    if identifiers not in ("hashed", "plain", "none"):
        raise fail(f"--identifiers {identifiers!r}: choose hashed, plain or none")
    settings = _settings(config)
    first, last = _date_option(since, "--since"), _date_option(until, "--until")
    store = _store(settings, config)
    try:
        count = export_results(
            store,
            out_file,
            identifiers=identifiers,  # type: ignore[arg-type]
            key=settings.security.pseudonym_key.get_secret_value(),
            since=first,
            until=last,
        )
    except PseudonymKeyMissing as exc:
        raise fail(f"{exc}, or pass --identifiers plain|none") from None
    finally:
        store.close()
    out.print(f"{count} studies written to {out_file} (identifiers: {identifiers})")


def _register_audit() -> None:
    # The audit's heavy libraries (lifelines, pandas, matplotlib) load only when it runs.
    from node.report.audit import register

    register(app)


_register_audit()


def _register_demo() -> None:
    # node.offline.demo imports node.cli.main inside its command only, so this is not circular.
    from node.offline.demo import register

    register(app)


_register_demo()


#: Files the node writes hold patient data (spool, database, exports, reports): never readable
#: by other users, whatever the shell's umask (the systemd unit sets the same).
UMASK = 0o027


def main() -> None:
    """Console-script entry point."""
    os.umask(UMASK)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
