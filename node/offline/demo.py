"""`mvi-node demo`: the whole node on one machine, with a built-in mini PACS, on loopback only.

1. Builds and caches the demo models on first use (the segmenter through
   :mod:`node.offline.train_seg` with the demo defaults, the MVI model from in-memory phantoms per
   :data:`node.analysis.models.DEMO_FUSION`); later runs reuse them.
2. Writes one phantom study, starts a mini PACS (a pynetdicom Storage SCP that keeps what it
   receives) and the node in-process, sends the study from the PACS' AE title, waits for the
   results to come back, and prints them beside the phantom's truth.

Everything listens on 127.0.0.1; the node's logging scrubs identifiers as always.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from node.analysis.result import Result
    from node.store.database import Study

__all__ = [
    "DEMO_NOTICE",
    "PACS_AET",
    "MiniPacs",
    "build_demo_models",
    "needs_build",
    "register",
    "run_demo",
]

PACS_AET = "MINI_PACS"
NODE_AET = "MVI_NODE"
DEMO_NOTICE = "demo model — not for clinical use"
FINAL_STATES = ("done", "failed", "needs_review", "not_applicable")


def _kind_by_sop_class() -> dict[str, str]:
    """Result kinds by the SOP class the node sends them as."""
    # Imported here: the CLI imports this module to register `demo`, and pydicom and
    # pynetdicom load only when the demo runs.
    from node.core import dicom

    return {
        dicom.SEGMENTATION_STORAGE: "seg",
        dicom.COMPREHENSIVE_SR_STORAGE: "sr",
        dicom.COMPREHENSIVE_3D_SR_STORAGE: "sr",
        dicom.SECONDARY_CAPTURE_IMAGE_STORAGE: "sc",
    }


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def needs_build(segmenter_dir: Path, model_dir: Path) -> dict[str, bool]:
    """Which of the two demo models is missing (no valid checkpoint directory)."""
    from model.checkpoint import is_checkpoint_dir

    return {
        "segmenter": not is_checkpoint_dir(segmenter_dir),
        "fusion": not is_checkpoint_dir(model_dir),
    }


def _build_fusion(directory: Path, err: Console) -> None:
    """Train the demo MVI model from in-memory phantoms per :data:`DEMO_FUSION`."""
    from model.phantom import PHANTOM_VERSION, PhantomSpec
    from model.roi import RoiSpec
    from model.train import cached_rois, train_fusion
    from node.analysis.models import DEMO_FUSION
    from node.offline.phantom_study import study_seed
    from node.offline.tripod import tripod_section

    studies = int(DEMO_FUSION["studies"])
    epochs = int(DEMO_FUSION["epochs"])
    folds = 3
    roi_spec = RoiSpec(size=int(DEMO_FUSION["roi_size"]))
    phantom = PhantomSpec(size=int(DEMO_FUSION["size"]), slices=int(DEMO_FUSION["slices"]))
    seeds = [study_seed(int(DEMO_FUSION["seed"]), i) for i in range(studies)]
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=err,
        transient=True,
    ) as progress:
        rendering = progress.add_task("MVI model: phantoms", total=studies, note="")
        samples = cached_rois(
            seeds,
            phantom,
            roi_spec,
            None,
            register_pv=False,
            progress=lambda done, _total: progress.update(rendering, completed=done),
        )
        # One run per fold: the fold networks are the shipped ensemble (no final run).
        training = progress.add_task("MVI model: training", total=folds * epochs, note="")
        stages: list[str] = []

        def on_epoch(stage: str, epoch: int, total: int, loss: float, auc: float | None) -> None:
            if not stages or stages[-1] != stage:
                stages.append(stage)
            done = (len(stages) - 1) * epochs + min(epoch, epochs)
            note = f"{stage} loss {loss:.3f}" + (f" AUC {auc:.2f}" if auc is not None else "")
            progress.update(training, completed=done, note=note)

        train_fusion(
            samples,
            directory,
            roi_spec=roi_spec,
            folds=folds,
            epochs=epochs,
            seed=int(DEMO_FUSION["seed"]),
            demo=True,
            progress=on_epoch,
            name="mvi-fusion-resnet18",
            version=f"demo-{PHANTOM_VERSION}",
            card_extra={
                "tripod": tripod_section(
                    studies=len(samples),
                    patients=len(samples),
                    positives=sum(s.label for s in samples),
                    centres=[],
                    skipped=[],
                    label_source="phantom truth (synthetic studies made by the project)",
                    demo=True,
                )
            },
        )


def build_demo_models(out: Console, err: Console) -> tuple[Path, Path]:
    """Build whichever demo model is not cached yet; return (segmenter dir, MVI model dir)."""
    from node.analysis.models import demo_fusion_dir, demo_segmenter_dir
    from node.offline.train_seg import DEMO_PHANTOMS, TrainSegOptions
    from node.offline.train_seg import run as train_seg

    seg_dir, fusion_dir = demo_segmenter_dir(), demo_fusion_dir()
    missing = needs_build(seg_dir, fusion_dir)
    if missing["segmenter"]:
        err.print("building the demo segmenter (first run only)…", highlight=False)
        train_seg(TrainSegOptions(phantoms=DEMO_PHANTOMS), out=Console(quiet=True), err=err)
    if missing["fusion"]:
        err.print("building the demo MVI model (first run only)…", highlight=False)
        _build_fusion(fusion_dir, err)
    return seg_dir, fusion_dir


# --------------------------------------------------------------------------------------------
# Mini PACS
# --------------------------------------------------------------------------------------------


@dataclass
class MiniPacs:
    """A Storage SCP on loopback that keeps every instance it receives in ``folder``."""

    folder: Path
    ae_title: str = PACS_AET
    port: int = 0
    received: list[tuple[str, Path]] = field(default_factory=list)  # (SOP class UID, file)
    #: When each of ``received`` was stored (``time.perf_counter()``), for latency figures.
    received_at: list[float] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> MiniPacs:
        """Listen on a free loopback port."""
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        self.port = self.port or free_port()
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )
        return self

    def _on_store(self, event: Any) -> int:
        from node.core.dicom import SUCCESS

        dataset = event.dataset
        dataset.file_meta = event.file_meta
        sop_class = str(dataset.SOPClassUID)
        path = self.folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append((sop_class, path))
            self.received_at.append(time.perf_counter())
        return SUCCESS

    def arrivals(self) -> dict[str, float]:
        """Each file received, with when it was stored (``time.perf_counter()``)."""
        with self._lock:
            return {
                str(path): at for (_, path), at in zip(self.received, self.received_at, strict=True)
            }

    def kinds(self) -> dict[str, list[Path]]:
        """Received result objects by kind (seg, sr, sc)."""
        found: dict[str, list[Path]] = {}
        kind_by_sop_class = _kind_by_sop_class()
        with self._lock:
            for sop_class, path in self.received:
                kind = kind_by_sop_class.get(sop_class)
                if kind is not None:
                    found.setdefault(kind, []).append(path)
        return found

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def send_study(folder: Path, port: int, calling: str = PACS_AET, called: str = NODE_AET) -> int:
    """C-STORE every DICOM file under ``folder`` to 127.0.0.1:``port``; returns how many."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.presentation import DEFAULT_TRANSFER_SYNTAXES

    from node.core.dicom import stored

    files = sorted(p for p in folder.rglob("*.dcm") if p.is_file())
    datasets = [dcmread(p) for p in files]
    ae = AE(ae_title=calling)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes | set(DEFAULT_TRANSFER_SYNTAXES)))
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise RuntimeError(f"the node at 127.0.0.1:{port} refused the association")
    sent = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status and stored(int(status.Status)):
                sent += 1
    finally:
        assoc.release()
    return sent


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def _node_settings(data_dir: Path, pacs_port: int, seg_dir: Path, model_dir: Path) -> Any:
    from node.core.settings import Settings

    return Settings.model_validate(
        {
            "node": {
                "ae_title": NODE_AET,
                "host": "127.0.0.1",
                "port": free_port(),
                "data_dir": str(data_dir),
                "log_level": "warning",
                "free_disk_floor_mb": 64,
                # One study, one association: a second receiving process would only cost.
                "receive_processes": 1,
            },
            "peers": {"pacs": {"ae_title": PACS_AET, "host": "127.0.0.1", "port": pacs_port}},
            "completion": {"quiet_seconds": 2.0},
            "pipeline": {
                "workers": 1,
                "segmenter_dir": str(seg_dir),
                "model_dir": str(model_dir),
            },
            "results": {"destinations": ["pacs"]},
            # The demo ends when its study is back; no console to log in to.
            "web": {"enabled": False},
        }
    )


def _wait(
    store: Any, study_uid: str, pacs: MiniPacs, timeout_s: float, tick: Callable[[str], None]
) -> tuple[bool, Study | None]:
    """Poll until the study is final and its result objects arrived; (finished, study row)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        study = store.study(study_uid)
        state = study.state if study else "not received yet"
        kinds = pacs.kinds()
        tick(f"study {state}; at the PACS: {', '.join(sorted(kinds)) or 'nothing yet'}")
        if study is not None and state in FINAL_STATES:
            latest = store.latest_result(study_uid)
            outputs = set(latest.result.outputs) if latest is not None else set()
            if outputs <= set(kinds) or (state == "not_applicable" and latest is None):
                return True, study
        time.sleep(0.5)
    return False, store.study(study_uid)


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _result_table(
    result: Result | None,
    state: str,
    truth: Any,
    result_json: Path | None,
    pacs: MiniPacs,
    kept: bool,
) -> Table:
    table = Table(title=f"mvi-node demo — {DEMO_NOTICE}", show_lines=False)
    table.add_column("", style="bold")
    table.add_column("node")
    table.add_column("phantom truth")
    # No result at all (a study that never got one) reads as an empty one.
    tumor = result.tumor if result is not None else None
    loat = result.loat if result is not None else None
    phases = result.phases if result is not None else None
    model = result.model if result is not None else None
    segmentation = result.segmentation if result is not None else None
    truth_label = {None: "no tumour", 0: "MVI−", 1: "MVI+"}.get(truth.mvi, str(truth.mvi))
    status = result.status if result is not None else None
    table.add_row("status", f"{status} (study {state})", truth_label)
    if result is not None and result.reason:
        table.add_row("reason", result.reason, "")
    if result is not None and result.gates:
        marks = {True: "✓", False: "✗", None: "–"}
        table.add_row("checks", " ".join(f"{marks[g.passed]}{g.name}" for g in result.gates), "")
    table.add_row("MVI probability", _fmt(result.mvi_probability if result else None, digits=3), "")
    table.add_row(
        "combined probability",
        _fmt(result.combined_probability if result else None, digits=3),
        "",
    )
    table.add_row("risk", _fmt(result.risk_category if result else None), truth_label)
    table.add_row(
        "LOAT max area",
        _fmt(loat.max_area_cm2 if loat else None, " cm²"),
        _fmt(float(truth.loat_max_area_cm2), " cm²"),
    )
    table.add_row(
        "tumour max diameter",
        _fmt(tumor.max_diameter_mm if tumor else None, " mm", 1),
        _fmt(float(truth.max_diameter_mm), " mm", 1),
    )
    table.add_row("segmentation", _fmt(segmentation.source if segmentation else None), "")
    shift = phases.registration_shift_mm if phases else None
    table.add_row(
        "registration shift",
        "—" if shift is None else "(" + ", ".join(f"{v:.1f}" for v in shift) + ") mm",
        "",
    )
    timings = result.timings_s if result is not None else {}
    table.add_row(
        "stage timings",
        ", ".join(f"{k} {float(v):.1f} s" for k, v in timings.items()) or "—",
        "",
    )
    if model is not None:
        table.add_row("model", f"{model.name} {model.version}", DEMO_NOTICE)
    suffix = "" if kept else " (removed on exit; --keep keeps them)"
    table.add_row("result.json", f"{result_json or '—'}{suffix}", "")
    kinds = pacs.kinds()
    received = ", ".join(f"{k.upper()} ×{len(v)}" for k, v in sorted(kinds.items())) or "none"
    table.add_row("at the mini PACS", f"{received} in {pacs.folder}{suffix}", "")
    return table


def run_demo(
    size: int = 256,
    slices: int = 64,
    seed: int = 7,
    keep: bool = False,
    *,
    segmenter_dir: Path | None = None,
    model_dir: Path | None = None,
    out: Console | None = None,
    err: Console | None = None,
    timeout_s: float = 180.0,
    keep_root: Path | None = None,
) -> int:
    """Run the demo; returns the exit code (0 results printed, 1 failed or timed out).

    ``segmenter_dir`` and ``model_dir`` skip the demo model build (tests pass tiny models);
    ``keep_root`` is where ``keep`` writes (default ``./demo-out``).
    """
    from node.jobs.runner import results_folder
    from node.offline.phantom_study import CohortOptions, write_cohort
    from node.serve.service import start_node, stop_node

    out = out or Console()
    err = err or Console(stderr=True)
    started = time.perf_counter()
    out.print(f"[bold]mvi-node demo[/bold] — {DEMO_NOTICE}; loopback only")
    if segmenter_dir is None or model_dir is None:
        try:
            built_seg, built_fusion = build_demo_models(out, err)
        except Exception as exc:
            err.print(
                f"mvi-node demo: building the demo models failed: {type(exc).__name__}: {exc}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            return 1
        segmenter_dir = segmenter_dir or built_seg
        model_dir = model_dir or built_fusion
    models_s = time.perf_counter() - started

    temp: Path | None = None
    if keep:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        root = (keep_root or Path("demo-out")).resolve() / f"demo-{stamp}"
        root.mkdir(parents=True, exist_ok=True)
    else:
        temp = root = Path(tempfile.mkdtemp(prefix="mvi-demo-"))
    pacs = MiniPacs(root / "pacs")
    node = None
    try:
        with err.status("writing a phantom study…"):
            written = write_cohort(
                root / "study", CohortOptions(studies=1, seed=seed, size=size, slices=slices)
            )[0]
        pacs.start()
        settings = _node_settings(root / "node", pacs.port, segmenter_dir, model_dir)
        node = start_node(settings)
        out.print(
            f"mini PACS {PACS_AET} on 127.0.0.1:{pacs.port}; node {NODE_AET} on "
            f"127.0.0.1:{settings.node.port}",
            highlight=False,
        )
        with err.status("sending the study to the node…"):
            sent = send_study(written.folder, settings.node.port)
        out.print(f"sent {sent} instances", highlight=False)
        waiting_since = time.perf_counter()
        with err.status("waiting for results…") as status:
            finished, study = _wait(
                node.store,
                written.study_instance_uid,
                pacs,
                timeout_s,
                lambda note: status.update(
                    f"waiting for results… {time.perf_counter() - waiting_since:.0f} s: {note}"
                ),
            )
        if not finished:
            state = study.state if study else "not received"
            err.print(
                f"mvi-node demo: no results after {timeout_s:.0f} s (study {state}); "
                f"node data in {root / 'node'}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            return 1
        assert study is not None
        latest = node.store.latest_result(written.study_instance_uid)
        result: Result | None = latest.result if latest is not None else None
        result_json = None
        if latest is not None:
            folder = results_folder(
                settings, written.study_instance_uid, latest.job_id, latest.attempt
            )
            result_json = folder / "result.json"
        out.print(
            _result_table(result, str(study.state), written.phantom.truth, result_json, pacs, keep)
        )
        out.print(
            f"models {models_s:.0f} s, total {time.perf_counter() - started:.0f} s — {DEMO_NOTICE}",
            highlight=False,
        )
        return 0
    except Exception as exc:
        err.print(
            f"mvi-node demo: failed: {type(exc).__name__}: {exc}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return 1
    finally:
        if node is not None:
            stop_node(node)
        pacs.stop()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def register(app: typer.Typer) -> None:
    """Add the ``demo`` command to ``app``."""

    @app.command()
    def demo(
        size: Annotated[int, typer.Option(min=32, help="Phantom in-plane size (pixels).")] = 256,
        slices: Annotated[int, typer.Option(min=8, help="Phantom slices.")] = 64,
        seed: Annotated[int, typer.Option(help="Phantom cohort seed.")] = 7,
        keep: Annotated[
            bool, typer.Option("--keep", help="Keep the study, node data and results.")
        ] = False,
    ) -> None:
        """Run the node with a built-in mini PACS on one phantom study (demo models)."""
        from node.core.logging import configure_logging

        try:
            from node.cli.main import err, out
        except ImportError:  # pragma: no cover - node.cli.main always there in the package
            out, err = Console(), Console(stderr=True)
        configure_logging("warning")
        code = run_demo(size, slices, seed, keep, out=out, err=err)
        raise typer.Exit(code)
