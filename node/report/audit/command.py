"""`mvi-node audit`: the command, a thin call into :func:`node.report.audit.report.run_audit`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from node.core.pseudonym import PseudonymKeyMissing
from node.report.audit.html import headline
from node.report.audit.inputs import AuditInputError, AuditOptions, JoinColumn, TimeUnit
from node.report.audit.report import run_audit


def _consoles() -> tuple[Console, Console]:
    # Off a terminal (pipes, CI logs) rich would wrap at 80 columns, as node.cli.main notes.
    out = Console() if sys.stdout.isatty() else Console(width=160)
    err = Console(stderr=True) if sys.stderr.isatty() else Console(stderr=True, width=160)
    return out, err


def register(app: typer.Typer) -> None:
    """Add the ``audit`` command to ``app``."""

    @app.command()
    def audit(
        results: Annotated[
            Path, typer.Option("--results", help="Results table from `mvi-node results export`.")
        ],
        followup: Annotated[
            Path,
            typer.Option("--followup", help="Follow-up CSV: key, time and event (0/1) columns."),
        ],
        out_dir: Annotated[Path, typer.Option("--out", help="Folder for the reports.")],
        pathology: Annotated[
            Path | None,
            typer.Option("--pathology", help="Pathology CSV: key and mvi (0/1) columns."),
        ] = None,
        join: Annotated[
            JoinColumn, typer.Option("--join", help="Identifier shared by the files.")
        ] = "study_instance_uid",
        time_col: Annotated[str, typer.Option("--time-col", help="Follow-up time column.")] = (
            "time"
        ),
        event_col: Annotated[
            str, typer.Option("--event-col", help="Follow-up event column (1 = event).")
        ] = "event",
        time_unit: Annotated[
            TimeUnit, typer.Option("--time-unit", help="Unit of the follow-up times.")
        ] = "months",
        covariates: Annotated[
            str,
            typer.Option(
                "--covariates", help="Comma-separated numeric follow-up columns to adjust for."
            ),
        ] = "",
        time_origin_col: Annotated[
            str | None,
            typer.Option(
                "--time-origin-col",
                help="Follow-up date column where time starts (e.g. surgery); studies dated "
                "after it are left out.",
            ),
        ] = None,
        config: Annotated[
            Path | None,
            typer.Option("--config", "-c", help="TOML configuration file (default: $MVI_CONFIG)."),
        ] = None,
    ) -> None:
        """Survival (KM, log-rank, Cox) and discrimination (AUC) audit of exported results."""
        from node.core.settings import ConfigError, load_settings

        out, err = _consoles()

        def fail(message: str) -> typer.Exit:
            err.print(f"mvi-node: {message}", markup=False, highlight=False, soft_wrap=True)
            return typer.Exit(2)

        try:
            settings = load_settings(config)
        except ConfigError as exc:
            problem = exc.problems[0] if exc.problems else str(exc)
            raise fail(f"{exc.source}: {problem}") from None
        try:
            options = AuditOptions(
                join=join,
                time_col=time_col,
                event_col=event_col,
                time_unit=time_unit,
                covariates=tuple(c.strip() for c in covariates.split(",") if c.strip()),
                time_origin_col=time_origin_col,
                pseudonym_key=settings.security.pseudonym_key.get_secret_value(),
            )
            report = run_audit(results, followup, out_dir, pathology_csv=pathology, options=options)
        except (AuditInputError, PseudonymKeyMissing) as exc:
            raise fail(str(exc).splitlines()[0]) from None

        table = Table(title="MVI audit", show_header=False)
        table.add_column("measure")
        table.add_column("value")
        for label, text in headline(report):
            table.add_row(label, text)
        out.print(table)
        if report["notice"]:
            out.print(report["notice"], style="bold red", highlight=False)
        out.print(f"report: {out_dir / 'report.html'}", highlight=False, soft_wrap=True)
