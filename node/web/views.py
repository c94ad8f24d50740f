"""What the console shows, as plain data: the pages render it and /api returns it as JSON.

One function per page, reading the store and the files the workers wrote. Identifiers (patient
name and ID, accession number) are included only when the caller says the user may see them.
Nothing here imports torch: model cards are read from the folders the workers recorded loading.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.core.logging import study_key, uid_key
from node.core.settings import Settings
from node.jobs.runner import results_folder
from node.receive.spool import free_megabytes
from node.store.database import STUDY_STATES, Store, StoredResult, store_writable, utcnow

#: How far back the overview's throughput looks.
THROUGHPUT_WINDOW = dt.timedelta(hours=24)


#: A study key as :func:`node.core.logging.study_key` makes it (checked before any query).
STUDY_KEY = re.compile(r"[0-9a-f]{12}")


class NotFound(LookupError):
    """An unknown study key, report or object: the page answers 404."""


def iso(moment: dt.datetime | None) -> str | None:
    """A time as the API writes it (UTC, seconds)."""
    return moment.astimezone(dt.UTC).isoformat(timespec="seconds") if moment else None


# -- overview --------------------------------------------------------------------------------


#: Seconds a health answer is reused: pages poll it, and the store check takes the write lock.
HEALTH_CACHE_S = 5.0
_health_cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
_health_lock = threading.Lock()


def health(settings: Settings) -> list[dict[str, Any]]:
    """The node's checks with their figures (reused for :data:`HEALTH_CACHE_S`).

    The receiving process's own checks (the AE listens, the scheduler runs) come from its
    ``/healthz`` when ``metrics.port`` is set; the store, disk and model checks run here.
    """
    with _health_lock:
        key = settings.database_url
        cached = _health_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < HEALTH_CACHE_S:
            return [dict(c) for c in cached[1]]
        checks = _run_health(settings)
        _health_cache[key] = (time.monotonic(), checks)
        return [dict(c) for c in checks]


def _run_health(settings: Settings) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    problem = store_writable(settings.database_url)
    checks.append({"name": "store", "ok": problem is None, "detail": problem or "writable"})
    data_dir = settings.node.data_dir
    free = free_megabytes(data_dir) if data_dir.exists() else 0.0
    floor = settings.node.free_disk_floor_mb
    checks.append(
        {
            "name": "disk",
            "ok": free >= floor,
            "detail": f"{free:,.0f} MB free in {data_dir} (floor {floor:,} MB)",
        }
    )
    for name, entry in sorted(model_loads(settings).items()):
        checks.append(
            {
                "name": f"model: {name}",
                "ok": bool(entry.get("ok")),
                "detail": f"{entry.get('detail')} at {entry.get('at')}",
            }
        )
    if settings.metrics.port is None:
        checks.append(
            {
                "name": "receiver",
                "ok": None,
                "detail": "not checked: set metrics.port for the receiving process's /healthz",
            }
        )
        return checks
    checks.extend(_receiver_checks(settings))
    return checks


def _receiver_checks(settings: Settings) -> list[dict[str, Any]]:
    """The AE and scheduler checks of the receiving process's ``/healthz``."""
    host = settings.metrics.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    url = f"http://{f'[{host}]' if ':' in host else host}:{settings.metrics.port}/healthz"
    try:
        try:
            with urllib.request.urlopen(url, timeout=2.0) as answer:
                body = answer.read(65536)
        except urllib.error.HTTPError as error:  # 503: unhealthy, the same body
            body = error.read(65536)
        reported = json.loads(body)
        listed = reported.get("checks") if isinstance(reported, dict) else None
        if not isinstance(listed, dict):
            raise ValueError("no checks in the answer")
    except (OSError, ValueError) as error:
        return [{"name": "receiver", "ok": False, "detail": f"{url}: {error}"}]
    return [
        {"name": name, "ok": bool(entry.get("ok")), "detail": str(entry.get("detail"))}
        for name, entry in listed.items()
        if name in ("ae", "scheduler") and isinstance(entry, dict)
    ]


def model_loads(settings: Settings) -> dict[str, dict[str, Any]]:
    """The workers' last load of each model (node.analysis.models.MODEL_STATUS_FILE)."""
    from node.analysis.models import MODEL_STATUS_FILE

    try:
        loads = json.loads((settings.node.data_dir / MODEL_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in loads.items() if isinstance(v, dict)} if isinstance(loads, dict) else {}
    )


def overview(settings: Settings, store: Store) -> dict[str, Any]:
    """The overview page: checks, counts, outbox depth, throughput, models."""
    now = utcnow()
    snapshot = store.snapshot(now - THROUGHPUT_WINDOW)
    throughput: dict[str, int] = {}
    for result in snapshot.recent_results:
        throughput[str(result.status)] = throughput.get(str(result.status), 0) + 1
    oldest = snapshot.oldest_undelivered_at
    checks = health(settings)
    return {
        "checks": checks,
        "healthy": all(c["ok"] is not False for c in checks),
        "studies": {state: snapshot.studies_by_state.get(state, 0) for state in STUDY_STATES},
        "jobs": snapshot.jobs_by_state,
        "outbox": {
            "by_state": snapshot.outbox_by_state,
            "waiting": snapshot.outbox_by_state.get("pending", 0)
            + snapshot.outbox_by_state.get("failed", 0),
            "oldest_undelivered_at": iso(oldest),
            "oldest_age_s": round((now - oldest).total_seconds()) if oldest else None,
        },
        "last_24h": {"results": sum(throughput.values()), "by_status": throughput},
        "models": models(settings),
        "at": iso(now),
    }


def models(settings: Settings) -> list[dict[str, Any]]:
    """Each model a worker loaded (or that is configured), with its card."""
    from model.checkpoint_layout import CARD_NAME

    folders: dict[str, tuple[Path | None, dict[str, Any]]] = {}
    for name, entry in model_loads(settings).items():
        folder = entry.get("folder")
        folders[name] = (Path(folder) if folder else None, entry)
    configured = {
        "segmenter": settings.pipeline.segmenter_dir,
        "MVI model": settings.pipeline.model_dir,
    }
    for name, folder in configured.items():
        if folder is not None and (name not in folders or folders[name][0] is None):
            folders[name] = (folder, folders.get(name, (None, {}))[1])
    shown = []
    for name, (folder, entry) in sorted(folders.items()):
        card: dict[str, Any] = {}
        if folder is not None:
            try:
                loaded = json.loads((folder / CARD_NAME).read_text())
                card = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                card = {}
        shown.append(
            {
                "name": name,
                "folder": str(folder) if folder else None,
                "card_name": card.get("name"),
                "version": card.get("version"),
                "demo": bool(card.get("demo", False)),
                "loaded": entry.get("ok"),
                "load_detail": entry.get("detail"),
                "card": card,
            }
        )
    return shown


# -- studies ---------------------------------------------------------------------------------


def identifiers(row: Any, show: bool) -> dict[str, Any]:
    """A study's patient identifiers, or nothing when the user may not see them."""
    if not show:
        return {}
    return {
        "patient_name": row.patient_name,
        "patient_id": row.patient_id,
        "accession_number": row.accession_number,
    }


def studies(
    store: Store,
    *,
    state: str | None = None,
    reason: str | None = None,
    since: dt.date | None = None,
    until: dt.date | None = None,
    show_identifiers: bool = False,
    limit: int = 200,
) -> list[dict[str, Any]]:
    """The studies page: newest first, filtered by state, reason and day of last receipt."""

    def day(value: dt.date) -> dt.datetime:
        return dt.datetime.combine(value, dt.time(), tzinfo=dt.UTC)

    rows = store.search_studies(
        states=[state] if state else (),
        reason=reason or None,
        received_since=day(since) if since else None,
        received_until=day(until) + dt.timedelta(days=1) if until and until < dt.date.max else None,
        limit=limit,
    )
    listed = []
    for row in rows:
        latest = store.latest_result(row.study_uid)
        result = latest.result if latest is not None else None
        listed.append(
            {
                "study_key": row.study_key,
                "state": row.state,
                "reason": row.reason,
                "study_date": row.study_date,
                "instances": row.instance_count,
                "last_received_at": iso(row.last_received_at),
                "mvi_probability": result.mvi_probability if result else None,
                "risk_category": str(result.risk_category)
                if result and result.risk_category
                else None,
                "failed_checks": [str(g.name) for g in result.gates if g.passed is False]
                if result
                else [],
                **identifiers(row, show_identifiers),
            }
        )
    return listed


def find_study(store: Store, key: str) -> str:
    """The StudyInstanceUID of a study key, or :class:`NotFound`."""
    study_uid = store.find_study(key) if STUDY_KEY.fullmatch(key) else None
    if study_uid is None or study_key(study_uid) != key:
        # Keys only in URLs: a UID would put an identifier in access logs and histories.
        raise NotFound(f"no study {key!r}")
    return study_uid


def result_dict(stored: StoredResult) -> dict[str, Any]:
    """A stored result as the API shows it (result.json's content and where it came from)."""
    result = stored.result
    return {
        "job_id": stored.job_id,
        "status": str(result.status),
        "reason": result.reason,
        "mvi_probability": result.mvi_probability,
        "combined_probability": result.combined_probability,
        "risk_category": str(result.risk_category) if result.risk_category else None,
        "tumor": result.tumor.model_dump(mode="json") if result.tumor else None,
        "loat": result.loat.model_dump(mode="json") if result.loat else None,
        "model": result.model.model_dump(mode="json") if result.model else None,
        "segmentation": result.segmentation.model_dump(mode="json")
        if result.segmentation
        else None,
        "gates": [{**gate.model_dump(mode="json"), "text": gate.text} for gate in result.gates],
        "timings_s": result.timings_s,
        "outputs": sorted(result.outputs),
        "recorded_at": iso(stored.created_at),
    }


def study(
    settings: Settings, store: Store, key: str, *, show_identifiers: bool = False
) -> dict[str, Any]:
    """A study page: series, phases, checks, result, SR tree, jobs, outbox, viewer link."""
    study_uid = find_study(store, key)
    row = store.study(study_uid)
    if row is None:
        raise NotFound(f"no study {key!r}")
    pairing = row.pairing or {}
    roles = {pairing.get("arterial"): "arterial", pairing.get("portal_venous"): "portal venous"}
    series = [
        {
            "series_uid": item.series_uid,
            "series_key": uid_key(item.series_uid),
            "number": item.series_number,
            "description": item.series_description,
            "modality": item.modality,
            "instances": item.instance_count,
            "analysable": item.analysable,
            "use": roles.get(item.series_uid)
            or ("node output" if item.own_output else "" if item.analysable else "not analysed"),
        }
        for item in store.study_series(study_uid)
    ]
    latest = store.latest_result(study_uid)
    sr: list[dict[str, Any]] = []
    if latest is not None and "sr" in latest.result.outputs:
        sr = sr_tree(object_path(settings, study_uid, latest, "sr"))
    jobs = [
        {
            "id": job.id,
            "state": job.state,
            "attempts": job.attempts,
            "reason": job.reason,
            "forced": bool((job.pairing or {}).get("forced")),
            "created_at": iso(job.created_at),
            "started_at": iso(job.started_at),
            "finished_at": iso(job.finished_at),
            "seconds": round((job.finished_at - job.started_at).total_seconds(), 1)
            if job.finished_at and job.started_at
            else None,
            "worker": job.worker,
        }
        for job in store.list_jobs(50, study_uid=study_uid)
    ]
    outbox = [
        {
            "id": item.id,
            "job_id": item.job_id,
            "kind": Path(item.path).name.removesuffix(".dcm"),
            "destination": item.destination,
            "state": item.state,
            "attempts": item.attempts,
            "last_status": item.last_status,
            "next_attempt_at": iso(item.next_attempt_at),
            "delivered_at": iso(item.delivered_at),
        }
        for item in store.list_outbox(include_sent=True, limit=500, study_uid=study_uid)
    ]
    viewer = settings.web.viewer_url
    return {
        "study_key": row.study_key,
        "state": row.state,
        "reason": row.reason,
        "study_date": row.study_date,
        "instances": row.instance_count,
        "first_received_at": iso(row.first_received_at),
        "last_received_at": iso(row.last_received_at),
        "completed_at": iso(row.completed_at),
        **identifiers(row, show_identifiers),
        # The UID is what a viewer opens; it identifies no patient by itself.
        "study_uid": study_uid,
        "series": series,
        "phases": {k: v for k, v in pairing.items() if k not in ("arterial", "portal_venous")},
        "arterial": pairing.get("arterial"),
        "portal_venous": pairing.get("portal_venous"),
        "result": result_dict(latest) if latest is not None else None,
        "has_sc": latest is not None and "sc" in latest.result.outputs,
        "sr": sr,
        "jobs": jobs,
        "outbox": outbox,
        "viewer_url": viewer.replace("{study_uid}", study_uid) if viewer else None,
    }


def object_path(settings: Settings, study_uid: str, stored: StoredResult, kind: str) -> Path:
    """The file of one object (``seg``, ``sr``, ``sc``) a job wrote."""
    name = stored.result.outputs.get(kind)
    if not name:
        raise NotFound(f"the study's result has no {kind.upper()}")
    return results_folder(settings, study_uid, stored.job_id, stored.attempt) / Path(name).name


def sc_png(settings: Settings, store: Store, key: str) -> bytes:
    """The newest result's Secondary Capture as a PNG."""
    import numpy as np
    import pydicom
    from PIL import Image

    study_uid = find_study(store, key)
    latest = store.latest_result(study_uid)
    if latest is None:
        raise NotFound("the study has no result")
    path = object_path(settings, study_uid, latest, "sc")
    try:
        dataset = pydicom.dcmread(path)
        pixels = np.asarray(dataset.pixel_array)
    except Exception as error:  # pydicom's own errors are not OSError/ValueError
        raise NotFound(f"the SC cannot be read: {type(error).__name__}") from None
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise NotFound(f"the SC is not one grey or RGB image (shape {pixels.shape})")
    if pixels.dtype != np.uint8:
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
    mode = "RGB" if pixels.ndim == 3 else "L"
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def sr_tree(path: Path) -> list[dict[str, Any]]:
    """The SR's content tree: each item's relationship, concept name, value and children."""
    import pydicom

    try:
        dataset = pydicom.dcmread(path)
        root = {
            "relationship": "",
            "name": _meaning(dataset.get("ConceptNameCodeSequence")),
            "value": "",
            "children": _sr_items(dataset.get("ContentSequence") or []),
        }
    except Exception as error:  # a missing, truncated or foreign file: say so, show the rest
        return [
            {
                "relationship": "",
                "name": "SR not readable",
                "value": type(error).__name__,
                "children": [],
            }
        ]
    return [root]


def _meaning(sequence: Any) -> str:
    if not sequence:
        return ""
    item = sequence[0]
    return str(item.get("CodeMeaning", "") or item.get("CodeValue", ""))


def _sr_value(item: Any) -> str:
    kind = item.get("ValueType", "")
    if kind == "TEXT":
        return str(item.get("TextValue", ""))
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = (item.get("MeasuredValueSequence") or [None])[0]
        if measured is None:
            return "(no value)"
        unit = _meaning(measured.get("MeasurementUnitsCodeSequence"))
        return f"{measured.get('NumericValue', '')} {unit}".strip()
    if kind in ("UIDREF",):
        return str(item.get("UID", ""))
    if kind == "DATETIME":
        return str(item.get("DateTime", ""))
    if kind == "PNAME":
        return "(person name)"
    if kind == "IMAGE":
        refs = item.get("ReferencedSOPSequence") or []
        return f"image {_referenced(refs)}"
    if kind == "SCOORD":
        points = item.get("GraphicData") or []
        return f"{item.get('GraphicType', '')} of {len(points) // 2} points"
    if kind == "SCOORD3D":
        points = item.get("GraphicData") or []
        return f"{item.get('GraphicType', '')} of {len(points) // 3} points"
    if kind == "COMPOSITE":
        refs = item.get("ReferencedSOPSequence") or []
        return f"object {_referenced(refs)}"
    return ""


#: Containers shown as a count: the image library lists every source slice (TID 1600).
SUMMARISED = {"Image Library"}


def _referenced(refs: Any) -> str:
    uid = str(getattr(refs[0], "ReferencedSOPInstanceUID", "") or "") if refs else ""
    return uid_key(uid) if uid else "(not named)"


def _sr_items(sequence: Any, depth: int = 0) -> list[dict[str, Any]]:
    if depth > 20:  # a loop of references cannot happen in a tree; a hostile file could nest
        return []
    items = []
    for item in sequence:
        name = _meaning(item.get("ConceptNameCodeSequence"))
        children = _sr_items(item.get("ContentSequence") or [], depth + 1)
        value = _sr_value(item)
        if name in SUMMARISED:
            value, children = f"{_count_images(children)} images (not listed)", []
        items.append(
            {
                "relationship": str(item.get("RelationshipType", "")),
                "name": name,
                "value": value,
                "children": children,
            }
        )
    return items


def _count_images(items: list[dict[str, Any]]) -> int:
    return sum(
        (1 if item["value"].startswith("image") else 0) + _count_images(item["children"])
        for item in items
    )


# -- re-query, reports, audit log ------------------------------------------------------------


def requery(store: Store) -> dict[str, Any]:
    """Re-query progress: the studies re-queries asked for, by state, and the latest of them."""
    rows = store.retrospective_rows(500)
    by_state: dict[str, int] = {}
    for row in rows:
        by_state[row.state] = by_state.get(row.state, 0) + 1
    return {
        "by_state": by_state,
        "total": len(rows),
        "studies": [
            {
                "study_key": study_key(row.study_uid),
                "study_date": row.study_date,
                "state": row.state,
                "reason": row.reason,
                "requested_at": iso(row.requested_at),
                "updated_at": iso(row.updated_at),
            }
            for row in rows[:200]
        ],
    }


def reports_dir(settings: Settings) -> Path:
    """Where audit reports are listed from."""
    return settings.web.reports_dir or settings.node.data_dir / "reports"


def reports(settings: Settings) -> list[dict[str, Any]]:
    """Each `mvi-node audit` report (``DIR/report.html``) under :func:`reports_dir`."""
    root = reports_dir(settings)
    if not root.is_dir():
        return []
    found = [
        {
            "name": page.parent.name,
            "modified_at": iso(dt.datetime.fromtimestamp(page.stat().st_mtime, dt.UTC)),
        }
        for page in root.glob("*/report.html")
    ]
    return sorted(found, key=lambda r: r["modified_at"] or "", reverse=True)


def report_file(settings: Settings, name: str, file: str) -> Path:
    """A file of one report folder (report.html, its images), never outside it."""
    root = reports_dir(settings).resolve()
    folder = (root / name).resolve()
    path = (folder / file).resolve()
    if folder.parent != root or path.parent != folder or not path.is_file():
        raise NotFound(f"no report file {name}/{file}")
    return path


def audit_log(store: Store, limit: int = 300) -> list[dict[str, Any]]:
    """The console's audit log, newest first."""
    return [
        {
            "at": iso(entry.at),
            "user": entry.user_name,
            "role": entry.role,
            "client": entry.client,
            "action": entry.action,
            "target": entry.target,
            "outcome": entry.outcome,
            "detail": entry.detail,
        }
        for entry in store.accounts().audit_entries(limit)
    ]
