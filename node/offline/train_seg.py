"""The I/O side of ``mvi-node train-seg``: find training studies, load them, call the trainer.

Two sources of training data:

* ``--studies DIR``: a folder of DICOM studies (any layout, grouped by StudyInstanceUID). For each
  study the arterial and portal-venous series are paired with the default ``[phases]`` rules,
  loaded, and the portal-venous volume is registered onto the arterial one
  (:mod:`model.registration`). Truth masks come from ``DIR/masks/<study folder>/{liver,tumor,
  loat}.nrrd``, with ``stomach.nrrd`` and ``aorta.nrrd`` when present (the layout ``mvi-node
  phantom --masks`` writes), resampled onto the arterial grid when their geometry differs;
  :func:`truth_masks_for` is the hook for truth found inside the study (a DICOM SEG). A study
  without truth, or one that cannot be paired, loaded or registered, is skipped with a warning.
* ``--phantoms N``: N phantom studies rendered in memory (:mod:`model.phantom`, study seeds as
  ``mvi-node phantom --seed S`` draws them), registered the same way, with all five structures
  as truth. This is the documented, deterministic command that builds the demo segmenter; without
  ``--out`` it writes into the demo cache (:func:`model.checkpoint.demo_cache_dir`) under a key of
  every setting (:func:`demo_key`: the segmenter's labels and card version included, so a demo
  model cached by an older node is rebuilt), so a quick test setting never overwrites the real
  demo model.

Stomach and aorta in site training. A manual SEG has liver, tumour and LOAT only, and a masks
folder may lack ``stomach.nrrd`` or ``aorta.nrrd``. Such a study is a
:class:`model.train_seg.TrainingSample` with those labels ``unlabelled``: they are excluded from
the loss for its patches (the stomach is not taught as background; see :mod:`model.train_seg`),
so the network learns them from the studies that have them. Trained on SEGs alone, it never sees
a stomach or an aorta and its stomach and aorta masks mean nothing; its card says so
(``training.studies_without``) and has no ``training_range.aorta_hu``.

The command line (:mod:`node.cli.main`) only parses options; :func:`run` does the rest and raises
:class:`TrainSegUsageError` (exit 2) or :class:`TrainSegFailed` (exit 1) with a one-line message.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node.analysis import stages
from node.analysis.dicomio import DicomIOError, SeriesFiles, image_from_volume, scan_folder
from node.core.errors import ConfigurationError, InputError, WorkFailed
from node.core.logging import get_logger, study_key
from node.core.settings import PhasesSection

if TYPE_CHECKING:
    from model.train_seg import TrainingSample

__all__ = [
    "DEMO_ITERATIONS",
    "DEMO_PHANTOMS",
    "MASK_NAMES",
    "OPTIONAL_MASK_NAMES",
    "SEG_UNLABELLED",
    "SITE_ITERATIONS",
    "StudyOutcome",
    "TrainSegFailed",
    "TrainSegOptions",
    "TrainSegReport",
    "TrainSegUsageError",
    "demo_key",
    "phantom_samples",
    "run",
    "study_samples",
    "truth_masks_for",
]

log = get_logger(__name__)

#: Phantom studies of the demo segmenter, ``mvi-node train-seg --phantoms 48`` (the one shipped
#: in :data:`node.analysis.models.SHIPPED_SEGMENTER`).
DEMO_PHANTOMS = 48
#: Optimiser steps with ``--phantoms`` when ``--iterations`` is not given. At 12 phantoms and
#: 1,500 steps (what a first `make demo` could afford to train, 5 min on 2 cores) two builds of
#: the same code scored shifted tumour Dice 0.86 and 0.69, LOAT 0.58 and 0.72: too few steps to
#: be stable, and the first run over its 6 minutes. The demo segmenter is now trained once at this
#: budget and shipped (figures in the README's segmentation benchmark).
DEMO_ITERATIONS = 6000
#: Optimiser steps with ``--studies`` when ``--iterations`` is not given (site data is more
#: varied than phantoms; a GPU is expected).
SITE_ITERATIONS = 4000

#: Truth mask files of a study, in ``DIR/masks/<study folder>/``.
MASK_NAMES = ("liver", "tumor", "loat")
#: Truth mask files used when present (their label is unlabelled for the study otherwise).
OPTIONAL_MASK_NAMES = ("stomach", "aorta")


class TrainSegUsageError(ConfigurationError):
    """Bad options or no usable data: exit 2."""


class TrainSegFailed(WorkFailed):
    """Training itself failed: exit 1."""


@dataclass(frozen=True)
class TrainSegOptions:
    """What ``mvi-node train-seg`` was asked for (see its ``--help``)."""

    studies: Path | None = None
    phantoms: int | None = None
    out: Path | None = None
    seed: int = 0
    iterations: int | None = None
    spacing_mm: float = 2.0
    device: str = "auto"
    validation_fraction: float = 0.2
    force: bool = False
    size: int = 256
    slices: int = 64
    #: Phantom appearance (:class:`model.domain.DomainKind`): ``randomised`` or ``standard``.
    domain: str = "randomised"


@dataclass(frozen=True)
class StudyOutcome:
    """One study considered for training: used (for training or validation) or skipped, and why."""

    name: str
    used: bool
    reason: str | None = None
    validation: bool = False


@dataclass
class TrainSegReport:
    """What :func:`run` did."""

    out: Path
    card: dict[str, Any]
    outcomes: list[StudyOutcome] = field(default_factory=list)
    seconds: float = 0.0
    reused: bool = False


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------


#: What a manual SEG's truth does not draw (:func:`truth_masks_for`): unlabelled in training.
SEG_UNLABELLED: frozenset[str] = frozenset(OPTIONAL_MASK_NAMES)


def truth_masks_for(
    study: dict[str, SeriesFiles],
    arterial: sitk.Image,
    *,
    arterial_uid: str,
    portal_venous_uid: str,
) -> npt.NDArray[np.uint8] | None:
    """Truth label map from a manual DICOM SEG inside the study, on the arterial grid.

    The SEG must reference the arterial series and map to tumor and LOAT (and, when present,
    liver) the way a supplied segmentation does (:mod:`node.analysis.supplied_seg`); the newest
    MANUAL or SEMIAUTOMATIC one wins. A SEG drawn on the portal-venous series is not used as
    training truth: it would need the registration that the training is meant to be blind to.
    The map has no stomach or aorta (:data:`SEG_UNLABELLED`). Returns None when there is none.
    """
    from model.segmentation import labels_from_masks
    from node.analysis.supplied_seg import find_supplied_segs, supplied_masks
    from node.core.settings import SuppliedSegLabels

    paths = [path for files in study.values() for path in files.paths]
    search = find_supplied_segs(
        paths,
        arterial_series_uid=arterial_uid,
        portal_venous_series_uid=portal_venous_uid,
        allowed_algorithm_types=("MANUAL", "SEMIAUTOMATIC"),
        label_patterns=SuppliedSegLabels().model_dump(),
    )
    for seg in search.found:
        if seg.referenced_phase != "arterial":
            continue
        masks = supplied_masks(seg, arterial)
        # Without a liver segment the tumor stands in for it (the liver includes the tumor).
        liver = masks.get("liver", masks["tumor"])
        return labels_from_masks(liver, masks["tumor"], masks["loat"])
    return None


def _masks_from_folder(
    folder: Path, arterial: sitk.Image
) -> tuple[npt.NDArray[np.uint8], frozenset[str]] | None:
    """Label map from ``folder/{liver,tumor,loat}.nrrd`` on the arterial grid; None if absent.

    ``stomach.nrrd`` and ``aorta.nrrd`` are used when present; the names of those absent are
    returned with the labels (unlabelled for training).
    """
    from model.registration import resample_onto
    from model.segmentation import labels_from_masks

    paths = {name: folder / f"{name}.nrrd" for name in MASK_NAMES}
    if not all(path.is_file() for path in paths.values()):
        return None
    optional = {name: folder / f"{name}.nrrd" for name in OPTIONAL_MASK_NAMES}
    paths.update({name: path for name, path in optional.items() if path.is_file()})
    unlabelled = frozenset(name for name in OPTIONAL_MASK_NAMES if name not in paths)
    masks: dict[str, npt.NDArray[np.uint8]] = {}
    for name, path in paths.items():
        image = sitk.ReadImage(str(path))
        same_grid = (
            image.GetSize() == arterial.GetSize()
            and np.allclose(image.GetSpacing(), arterial.GetSpacing(), atol=1e-4)
            and np.allclose(image.GetOrigin(), arterial.GetOrigin(), atol=1e-3)
            and np.allclose(image.GetDirection(), arterial.GetDirection(), atol=1e-5)
        )
        if not same_grid:
            image = resample_onto(image, arterial, label=True)
        masks[name] = (sitk.GetArrayFromImage(image) > 0).astype(np.uint8)
    labels = labels_from_masks(
        masks["liver"],
        masks["tumor"],
        masks["loat"],
        stomach=masks.get("stomach"),
        aorta=masks.get("aorta"),
    )
    return labels, unlabelled


def _study_folder_name(root: Path, series: dict[str, SeriesFiles]) -> str:
    """The study's folder below ``root`` (first path component of its files' common folder)."""
    paths = [str(p) for files in series.values() for p in files.paths]
    common = Path(os.path.commonpath(paths))
    if common.is_file():
        common = common.parent
    try:
        relative = common.relative_to(root)
    except ValueError:
        return common.name
    return relative.parts[0] if relative.parts else root.name


# --------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------


def _align(
    arterial: sitk.Image, portal_venous: sitk.Image, spacing_mm: float, seed: int
) -> sitk.Image:
    """The portal-venous image registered onto the arterial one (the node's register stage)."""
    registered = stages.register(arterial, portal_venous, working_spacing_mm=spacing_mm, seed=seed)
    return registered.portal_venous_on_arterial


def study_samples(
    folder: Path,
    spacing_mm: float,
    seed: int = 0,
    on_study: Callable[[StudyOutcome], None] | None = None,
) -> tuple[list[TrainingSample], list[StudyOutcome]]:
    """Training samples from a folder of DICOM studies with truth masks beside them.

    Parameters
    ----------
    folder
        Searched recursively; masks in ``folder/masks/<study folder>/``.
    spacing_mm
        Working spacing of the registration.
    seed
        Seed of the registration's metric sampling.
    on_study
        Called with the outcome of each study (progress, warnings).

    Returns
    -------
    samples, outcomes
        :class:`model.train_seg.TrainingSample` per usable study, and one outcome per study.
    """
    from model.registration import RegistrationError
    from model.train_seg import TrainingSample

    try:
        studies = scan_folder(folder)
    except DicomIOError as exc:
        raise TrainSegUsageError(str(exc)) from None
    # The default [phases] rules: training data is not a site's PACS with its own names.
    rules = PhasesSection()
    samples: list[TrainingSample] = []
    outcomes: list[StudyOutcome] = []
    named = sorted((_study_folder_name(folder, series), uid) for uid, series in studies.items())
    for name, uid in named:
        series = studies[uid]
        reason: str | None = None
        try:
            pairing = stages.pair(series, rules, working_spacing_mm=spacing_mm)
            if pairing.status != "paired" or not pairing.arterial or not pairing.portal_venous:
                reason = f"no arterial/portal-venous pair ({pairing.reason})"
            else:
                arterial = stages.load(series, pairing.arterial)
                found = _masks_from_folder(folder / "masks" / name, arterial)
                labels: npt.NDArray[np.uint8] | None = None
                unlabelled = SEG_UNLABELLED
                if found is not None:
                    labels, unlabelled = found
                else:
                    labels = truth_masks_for(
                        series,
                        arterial,
                        arterial_uid=pairing.arterial,
                        portal_venous_uid=pairing.portal_venous,
                    )
                if labels is None:
                    reason = (
                        f"no truth masks (expected {folder / 'masks' / name}/*.nrrd or a "
                        "manual SEG of the arterial series in the study)"
                    )
                else:
                    portal = stages.load(series, pairing.portal_venous)
                    aligned = _align(arterial, portal, spacing_mm, seed)
                    samples.append(
                        TrainingSample(arterial, aligned, labels, name=name, unlabelled=unlabelled)
                    )
        # InputError: a series or a manual SEG that cannot be read (DicomIOError, SuppliedSegError).
        except (InputError, RegistrationError, RuntimeError, OSError, ValueError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        outcome = StudyOutcome(name=name, used=reason is None, reason=reason)
        if reason is not None:
            log.warning("training study skipped", study_key=study_key(uid), folder=name)
        outcomes.append(outcome)
        if on_study is not None:
            on_study(outcome)
    return samples, outcomes


def phantom_samples(
    count: int,
    seed: int,
    size: int,
    slices: int,
    spacing_mm: float,
    on_study: Callable[[StudyOutcome], None] | None = None,
    domain: str = "standard",
) -> tuple[list[TrainingSample], list[StudyOutcome]]:
    """Render ``count`` phantom studies in memory, register their phases, return samples.

    Study ``i`` has seed :func:`node.offline.phantom_study.study_seed` ``(seed, i)``: the same
    patients as ``mvi-node phantom OUT --seed SEED``, with the appearance
    :func:`model.domain.training_domain` gives them in a ``domain`` cohort (a randomised study
    draws its own slice count).
    """
    from model.domain import training_domain
    from model.phantom import PhantomSpec, make_study
    from model.segmentation import labels_from_masks
    from model.train_seg import TrainingSample
    from node.offline.phantom_study import study_seed

    spec = PhantomSpec(size=size, slices=slices, phases=("arterial", "portal_venous"))
    samples: list[TrainingSample] = []
    outcomes: list[StudyOutcome] = []
    for index in range(count):
        study_spec = replace(spec, domain=training_domain(index, domain))
        phantom = make_study(study_seed(seed, index), study_spec)
        arterial = image_from_volume(
            phantom.phases["arterial"].hu, phantom.spacing_mm, phantom.origin_mm
        )
        portal = image_from_volume(
            phantom.phases["portal_venous"].hu, phantom.spacing_mm, phantom.origin_mm
        )
        name = f"phantom_{index + 1:04d}"
        # Registered, not placed by the known shift: training sees what the pipeline will feed.
        aligned = _align(arterial, portal, spacing_mm, seed)
        labels = labels_from_masks(
            phantom.masks["liver"],
            phantom.masks["tumor"],
            phantom.masks["loat"],
            stomach=phantom.masks["stomach"],
            aorta=phantom.masks["aorta"],
        )
        samples.append(TrainingSample(arterial, aligned, labels, name=name))
        outcome = StudyOutcome(name=name, used=True)
        outcomes.append(outcome)
        if on_study is not None:
            on_study(outcome)
    return samples, outcomes


def _split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and validation indices: a seeded shuffle, at least one of each when possible."""
    n_val = round(count * fraction)
    if fraction > 0 and count >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, count - 1)
    order = [int(i) for i in np.random.default_rng(seed).permutation(count)]
    return sorted(order[n_val:]), sorted(order[:n_val])


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def demo_key(options: TrainSegOptions, iterations: int) -> dict[str, Any]:
    """The demo-cache key of a ``--phantoms`` run (every setting that changes the model).

    The segmenter's labels and card version are part of it: a node that learns a new label, or
    writes a card the quality gates read differently, builds its demo segmenter afresh instead of
    reusing one cached by an older node (``mvi-node demo`` checks only that a checkpoint is there).
    """
    from model.domain import DOMAIN_VERSION
    from model.phantom import PHANTOM_VERSION
    from model.segmentation import LABELS, SEGMENTER_CARD_VERSION
    from model.train_seg import AUGMENTATION

    return {
        "phantom_version": PHANTOM_VERSION,
        "domain": options.domain,
        "domain_version": DOMAIN_VERSION,
        "labels": dict(LABELS),
        "card_version": SEGMENTER_CARD_VERSION,
        "augmentation": [list(entry) for entry in AUGMENTATION],
        "phantoms": options.phantoms,
        "seed": options.seed,
        "iterations": iterations,
        "size": options.size,
        "slices": options.slices,
        "spacing": options.spacing_mm,
    }


def _check_options(options: TrainSegOptions) -> None:
    if (options.studies is None) == (options.phantoms is None):
        raise TrainSegUsageError("give exactly one of --studies DIR and --phantoms N")
    if options.studies is not None and options.out is None:
        raise TrainSegUsageError("--studies needs --out MODEL_DIR (where the checkpoint goes)")
    if options.studies is not None and not options.studies.is_dir():
        raise TrainSegUsageError(f"--studies {options.studies}: not a folder")
    if not 0.0 <= options.validation_fraction < 1.0:
        raise TrainSegUsageError("--validation-fraction must be in [0, 1)")
    if not 0.25 < options.spacing_mm <= 10.0:
        raise TrainSegUsageError("--spacing must be in (0.25, 10] mm")
    if options.domain not in ("randomised", "standard"):
        # The shifted cohort is what the segmenter is evaluated on: training on it would void
        # the evaluation.
        raise TrainSegUsageError(
            f"--domain must be randomised or standard, not {options.domain!r}"
            + (
                " (the shifted cohort is for evaluation only)"
                if options.domain == "shifted"
                else ""
            )
        )
    from model.segmentation import resolve_device

    try:
        resolve_device(options.device)
    except ValueError as exc:
        raise TrainSegUsageError(f"--device: {exc}") from None


def _output_dir(options: TrainSegOptions, iterations: int) -> tuple[Path, bool]:
    """The checkpoint directory and whether it is the demo cache."""
    from model.checkpoint import demo_cache_dir, is_checkpoint_dir

    if options.out is None:
        return demo_cache_dir("segmenter", demo_key(options, iterations)), True
    out = options.out
    if out.exists() and not out.is_dir():
        raise TrainSegUsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not options.force:
            raise TrainSegUsageError(
                f"--out {out} is not empty; choose an empty folder or pass --force to replace"
            )
        if not is_checkpoint_dir(out):
            raise TrainSegUsageError(
                f"--out {out} holds more than a checkpoint; --force only replaces a checkpoint"
            )
    return out, False


def _valid_checkpoint(directory: Path) -> dict[str, Any] | None:
    from model.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(directory)[1]
    except CheckpointError:
        return None


def _fmt_dice(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _print_report(report: TrainSegReport, out: Console) -> None:
    card = report.card
    used = [o for o in report.outcomes if o.used]
    skipped = [o for o in report.outcomes if not o.used]
    validation = card.get("validation", {})
    dice = validation.get("dice", {})
    training = card.get("training", {})
    title = "segmenter (cached demo model, not retrained)" if report.reused else "segmenter"
    table = Table(title=title)
    table.add_column("item")
    table.add_column("value")
    table.add_row("studies used", f"{len(used)} ({validation.get('studies', 0)} for validation)")
    table.add_row("studies skipped", str(len(skipped)))
    for label in ("liver", "tumor", "loat", "stomach", "aorta"):
        table.add_row(f"validation Dice {label}", _fmt_dice(dice.get(label)))
    quality = card.get("quality", {})
    table.add_row(
        f"uncertainty limit ({quality.get('measured_on', '-')})",
        _fmt_dice(quality.get("uncertainty_limit")),
    )
    table.add_row("tumor uncertainty limit", _fmt_dice(quality.get("tumor_uncertainty_limit")))
    table.add_row("iterations", str(training.get("iterations", "-")))
    table.add_row("working spacing mm", str(card.get("input", {}).get("spacing_mm", "-")))
    table.add_row("device", str(training.get("device", "-")))
    table.add_row("training seconds", str(training.get("seconds", "-")))
    table.add_row("total seconds", f"{report.seconds:.1f}")
    table.add_row("demo model", "yes" if card.get("demo") else "no")
    table.add_row("checkpoint", str(report.out))
    out.print(table)
    for outcome in skipped:
        out.print(f"skipped {outcome.name}: {outcome.reason}", markup=False, highlight=False)


def run(
    options: TrainSegOptions, out: Console | None = None, err: Console | None = None
) -> TrainSegReport:
    """Run ``mvi-node train-seg``: gather samples, train, validate, write the checkpoint.

    Parameters
    ----------
    options
        The parsed command line.
    out, err
        Consoles for the final table and for progress and warnings.

    Raises
    ------
    TrainSegUsageError
        Bad options, an output folder that may not be replaced, or no usable study.
    TrainSegFailed
        Training or writing the checkpoint failed.
    """
    out = out or Console()
    err = err or Console(stderr=True)
    _check_options(options)
    demo = options.phantoms is not None
    default_iterations = DEMO_ITERATIONS if demo else SITE_ITERATIONS
    iterations = options.iterations or default_iterations
    directory, cached = _output_dir(options, iterations)
    started = time.perf_counter()
    if cached and not options.force:
        card = _valid_checkpoint(directory)
        if card is not None:
            report = TrainSegReport(out=directory, card=card, reused=True)
            _print_report(report, out)
            return report

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=err,
        transient=True,
    ) as progress:
        total = options.phantoms if demo else None
        loading = progress.add_task("studies", total=total, note="")

        def on_study(outcome: StudyOutcome) -> None:
            if not outcome.used:
                progress.console.print(
                    f"warning: skipped {outcome.name}: {outcome.reason}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )
            progress.advance(loading)

        if options.phantoms is not None:
            samples, outcomes = phantom_samples(
                options.phantoms,
                options.seed,
                options.size,
                options.slices,
                options.spacing_mm,
                on_study,
                domain=options.domain,
            )
        else:
            assert options.studies is not None
            samples, outcomes = study_samples(
                options.studies, options.spacing_mm, options.seed, on_study
            )
        if not samples:
            source = options.studies if options.studies is not None else "the phantoms"
            raise TrainSegUsageError(
                f"no usable study in {source} ({len(outcomes)} found, all skipped); "
                "each needs an arterial and a portal-venous series and truth masks in "
                "DIR/masks/<study folder>/{liver,tumor,loat}.nrrd"
            )
        train_idx, val_idx = _split(len(samples), options.validation_fraction, options.seed)
        validation_names = {samples[i].name for i in val_idx}
        outcomes = [
            StudyOutcome(o.name, o.used, o.reason, validation=o.name in validation_names)
            for o in outcomes
        ]
        training = progress.add_task("training", total=iterations, note="")

        def on_step(step: int, steps: int, loss: float) -> None:
            progress.update(training, completed=step, note=f"loss {loss:.3f}")

        try:
            card = _train(options, samples, train_idx, val_idx, directory, iterations, on_step)
        except (RuntimeError, ValueError, OSError, MemoryError) as exc:
            raise TrainSegFailed(f"training failed: {type(exc).__name__}: {exc}") from exc
    report = TrainSegReport(
        out=directory, card=card, outcomes=outcomes, seconds=time.perf_counter() - started
    )
    log.info(
        "segmenter trained",
        studies=len(train_idx),
        validation=len(val_idx),
        skipped=sum(not o.used for o in outcomes),
        dice=card.get("validation", {}).get("dice"),
        seconds=round(report.seconds, 1),
    )
    _print_report(report, out)
    return report


def _train(
    options: TrainSegOptions,
    samples: Sequence[TrainingSample],
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    directory: Path,
    iterations: int,
    on_step: Callable[[int, int, float], None],
) -> dict[str, Any]:
    from model.train_seg import train_segmenter

    demo = options.phantoms is not None
    source: dict[str, Any]
    if demo:
        source = {
            "phantoms": options.phantoms,
            "seed": options.seed,
            "size": options.size,
            "slices": options.slices,
            "domain": options.domain,
            "command": (
                f"mvi-node train-seg --phantoms {options.phantoms} --seed {options.seed} "
                f"--iterations {iterations} --size {options.size} --slices {options.slices} "
                f"--spacing {options.spacing_mm:g} --domain {options.domain}"
            ),
        }
    else:
        source = {"studies": len(samples), "folder_name": Path(str(options.studies)).name}
    extra: dict[str, Any] = {"training_data": source}
    if demo:
        # What node.analysis.models compares before it uses a shipped demo segmenter.
        extra["demo_key"] = demo_key(options, iterations)
    return train_segmenter(
        [samples[i] for i in train_idx],
        directory,
        spacing_mm=options.spacing_mm,
        iterations=iterations,
        seed=options.seed,
        device=options.device,
        validation=[samples[i] for i in val_idx],
        demo=demo,
        progress=on_step,
        card_extra=extra,
    )
