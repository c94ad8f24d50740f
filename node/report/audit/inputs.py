"""The audit's inputs: the results, follow-up and pathology CSVs, read and checked.

Every check fails with an :class:`AuditInputError` of one line that names the file, line and
column; nothing here computes a statistic.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from dicom_sr.enum import RiskCategory, Status
from model.survival import EVENT as _EVENT
from model.survival import HIGH as _HIGH
from model.survival import TIME as _TIME
from node.core.errors import InputError
from node.core.pseudonym import keyed_hash, looks_hashed
from node.report.export import IDENTIFIER_COLUMNS, SHIFTED_DATE_COLUMN

#: Non-identifier columns the audit reads (the others are exported but not needed here).
_USED_RESULT_COLUMNS = (
    "mvi_probability",
    "risk_category",
    "loat_max_area_cm2",
    "tumor_max_diameter_mm",
    "model_name",
    "model_version",
    "status",
)

JoinColumn = Literal["study_instance_uid", "accession_number", "patient_id"]
TimeUnit = Literal["days", "months"]


class AuditInputError(InputError):
    """An input file cannot be audited; the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class AuditOptions:
    """How the audit joins and reads its inputs.

    Parameters
    ----------
    join
        The identifier both files share. ``patient_id`` keeps one study per patient: the
        earliest scored one.
    time_col, event_col
        Follow-up columns: time from the origin to the event or censoring, and 1 = event.
    time_origin_col
        A follow-up date column (YYYY-MM-DD or YYYYMMDD) naming each patient's time origin
        (surgery, say, as the paper's survival ran from resection). Given, the origin is
        explicit: a study dated after it is not a pre-operative prediction and leaves the
        survival analysis, counted. Not given, time runs from the study (as before).
    time_unit
        Unit of the follow-up times (labels only; nothing is converted).
    covariates
        Numeric follow-up columns for the adjusted Cox model.
    pseudonym_key
        ``security.pseudonym_key``: needed when the results' join column holds keyed hashes.
    """

    join: JoinColumn = "study_instance_uid"
    time_col: str = "time"
    event_col: str = "event"
    time_unit: TimeUnit = "months"
    covariates: tuple[str, ...] = ()
    pseudonym_key: str = field(default="", repr=False)
    time_origin_col: str | None = None

    def __post_init__(self) -> None:
        if self.join not in get_args(JoinColumn):
            raise AuditInputError(f"join must be one of {', '.join(get_args(JoinColumn))}")
        if self.time_unit not in get_args(TimeUnit):
            raise AuditInputError(f"time unit must be one of {', '.join(get_args(TimeUnit))}")
        if self.time_col == self.event_col:
            raise AuditInputError(f"time and event columns are both {self.time_col!r}")
        if self.time_origin_col is not None and self.time_origin_col in {
            self.join,
            self.time_col,
            self.event_col,
        }:
            raise AuditInputError(
                f"time origin column {self.time_origin_col!r} is also the join, time or event "
                "column"
            )
        taken = {self.join, self.time_col, self.event_col, _TIME, _EVENT, _HIGH}
        seen: set[str] = set()
        for name in self.covariates:
            if not name or name in taken or name in seen:
                raise AuditInputError(
                    f"covariate {name!r} is empty, repeated, or one of the join, time, event or "
                    f"{_HIGH!r} columns"
                )
            seen.add(name)


# --------------------------------------------------------------------------------------------
# Reading the inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """A CSV file: its header and its data rows with their line numbers (header = line 1)."""

    path: Path
    header: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]

    @property
    def name(self) -> str:
        return self.path.name

    def require(self, columns: Sequence[str]) -> None:
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise AuditInputError(
                f"{self.name}: missing column{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} (it has: {', '.join(self.header) or 'no columns'})"
            )

    def values(self, column: str) -> list[str]:
        return [cells.get(column, "") for _, cells in self.rows]


def _read_csv(path: Path) -> _Table:
    """Read a comma-separated file with a header line (a spreadsheet's BOM is tolerated)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            first = next(reader, None)
            if first is None:
                raise AuditInputError(f"{path.name}: empty file (no header line)")
            header = tuple(name.strip() for name in first)
            repeated = sorted({n for n in header if header.count(n) > 1})
            if repeated:
                raise AuditInputError(f"{path.name}: column {', '.join(repeated)} repeated")
            rows = []
            for cells in reader:
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines, which spreadsheets like to leave at the end
                if len(cells) > len(header):
                    raise AuditInputError(
                        f"{path.name} line {reader.line_num}: {len(cells)} cells but the header "
                        f"names {len(header)} columns"
                    )
                # Short rows (trailing empty cells dropped by an editor) read as empty cells.
                padded = [*cells, *([""] * (len(header) - len(cells)))]
                rows.append((reader.line_num, dict(zip(header, padded, strict=True))))
    except FileNotFoundError:
        raise AuditInputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise AuditInputError(f"{path.name}: not UTF-8 text (save it as CSV UTF-8)") from None
    except csv.Error as exc:
        raise AuditInputError(f"{path.name}: not a readable CSV file ({exc})") from None
    except OSError as exc:
        raise AuditInputError(f"{path}: {exc.strerror or exc}") from None
    return _Table(path, header, tuple(rows))


def _number(text: str) -> float | None:
    """The finite number in a cell, or None when it is empty or not a finite number."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_DATE_FORMATS = (
    (re.compile(r"^\d{8}$"), "%Y%m%d"),
    (re.compile(r"^\d{4}-\d{2}-\d{2}$"), "%Y-%m-%d"),
)


def _parse_date(value: str) -> dt.date | None:
    """YYYYMMDD or YYYY-MM-DD; None when it is neither (or no such day)."""
    for pattern, fmt in _DATE_FORMATS:
        if pattern.match(value):
            try:
                return dt.datetime.strptime(value, fmt).date()
            except ValueError:
                return None
    return None


def _date_cell(text: str, table: _Table, line: int, column: str) -> dt.date:
    value = text.strip()
    date = _parse_date(value)
    if date is None:
        raise AuditInputError(
            f"{table.name} line {line}: {column} {value!r} is not a date (YYYY-MM-DD or YYYYMMDD)"
        )
    return date


def _study_date(text: str, table: _Table, line: int) -> dt.date | None:
    """DICOM's YYYYMMDD (or ISO, as a spreadsheet may rewrite it); None when empty (type 2)."""
    value = text.strip()
    if not value:
        return None
    date = _parse_date(value)
    if date is None:
        raise AuditInputError(
            f"{table.name} line {line}: study_date {value!r} is not a date (YYYYMMDD)"
        )
    return date


def _zero_one(text: str, table: _Table, line: int, column: str) -> int:
    value = _number(text)
    if value == 0.0:
        return 0
    if value == 1.0:
        return 1
    raise AuditInputError(f"{table.name} line {line}: {column} {text.strip()!r} is not 0 or 1")


@dataclass(frozen=True)
class _Result:
    """One scored study of the results file."""

    line: int
    ids: dict[str, str]  # identifier column -> value as in the file (stripped; "" if empty)
    date: dt.date | None
    probability: float
    high_risk: bool
    diameter_mm: float | None
    loat_cm2: float | None


@dataclass(frozen=True)
class _Results:
    table: _Table
    scored: list[_Result]
    excluded: Counter[str]
    hashed: dict[str, bool]  # per identifier column present
    models: list[str]
    demo: bool
    #: The dates are a hashed export's, shifted per patient (``study_date_shifted``).
    dates_shifted: bool = False


def _load_results(path: Path) -> _Results:
    table = _read_csv(path)
    shifted = SHIFTED_DATE_COLUMN in table.header
    table.require([*_USED_RESULT_COLUMNS, SHIFTED_DATE_COLUMN if shifted else "study_date"])
    date_column = SHIFTED_DATE_COLUMN if shifted else "study_date"
    id_columns = [c for c in IDENTIFIER_COLUMNS if c in table.header]
    if not any(v.strip() for c in id_columns for v in table.values(c)):
        raise AuditInputError(
            f"{table.name}: no identifier columns (study_instance_uid, accession_number, "
            "patient_id), so it cannot be joined to follow-up: export it again with identifiers "
            "(plain or hashed)"
        )
    scored: list[_Result] = []
    excluded: Counter[str] = Counter()
    models: set[str] = set()
    for line, cells in table.rows:
        # Dates are checked on every row: a bad one means a broken file, not a lost row.
        date = _study_date(cells[date_column], table, line)
        name, version = cells["model_name"].strip(), cells["model_version"].strip()
        if name or version:
            models.add(f"{name} {version}".strip())
        status = cells["status"].strip().lower()
        # Only scored rows enter the statistics.
        if status != Status.SCORED:
            excluded[f"status {status}" if status in tuple(Status) else f"status {status!r}"] += 1
            continue
        probability = _number(cells["mvi_probability"])
        if probability is None or not 0.0 <= probability <= 1.0:
            excluded["mvi_probability missing or not in [0, 1]"] += 1
            continue
        risk = cells["risk_category"].strip().lower()
        if risk not in tuple(RiskCategory):
            excluded["risk_category neither high nor low"] += 1
            continue
        scored.append(
            _Result(
                line=line,
                ids={c: cells[c].strip() for c in id_columns},
                date=date,
                probability=probability,
                high_risk=risk == RiskCategory.HIGH,
                diameter_mm=_number(cells["tumor_max_diameter_mm"]),
                loat_cm2=_number(cells["loat_max_area_cm2"]),
            )
        )
    hashed = {c: looks_hashed(table.values(c)) for c in id_columns}
    return _Results(
        table=table,
        scored=scored,
        excluded=excluded,
        hashed=hashed,
        models=sorted(models),
        demo=any("demo" in m.lower() for m in models),
        dates_shifted=shifted,
    )


def _one_per_key(results: _Results, column: str) -> tuple[dict[str, _Result], int, int]:
    """Scored studies by ``column``: the earliest (by study date, then file order) per key.

    Returns
    -------
    by_key, superseded, without_key
        ``superseded`` counts later studies of a key (for ``patient_id``: follow-up starts at the
        first scored study), ``without_key`` scored rows with an empty key.
    """
    if column not in results.table.header:
        others = [c for c in IDENTIFIER_COLUMNS if c in results.table.header]
        raise AuditInputError(
            f"{results.table.name}: no {column} column (it has {', '.join(others)}); "
            f"join on one of those with --join"
        )
    if not any(v.strip() for v in results.table.values(column)):
        raise AuditInputError(
            f"{results.table.name}: {column} is empty in every row (exported without it?); "
            "join on another identifier with --join"
        )
    # Studies without a date sort last: a dated study is the safer start of follow-up.
    ordered = sorted(results.scored, key=lambda r: (r.date is None, r.date or dt.date.min, r.line))
    by_key: dict[str, _Result] = {}
    superseded = without_key = 0
    for result in ordered:
        key = result.ids[column]
        if not key:
            without_key += 1
        elif key in by_key:
            superseded += 1
        else:
            by_key[key] = result
    return by_key, superseded, without_key


@dataclass(frozen=True)
class _FollowUp:
    line: int
    key: str  # as in the file, stripped
    time: float
    event: int
    covariates: dict[str, float | None]
    origin: dt.date | None = None


def _load_followup(path: Path, options: AuditOptions) -> tuple[_Table, list[_FollowUp]]:
    table = _read_csv(path)
    origin_col = [options.time_origin_col] if options.time_origin_col else []
    table.require(
        [options.join, options.time_col, options.event_col, *options.covariates, *origin_col]
    )
    rows: list[_FollowUp] = []
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        key = cells[options.join].strip()
        if not key:
            raise AuditInputError(f"{table.name} line {line}: {options.join} is empty")
        if key in first_line:
            # The key itself stays out of the message: it may be a plain identifier.
            raise AuditInputError(
                f"{table.name} line {line}: {options.join} repeats line {first_line[key]} "
                "(one follow-up row per key)"
            )
        first_line[key] = line
        raw_time = cells[options.time_col].strip()
        time = _number(raw_time)
        if time is None:
            raise AuditInputError(
                f"{table.name} line {line}: {options.time_col} {raw_time!r} is not a number"
            )
        if time < 0:
            raise AuditInputError(
                f"{table.name} line {line}: {options.time_col} {raw_time} is negative"
            )
        event = _zero_one(cells[options.event_col], table, line, options.event_col)
        covariates: dict[str, float | None] = {}
        for name in options.covariates:
            raw = cells[name].strip()
            value = _number(raw)
            if raw and value is None:
                raise AuditInputError(
                    f"{table.name} line {line}: covariate {name} {raw!r} is not a number"
                )
            covariates[name] = value  # empty: left out of the adjusted model only
        origin = None
        if options.time_origin_col:
            origin = _date_cell(
                cells[options.time_origin_col], table, line, options.time_origin_col
            )
        rows.append(_FollowUp(line, key, time, event, covariates, origin))
    if not rows:
        raise AuditInputError(f"{table.name}: no data rows")
    return table, rows


def _lookup(
    results: _Results, column: str, keys: list[str], options: AuditOptions
) -> Callable[[str], str]:
    """How another file's key maps to the results' key in ``column`` (hashing it if needed)."""
    if not results.hashed.get(column, False) or looks_hashed(keys):
        # Plain on both sides, or the other file already holds pseudonyms.
        return str.strip
    if not options.pseudonym_key:
        raise AuditInputError(
            f"{results.table.name}: {column} holds keyed hashes but security.pseudonym_key is "
            "empty: set it (or MVI_SECURITY__PSEUDONYM_KEY) to the key the export used"
        )
    key = options.pseudonym_key
    return lambda value: keyed_hash(value, key)


def _no_match_hint(results: _Results, column: str, keys: list[str]) -> str:
    if looks_hashed(keys) and not results.hashed.get(column, False):
        return f" (the keys look like pseudonyms but {results.table.name}'s are plain)"
    if results.hashed.get(column, False):
        return " (is security.pseudonym_key the key the export used?)"
    return ""


def _join_pathology(
    path: Path, results: _Results, options: AuditOptions
) -> tuple[_Table, str, list[tuple[int, _Result]], list[str], int]:
    """Pathology rows matched to scored studies.

    Returns
    -------
    table, key column, (mvi, result) pairs, unmatched keys (as in the file), matched rows
    without an MVI value
    """
    table = _read_csv(path)
    # Pathology is per study: keyed by the join column, or by the study UID whatever the join.
    column = options.join
    if column not in table.header and "study_instance_uid" in table.header:
        column = "study_instance_uid"
    table.require([column, "mvi"])
    by_key, _, _ = _one_per_key(results, column)
    keys = [cells[column].strip() for _, cells in table.rows]
    to_results = _lookup(results, column, keys, options)
    labelled: list[tuple[int, _Result]] = []
    unmatched: list[str] = []
    missing = 0
    first_line: dict[str, int] = {}
    for line, cells in table.rows:
        key = cells[column].strip()
        if not key:
            raise AuditInputError(f"{table.name} line {line}: {column} is empty")
        if key in first_line:
            raise AuditInputError(
                f"{table.name} line {line}: {column} repeats line {first_line[key]} "
                "(one pathology row per key)"
            )
        first_line[key] = line
        raw = cells["mvi"].strip()
        label = _zero_one(raw, table, line, "mvi") if raw else None
        match = by_key.get(to_results(key))
        if match is None:
            unmatched.append(key)
        elif label is None:
            missing += 1
        else:
            labelled.append((label, match))
    return table, column, labelled, unmatched, missing
